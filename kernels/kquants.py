"""GGML's K-quant block types: quantize and dequantize kernels, byte-identical with
``ggml_quantize_chunk`` and ``dequantize_row_*_K`` (layouts: ``docs/formats.md``).

A super-block holds 256 consecutive values of one row (blocks never cross rows), cut into
sub-blocks of 16 or 32 values whose scales (and minimums) are themselves quantized against one
fp16 ``d`` (and ``dmin``).  Without an importance vector each block follows GGML's
``quantize_row_*_K_ref``; with one (``quant_weights``, one float per column) it follows
``quantize_row_*_K_impl``, whose weights are built from the block's own mean square.  Either way,
once the scales are stored the values are quantized again against the rounded scales, except in
sub-blocks whose rounded scale is zero: those keep the codes of the scale search, as in GGML.

All arithmetic is float32 in GGML's evaluation order, without fused multiply-add, and every
sequential float32 sum stays sequential (numba neither contracts nor reassociates without
``fastmath``).  The C code's narrowing stores (int to ``uint8_t`` / ``int8_t``) keep the low byte.
"""

import numpy as np
from numba import prange
from numba.cpython.unsafe.numbers import trailing_zeros
from qstrat.kernels.ggml_common import (
    BLOCKS_PER_TASK,
    GROUP_MAX_EPS,
    LANES_SCRATCH,
    importance_weights,
    load_block,
    make_qkx_quants,
    make_qkx_quants_lanes,
    make_qx_quants,
    nearest_int,
    signed_extreme,
    sum_squares,
)
from qstrat.kernels.half import ROUND_MAGIC, load_half, store_half
from qstrat.kernels.jit import kernel
from qstrat.kernels.layout import QK_K, U64

# Kernel codes of the types; the registry (qstrat.formats) maps names to them.
Q2_K = 0
Q3_K = 1
Q4_K = 2
Q5_K = 3
Q6_K = 4

#: bytes per 256-value block, by code
BLOCK_BYTES = (84, 110, 144, 176, 210)

# Q6_K: ql u8[128] (low nibbles), qh u8[64] (top two bits), scales i8[16], d fp16
_Q6_QH = 128
_Q6_SCALES = 192
_Q6_D = 208

# Q2_K: scales u8[16] (4-bit scale | 4-bit min << 4), qs u8[64] (2-bit codes), d fp16, dmin fp16
_Q2_QS = 16
_Q2_D = 80
_Q2_DMIN = 82
# Q3_K: hmask u8[32] (third bits), qs u8[64] (low two bits), scales u8[12] (sixteen 6-bit), d fp16
_Q3_QS = 32
_Q3_SCALES = 96
_Q3_D = 108
# Q4_K / Q5_K: d fp16, dmin fp16, scales u8[12] (eight 6-bit scales and mins), [Q5_K: qh u8[32]], qs
_K4_DMIN = 2
_K4_SCALES = 4
_Q4_QS = 16
_Q5_QH = 16
_Q5_QS = 48


@kernel(inline="always")
def _low_byte(i):
    """What a C store of the int ``i`` into a uint8_t keeps."""
    return np.int64(i) & 0xFF


@kernel(inline="always")
def _signed_byte(i):
    """What a C store of the int ``i`` into an int8_t keeps."""
    return ((np.int64(i) & 0xFF) ^ 0x80) - 0x80


@kernel(inline="always")
def _or_byte(out, b, offset, bits):
    """out[b, offset] |= bits, as a C `|=` on a uint8_t."""
    out[b, offset] = np.uint8(_low_byte(np.int64(out[b, offset]) | bits))


@kernel
def _make_qp_quants(x, nmax, codes, quant_weights):
    """GGML's make_qp_quants: codes (as the uint8_t GGML stores) of the non-negative ``x`` on
    [0, nmax] and their scale: the best of nine inverse scales ``(nmax + 0.1 s) / max`` by
    weighted squared error, then up to five passes moving single codes to the least-squares
    optimum."""
    n = x.shape[0]
    top = np.float32(0.0)
    for i in range(n):
        top = top if top > x[i] else x[i]  # C's MAX(max, x[i])
    if top < GROUP_MAX_EPS:
        codes[:n] = 0
        return np.float32(0.0)
    fmax = np.float32(nmax)
    iscale = fmax / top
    for i in range(n):
        codes[i] = _low_byte(nearest_int(iscale * x[i]))
    scale = np.float32(1.0) / iscale
    best_mse = np.float32(0.0)
    for i in range(n):
        diff = x[i] - scale * np.float32(codes[i])
        best_mse += quant_weights[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_step = (np.float32(0.1) * np.float32(step) + fmax) / top
        scale_step = np.float32(1.0) / iscale_step
        mse = np.float32(0.0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_step * x[i]))
            diff = x[i] - scale_step * np.float32(l)
            mse += quant_weights[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_step
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        codes[i] = _low_byte(l)
        fl = np.float32(l)  # the sums take the int, not the stored byte
        sumlx += quant_weights[i] * x[i] * fl
        suml2 += quant_weights[i] * fl * fl
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = quant_weights[i]
            li = np.float32(codes[i])
            slx = sumlx - w * x[i] * li
            sl2 = suml2 - w * li * li
            if slx > np.float32(0.0) and sl2 > np.float32(0.0):
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != codes[i]:
                    fl = np.float32(new_l)
                    slx += w * x[i] * fl
                    sl2 += w * fl * fl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        codes[i] = _low_byte(new_l)
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if not changed:
            break
    return sumlx / suml2 if suml2 > np.float32(0.0) else np.float32(0.0)


@kernel(inline="always")
def _levels_to_max(values, nmax, levels):
    """quantize_row_q2_K_ref / q4_K_ref / q5_K_ref on the sub-blocks' scales (or mins): the
    largest, if > 0, maps to nmax: levels[j] = nearest_int(nmax / max * values[j]), else all 0;
    returns max / nmax (0 without a value > 0), the block's scale before its fp16 rounding."""
    top = np.float32(0.0)
    for j in range(values.shape[0]):
        if values[j] > top:
            top = values[j]
    if top > np.float32(0.0):
        iscale = np.float32(nmax) / top
        for j in range(values.shape[0]):
            levels[j] = nearest_int(iscale * values[j])
    else:
        for j in range(values.shape[0]):
            levels[j] = 0
    return top / np.float32(nmax)


@kernel(inline="always")
def _weighted_scales_mins(xb, qw, sigma2, size, nmax, codes, aux, weight, scales, mins, sw):
    """quantize_row_q4_K_impl / q5_K_impl's search, per sub-block of ``size``: the
    importance weights (their sum into sw) and make_qkx3_quants(rmin -0.9, rdelta 0.05, nstep 36)."""
    for j in range(QK_K // size):
        x = xb[size * j : size * j + size]
        sw[j] = importance_weights(x, qw[size * j : size * j + size], sigma2, weight[:size])
        scales[j], mins[j] = make_qkx_quants(
            x, weight[:size], nmax, codes[size * j : size * j + size], aux, np.float32(-0.9), np.float32(0.05), 36, False
        )


@kernel(inline="always")
def _requantize(xb, j, parts, d, dm, low, high, codes):
    """Sub-block j of ``parts`` in the block quantized again against its stored scale ``d`` (and
    min ``dm``), as every quantize_row_*_K does: codes = MAX(low, MIN(high, nearest_int((x + dm) / d))) - low.
    A zero ``d`` leaves the codes of the scale search (C's ``if (!d) continue``; NaN goes on).
    Types without minimums pass dm = -0.0: x + -0.0 is x, for -0.0 too.  The sub-block length
    is taken from len(xb) at run time: with a constant 16 or 32 LLVM unrolls the loop into
    scalar divisions instead of vectorising it."""
    if d == np.float32(0.0):
        return
    n = U64(xb.shape[0] // parts)
    low32 = np.int32(low)
    high32 = np.int32(high)
    for i in range(U64(j) * n, U64(j) * n + n):  # in int32 and unsigned indices: vectorised
        bits = np.float32((xb[i] + dm) / d + ROUND_MAGIC).view(np.int32)  # nearest_int
        l = np.int32(np.int32(bits & np.int32(0x007FFFFF)) - np.int32(0x00400000))
        codes[i] = np.int64(max(low32, min(high32, l)) - low32)


_NO_MIN = np.float32(-0.0)


# --- Q6_K: 16 sub-blocks of 16, int8 scales, 6-bit codes


@kernel
def _quantize_q6_k(xb, qw, out, b, codes, weight, scales):
    """quantize_row_q6_K_ref (qw None) / quantize_row_q6_K_impl (qw: the block's 256 weights)."""
    for ib in range(16):
        x = xb[16 * ib : 16 * ib + 16]
        if qw is None:  # make_qx_quants with rmse_type 1 and no weights: w = x * x
            for j in range(16):
                weight[j] = x[j] * x[j]
            scales[ib] = make_qx_quants(x, weight[:16], 32, codes[16 * ib : 16 * ib + 16])
        else:  # GGML passes the importance vector itself (its sigma2 weighting is commented out)
            scales[ib] = make_qx_quants(x, qw[16 * ib : 16 * ib + 16], 32, codes[16 * ib : 16 * ib + 16])
    max_scale, max_abs_scale = signed_extreme(scales)
    if max_abs_scale < GROUP_MAX_EPS:
        out[b, :] = 0
        return
    iscale = np.float32(-128.0) / max_scale
    d_all = store_half(out, b, _Q6_D, np.float32(1.0) / iscale)
    for ib in range(16):
        out[b, _Q6_SCALES + ib] = np.uint8(_low_byte(min(127, nearest_int(iscale * scales[ib]))))
    for j in range(16):
        d = d_all * np.float32(_signed_byte(out[b, _Q6_SCALES + j]))
        _requantize(xb, j, 16, d, _NO_MIN, -32, 31, codes)
    for half in range(2):
        j = 128 * half
        ql = 64 * half
        qh = _Q6_QH + 32 * half
        for l in range(32):
            c1 = codes[j + l]
            c2 = codes[j + l + 32]
            c3 = codes[j + l + 64]
            c4 = codes[j + l + 96]
            out[b, ql + l] = np.uint8((c1 & 0xF) | ((c3 & 0xF) << 4))
            out[b, ql + l + 32] = np.uint8((c2 & 0xF) | ((c4 & 0xF) << 4))
            out[b, qh + l] = np.uint8(_low_byte((c1 >> 4) | ((c2 >> 4) << 2) | ((c3 >> 4) << 4) | ((c4 >> 4) << 6)))


@kernel
def _dequantize_q6_k(blocks, b, y):
    d = load_half(blocks, b, _Q6_D)
    for half in range(2):
        ql = 64 * half
        qh = _Q6_QH + 32 * half
        sc = _Q6_SCALES + 8 * half
        base = 128 * half
        for l in range(32):
            s = sc + l // 16
            h = np.int64(blocks[b, qh + l])
            lo = np.int64(blocks[b, ql + l])
            hi = np.int64(blocks[b, ql + l + 32])
            q1 = ((lo & 0xF) | (((h >> 0) & 3) << 4)) - 32
            q2 = ((hi & 0xF) | (((h >> 2) & 3) << 4)) - 32
            q3 = ((lo >> 4) | (((h >> 4) & 3) << 4)) - 32
            q4 = ((hi >> 4) | (((h >> 6) & 3) << 4)) - 32
            # d * sc[is] * q, left to right
            y[base + l] = d * np.float32(np.int8(blocks[b, s])) * np.float32(q1)
            y[base + l + 32] = d * np.float32(np.int8(blocks[b, s + 2])) * np.float32(q2)
            y[base + l + 64] = d * np.float32(np.int8(blocks[b, s + 4])) * np.float32(q3)
            y[base + l + 96] = d * np.float32(np.int8(blocks[b, s + 6])) * np.float32(q4)


# --- Q2_K / Q3_K: 16 sub-blocks of 16, 2-bit codes (plus a third bit in Q3_K's hmask)


@kernel
def _pack_2bit(out, b, qs, codes):
    """qs[32h + l] holds the low two bits of the codes of values 128h + l + 32g at bits 2g (g = 0..3)."""
    for h in range(2):
        for l in range(32):
            j = 128 * h + l
            bits = (codes[j] & 3) | ((codes[j + 32] & 3) << 2) | ((codes[j + 64] & 3) << 4) | ((codes[j + 96] & 3) << 6)
            out[b, qs + 32 * h + l] = np.uint8(_low_byte(bits))


@kernel(inline="always")
def _q3_moves(x, w, wx, levels, moves, sumlx, suml2, nmax):
    """make_q3_quants' proposed move of every code from the sums as they stand: moves[i] =
    MAX(-nmax, MIN(nmax - 1, nearest_int(x * sl2 / slx))), with slx and sl2 the sums without i.
    Returns the bit mask of the i GGML would try (slx > 0 and a different code).  No branch:
    the 16 divisions run as vectors."""
    low = np.int32(-nmax)
    high = np.int32(nmax - 1)
    mask = np.uint32(0)
    for i in range(U64(x.shape[0])):
        li = np.float32(levels[i])
        slx = sumlx - wx[i] * li
        sl2 = suml2 - w[i] * li * li
        bits = np.float32(x[i] * sl2 / slx + ROUND_MAGIC).view(np.int32)
        new_l = max(low, min(high, np.int32(np.int32(bits & np.int32(0x007FFFFF)) - np.int32(0x00400000))))
        moves[i] = new_l
        mask |= np.uint32((slx > np.float32(0.0)) & (new_l != levels[i])) << np.uint32(i)
    return mask


@kernel(inline="always")
def _make_q3_quants(x, nmax, codes, w, wx, levels, moves):
    """GGML's make_q3_quants with do_rmse: codes l + nmax, l in [-nmax, nmax - 1], weights x**2;
    up to five passes move single codes to the weighted least-squares optimum.  An all-zero
    sub-block (|max| < 1e-15) gets codes 0, not nmax, as in GGML.

    GGML divides for every code of every pass although few codes move.  Here each pass first
    computes every code's proposed move from the current sums at once (``_q3_moves``), then
    visits only the codes whose move GGML would try, in order; once a move is taken the sums
    change, and the later codes' proposals are computed again from the new sums.  Every test
    thus sees exactly the sums GGML's sequential loop sees.  Scratch: ``w``, ``wx`` float32,
    ``levels``, ``moves`` int32, each of len(x).  Inlined into _quantize_q3_k.  A division by
    zero gives inf or NaN, as in C (``jit.py``; such proposals are never tried), so the
    divisions need no per-lane check."""
    n = x.shape[0]
    extreme, amax = signed_extreme(x)
    if amax < GROUP_MAX_EPS:
        codes[:n] = 0
        return np.float32(0.0)
    iscale = np.float32(-nmax) / extreme
    low = np.int32(-nmax)
    high = np.int32(nmax - 1)
    for i in range(U64(n)):
        w[i] = x[i] * x[i]
        wx[i] = w[i] * x[i]  # GGML's w*x[i]*l is (w*x[i])*l
        bits = np.float32(iscale * x[i] + ROUND_MAGIC).view(np.int32)
        levels[i] = max(low, min(high, np.int32(np.int32(bits & np.int32(0x007FFFFF)) - np.int32(0x00400000))))
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(U64(n)):
        fl = np.float32(levels[i])
        sumlx += wx[i] * fl
        suml2 += w[i] * fl * fl
    for _ in range(5):
        changed = 0
        mask = _q3_moves(x, w, wx, levels, moves, sumlx, suml2, nmax)
        while mask:
            i = U64(trailing_zeros(mask))
            mask &= mask - np.uint32(1)
            li = np.float32(levels[i])
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            fl = np.float32(moves[i])
            slx += wx[i] * fl
            sl2 += w[i] * fl * fl
            if sl2 > np.float32(0.0) and slx * slx * suml2 > sumlx * sumlx * sl2:
                levels[i] = moves[i]
                sumlx = slx
                suml2 = sl2
                changed += 1
                # the codes after i see the new sums
                later = ~((np.uint32(2) << np.uint32(i)) - np.uint32(1))
                mask = _q3_moves(x, w, wx, levels, moves, sumlx, suml2, nmax) & later
        if not changed:
            break
    for i in range(n):
        codes[i] = levels[i] + nmax
    return sumlx / suml2 if suml2 > np.float32(0.0) else np.float32(0.0)


@kernel(inline="always")
def _q3_scale(blocks, b, j):
    """Sub-block j's 6-bit scale: a nibble of scales[j % 8] (low for j < 8) topped by two bits
    of scales[8 + j % 4] at bit 2 * (j // 4)."""
    q = _Q3_SCALES
    low = np.int64(blocks[b, q + j]) & 0xF if j < 8 else np.int64(blocks[b, q + j - 8]) >> 4
    return low | (((np.int64(blocks[b, q + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)


@kernel
def _quantize_q3_k(xb, qw, out, b, codes, weight, scales, sw, ls, lq):
    """quantize_row_q3_K_ref (qw None) / quantize_row_q3_K_impl."""
    if qw is None:
        for j in range(16):
            scales[j] = _make_q3_quants(
                xb[16 * j : 16 * j + 16], 4, codes[16 * j : 16 * j + 16], weight[:16], weight[16:32], lq[:16], lq[16:]
            )
        max_scale, _ = signed_extreme(scales)
        for j in range(12):
            out[b, _Q3_SCALES + j] = 0
        if max_scale != np.float32(0.0):  # C's `if (max_scale)`: NaN goes on
            iscale = np.float32(-32.0) / max_scale
            for j in range(16):
                ls[j] = max(-32, min(31, _signed_byte(nearest_int(iscale * scales[j])))) + 32
            d_block = np.float32(1.0) / iscale
        else:
            for j in range(16):
                ls[j] = 0
            d_block = np.float32(0.0)
    else:
        sigma2 = np.float32(2.0) * sum_squares(xb) / np.float32(QK_K)
        for j in range(16):
            x = xb[16 * j : 16 * j + 16]
            sw[j] = importance_weights(x, qw[16 * j : 16 * j + 16], sigma2, weight)
            scales[j] = make_qx_quants(x, weight[:16], 4, codes[16 * j : 16 * j + 16])
        for j in range(12):
            out[b, _Q3_SCALES + j] = 0
        d_block = make_qx_quants(scales, sw, 32, ls)
    for j in range(16):  # GGML skips this when max_scale is 0: the codes 0 pack to the same zeros
        l = ls[j]
        if j < 8:
            out[b, _Q3_SCALES + j] = np.uint8(l & 0xF)
        else:
            _or_byte(out, b, _Q3_SCALES + j - 8, (l & 0xF) << 4)
        _or_byte(out, b, _Q3_SCALES + 8 + j % 4, (l >> 4) << (2 * (j // 4)))
    d_all = store_half(out, b, _Q3_D, d_block)
    for j in range(16):
        _requantize(xb, j, 16, d_all * np.float32(_q3_scale(out, b, j) - 32), _NO_MIN, -4, 3, codes)
    # codes are 0..7: bit 2 goes to hmask (GGML's `if (L > 3) { hmask |= ...; L -= 4; }`),
    # the low two bits to qs (_pack_2bit keeps only those); no data-dependent branch
    for m in range(32):
        bits = np.int64(0)
        for g in range(8):
            bits |= ((codes[32 * g + m] >> 2) & 1) << g
        out[b, m] = np.uint8(bits)
    _pack_2bit(out, b, _Q3_QS, codes)


@kernel
def _quantize_q2_k(xb, qw, out, b, codes, lanes, weight, scales, mins, sw, ls, lm):
    """quantize_row_q2_K_ref (qw None) / quantize_row_q2_K_impl."""
    # the 16 groups side by side, one per vector lane (see make_qkx_quants_lanes)
    if qw is None:
        for l in range(QK_K):
            weight[l] = abs(xb[l])
        make_qkx_quants_lanes(xb, weight, 3, codes, lanes, np.float32(-0.5), np.float32(0.1), 15, True, scales, mins)
        d_block = _levels_to_max(scales, 15, ls)
        m_block = _levels_to_max(mins, 15, lm)
    else:
        sigma2 = sum_squares(xb) / np.float32(QK_K)  # no factor 2 here, unlike q3_K..q5_K
        for j in range(16):
            sw[j] = importance_weights(xb[16 * j : 16 * j + 16], qw[16 * j : 16 * j + 16], sigma2, weight[16 * j : 16 * j + 16])
        make_qkx_quants_lanes(xb, weight, 3, codes, lanes, np.float32(-0.9), np.float32(0.05), 36, False, scales, mins)
        d_block = _make_qp_quants(scales, 15, ls, sw)
        m_block = _make_qp_quants(mins, 15, lm, sw)
    for j in range(16):
        out[b, j] = np.uint8(_low_byte(_low_byte(ls[j]) | (lm[j] << 4)))
    d_all = store_half(out, b, _Q2_D, d_block)
    dmin_all = store_half(out, b, _Q2_DMIN, m_block)
    for j in range(16):
        sc = np.int64(out[b, j])
        _requantize(xb, j, 16, d_all * np.float32(sc & 0xF), dmin_all * np.float32(sc >> 4), 0, 3, codes)
    _pack_2bit(out, b, _Q2_QS, codes)


@kernel
def _dequantize_q23_k(blocks, b, three, y):
    """dequantize_row_q2_K: d * sc * q - dmin * m; dequantize_row_q3_K: d * (sc - 32) * (q - 4 * !bit)."""
    d = load_half(blocks, b, _Q3_D if three else _Q2_D)
    dmin = load_half(blocks, b, _Q2_DMIN) if not three else np.float32(0.0)
    qs = _Q3_QS if three else _Q2_QS
    for n in range(2):
        for j in range(4):
            shift = 2 * j
            for half in range(2):
                s = 8 * n + 2 * j + half  # GGML's running `is`
                base = 128 * n + 32 * j + 16 * half
                if three:
                    dl = d * np.float32(_q3_scale(blocks, b, s) - 32)
                    bit = 4 * n + j  # hmask bit, running over both halves of the block
                    for l in range(16):
                        q = (np.int64(blocks[b, qs + 32 * n + 16 * half + l]) >> shift) & 3
                        q -= 0 if (np.int64(blocks[b, 16 * half + l]) >> bit) & 1 else 4
                        y[base + l] = dl * np.float32(q)
                else:
                    sc = np.int64(blocks[b, s])
                    dl = d * np.float32(sc & 0xF)
                    ml = dmin * np.float32(sc >> 4)
                    for l in range(16):
                        q = (np.int64(blocks[b, qs + 32 * n + 16 * half + l]) >> shift) & 3
                        y[base + l] = dl * np.float32(q) - ml


# --- Q4_K / Q5_K: 8 sub-blocks of 32, 6-bit scales and mins, 4- or 5-bit codes


@kernel(inline="always")
def _scale_min_k4(blocks, b, j):
    """get_scale_min_k4: sub-block j's 6-bit scale and min from the 12 packed bytes."""
    q = _K4_SCALES
    if j < 4:
        return np.int64(blocks[b, q + j]) & 63, np.int64(blocks[b, q + j + 4]) & 63
    sc = (np.int64(blocks[b, q + j + 4]) & 0xF) | ((np.int64(blocks[b, q + j - 4]) >> 6) << 4)
    m = (np.int64(blocks[b, q + j + 4]) >> 4) | ((np.int64(blocks[b, q + j]) >> 6) << 4)
    return sc, m


@kernel
def _quantize_q45_k(xb, qw, nmax, out, b, codes, aux, weight, scales, mins, sw, ls, lm):
    """quantize_row_q4_K_ref / q5_K_ref (qw None), quantize_row_q4_K_impl / q5_K_impl (nmax 15 / 31)."""
    five = nmax == 31
    if qw is None:
        for j in range(8):
            x = xb[32 * j : 32 * j + 32]
            sum_x2 = np.float32(0.0)
            for l in range(32):
                sum_x2 += x[l] * x[l]
            av_x = np.float32(np.sqrt(sum_x2 / np.float32(32.0)))
            for l in range(32):
                weight[l] = av_x + abs(x[l])
            if five:
                scales[j], mins[j] = make_qkx_quants(
                    x, weight[:32], 31, codes[32 * j : 32 * j + 32], aux, np.float32(-0.5), np.float32(0.1), 15, False
                )
            else:
                scales[j], mins[j] = make_qkx_quants(
                    x, weight[:32], 15, codes[32 * j : 32 * j + 32], aux, np.float32(-1.0), np.float32(0.1), 20, False
                )
        d_block = _levels_to_max(scales[:8], 63, ls)  # then MIN(63, (uint8_t)l), as GGML
        m_block = _levels_to_max(mins[:8], 63, lm)
        for j in range(8):
            ls[j] = min(63, _low_byte(ls[j]))
            lm[j] = min(63, _low_byte(lm[j]))
    else:
        sigma2 = np.float32(2.0) * sum_squares(xb) / np.float32(QK_K)
        _weighted_scales_mins(xb, qw, sigma2, 32, nmax, codes, aux, weight, scales, mins, sw)
        d_block = _make_qp_quants(scales[:8], 63, ls, sw[:8])
        m_block = _make_qp_quants(mins[:8], 63, lm, sw[:8])
        if five:  # quantize_row_q5_K_impl clamps again; q4_K_impl does not
            for j in range(8):
                ls[j] = min(63, ls[j])
                lm[j] = min(63, lm[j])
    for j in range(8):
        if j < 4:
            out[b, _K4_SCALES + j] = np.uint8(_low_byte(ls[j]))
            out[b, _K4_SCALES + j + 4] = np.uint8(_low_byte(lm[j]))
        else:
            out[b, _K4_SCALES + j + 4] = np.uint8(_low_byte((ls[j] & 0xF) | ((lm[j] & 0xF) << 4)))
            _or_byte(out, b, _K4_SCALES + j - 4, (ls[j] >> 4) << 6)
            _or_byte(out, b, _K4_SCALES + j, (lm[j] >> 4) << 6)
    d_all = store_half(out, b, 0, d_block)
    dmin_all = store_half(out, b, _K4_DMIN, m_block)
    for j in range(8):
        sc, m = _scale_min_k4(out, b, j)
        _requantize(xb, j, 8, d_all * np.float32(sc), dmin_all * np.float32(m), 0, nmax, codes)
    if not five:
        for n in range(4):
            for l in range(32):
                out[b, _Q4_QS + 32 * n + l] = np.uint8(_low_byte(codes[64 * n + l] | (codes[64 * n + l + 32] << 4)))
        return
    for l in range(32):
        out[b, _Q5_QH + l] = 0
    for n in range(4):
        m1 = 1 << (2 * n)
        for l in range(32):
            l1 = codes[64 * n + l]
            if l1 > 15:
                l1 -= 16
                _or_byte(out, b, _Q5_QH + l, m1)
            l2 = codes[64 * n + l + 32]
            if l2 > 15:
                l2 -= 16
                _or_byte(out, b, _Q5_QH + l, m1 << 1)
            out[b, _Q5_QS + 32 * n + l] = np.uint8(_low_byte(l1 | (l2 << 4)))


@kernel
def _dequantize_q45_k(blocks, b, five, y):
    d = load_half(blocks, b, 0)
    dmin = load_half(blocks, b, _K4_DMIN)
    qs = _Q5_QS if five else _Q4_QS
    for n in range(4):
        sc1, m1 = _scale_min_k4(blocks, b, 2 * n)
        sc2, m2 = _scale_min_k4(blocks, b, 2 * n + 1)
        d1 = d * np.float32(sc1)
        min1 = dmin * np.float32(m1)
        d2 = d * np.float32(sc2)
        min2 = dmin * np.float32(m2)
        for l in range(32):
            byte = np.int64(blocks[b, qs + 32 * n + l])
            q1 = byte & 0xF
            q2 = byte >> 4
            if five:
                h = np.int64(blocks[b, _Q5_QH + l])
                q1 += 16 if (h >> (2 * n)) & 1 else 0
                q2 += 16 if (h >> (2 * n + 1)) & 1 else 0
            y[64 * n + l] = d1 * np.float32(q1) - min1
            y[64 * n + l + 32] = d2 * np.float32(q2) - min2


# --- driver


@kernel
def _quantize_block(xb, qtype, qw, out, b, codes, aux, lanes, weight, scales, mins, sw, ls, lm, lq):
    if qtype == Q6_K:
        _quantize_q6_k(xb, qw, out, b, codes, weight, scales)
    elif qtype == Q2_K:
        _quantize_q2_k(xb, qw, out, b, codes, lanes, weight, scales, mins, sw, ls, lm)
    elif qtype == Q3_K:
        _quantize_q3_k(xb, qw, out, b, codes, weight, scales, sw, ls, lq)
    elif qtype == Q4_K:
        _quantize_q45_k(xb, qw, 15, out, b, codes, aux, weight, scales, mins, sw, ls, lm)
    elif qtype == Q5_K:
        _quantize_q45_k(xb, qw, 31, out, b, codes, aux, weight, scales, mins, sw, ls, lm)


@kernel(parallel=True, nogil=True)
def quantize_rows_kquants(x, qtype, out, quant_weights=None):
    """Quantize every row of ``x`` (rows, k), k % 256 == 0, to K-quant code ``qtype`` into
    ``out`` (rows * k // 256, BLOCK_BYTES[qtype]) uint8, C-contiguous, blocks in row-major order.

    ``x`` is float32, or raw bfloat16 (uint16) / float16 (int16) bits.  ``quant_weights`` (k,)
    float32, finite and >= 0, selects GGML's weighted quantization.  Returns the number of
    blocks holding a NaN or infinity (zeroed; the caller refuses them).
    """
    rows, k = x.shape
    blocks_per_row = k // QK_K
    n_blocks = rows * blocks_per_row
    non_finite = 0
    for task in prange((n_blocks + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK):
        xb = np.empty(QK_K, dtype=np.float32)
        codes = np.empty(QK_K, dtype=np.int64)
        aux = np.empty((6, 32), dtype=np.float32)  # make_qkx_quants' scratch
        lanes = np.empty(LANES_SCRATCH, dtype=np.float32)  # make_qkx_quants_lanes' (Q2_K)
        weight = np.empty(QK_K, dtype=np.float32)
        scales = np.empty(16, dtype=np.float32)
        mins = np.empty(16, dtype=np.float32)
        sw = np.empty(16, dtype=np.float32)
        ls = np.empty(16, dtype=np.int64)
        lm = np.empty(16, dtype=np.int64)
        lq = np.empty(32, dtype=np.int32)
        for b in range(task * BLOCKS_PER_TASK, min(n_blocks, (task + 1) * BLOCKS_PER_TASK)):
            start, bad = load_block(x, b, xb, out)
            if bad:
                non_finite += 1
                continue
            if quant_weights is None:
                _quantize_block(xb, qtype, None, out, b, codes, aux, lanes, weight, scales, mins, sw, ls, lm, lq)
            else:
                _quantize_block(
                    xb, qtype, quant_weights[start : start + QK_K], out, b, codes, aux, lanes, weight, scales, mins, sw, ls, lm, lq
                )
    return non_finite


@kernel(parallel=True, nogil=True)
def dequantize_blocks_kquants(blocks, qtype, out):
    """Dequantize ``blocks`` (n, BLOCK_BYTES[qtype]) uint8 into ``out`` (n, 256) float32, as
    GGML's dequantize_row_*_K."""
    for b in prange(blocks.shape[0]):
        if qtype == Q6_K:
            _dequantize_q6_k(blocks, b, out[b])
        elif qtype == Q2_K or qtype == Q3_K:
            _dequantize_q23_k(blocks, b, qtype == Q3_K, out[b])
        elif qtype == Q4_K or qtype == Q5_K:
            _dequantize_q45_k(blocks, b, qtype == Q5_K, out[b])
