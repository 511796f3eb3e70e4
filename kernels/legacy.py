"""GGML's legacy block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: quantize and dequantize kernels,
byte-identical with ``ggml_quantize_chunk`` and ``dequantize_row_*`` (layouts: ``docs/formats.md``).

Every type packs 32 consecutive values of a row (blocks never cross rows).  Without an
importance vector each block is quantized by GGML's ``quantize_row_*_ref`` arithmetic; with
one (``quant_weights``, one float per column) Q4_0/Q5_0 search the scale like ``make_qx_quants``
and Q4_1/Q5_1 the scale and minimum like ``make_qkx3_quants``, with each value weighted by
``qw[j] * sqrt(sigma2 + x[j]**2)`` (sigma2: the row's mean square).  Q8_0 ignores the vector,
as GGML does.

All arithmetic is float32 in GGML's evaluation order, without fused multiply-add (numba does not
contract without ``fastmath``; GGML's base library is built without FMA on x86-64).  The float
to integer conversions of the C code are reproduced as x86-64 executes them (``cvttss2si``, then
the low byte), so even blocks whose inverse scale overflows give GGML's bytes.
"""

import numpy as np
from numba import njit, prange
from qstrat.kernels.decode import finite_to_float32, from_order_key, order_key, to_float32
from qstrat.kernels.half import float32_to_f16_bits
from qstrat.kernels.layout import U64

#: values per block of every legacy type (GGML's QK8_0 = QK4_0 = QK4_1 = QK5_0 = QK5_1)
QK = 32
HALF = QK // 2

# Kernel codes of the types; the registry (qstrat.formats) maps names to them.
Q8_0 = 0
Q4_0 = 1
Q4_1 = 2
Q5_0 = 3
Q5_1 = 4

#: bytes per block, by code: fp16 d [, fp16 m] [, uint32 qh], then the quants
BLOCK_BYTES = (2 + QK, 2 + HALF, 4 + HALF, 6 + HALF, 8 + HALF)
#: byte offset of the packed quants, by code (the scales and qh come first)
QS_OFFSET = (2, 2, 4, 6, 8)
#: byte offset of qh (the fifth bits) for Q5_0 / Q5_1
QH_OFFSET = (-1, -1, -1, 2, 4)
#: byte offset of the fp16 minimum m for Q4_1 / Q5_1
M_OFFSET = (-1, -1, 2, -1, 2)

_ROUND_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23
_INT_MIN = np.int32(-2147483648)
_TWO_31 = np.float32(2147483648.0)
_GROUP_MAX_EPS = np.float32(1e-15)  # GGML: below this |max| a weighted block is all zeros


@njit(cache=True, inline="always")
def _c_int32(value):
    """C's float -> int conversion as x86-64 runs it (cvttss2si): truncation toward zero,
    and INT_MIN for NaN, infinity or anything out of range (C leaves that undefined).  A
    select in int32, no branch: the loops using it vectorise."""
    return np.int32(value) if abs(value) < _TWO_31 else _INT_MIN


@njit(cache=True, inline="always")
def _c_roundf_int(value):
    """(int)roundf(value): ties away from zero, INT_MIN where cvttss2si gives it."""
    if not abs(value) < _TWO_31:
        return np.int64(_INT_MIN)
    t = np.int32(value)
    frac = value - np.float32(t)  # exact: the fraction of a float32 needs no more bits
    return np.int64(t) + np.int64(frac >= np.float32(0.5)) - np.int64(frac <= np.float32(-0.5))


@njit(cache=True, inline="always")
def nearest_int(value):
    """GGML's nearest_int: ties to even through the float32 bits of value + 1.5 * 2**23 (for
    |value| beyond 2**22 the same bits give the same garbage GGML gets)."""
    bits = np.float32(value + _ROUND_MAGIC).view(np.int32)
    return np.int64(bits & np.int32(0x007FFFFF)) - np.int64(0x00400000)


@njit(cache=True, inline="always")
def store_half(out, b, offset, value):
    h = float32_to_f16_bits(value)
    out[b, U64(offset)] = np.uint8(h & np.uint16(0xFF))
    out[b, U64(offset + 1)] = np.uint8(h >> np.uint16(8))


@njit(cache=True, inline="always")
def _store_u32(out, b, offset, value):
    for i in range(4):
        out[b, U64(offset + i)] = np.uint8((value >> np.uint32(8 * i)) & np.uint32(0xFF))


@njit(cache=True, inline="always")
def _store_nibbles(out, b, qtype, codes):
    """Pack 5-bit or 4-bit codes (int64[32], each the uint8 GGML stores): low nibbles of
    j and j + 16 share byte j, the fifth bits go to qh (Q5 types)."""
    qs = U64(QS_OFFSET[qtype])
    qh = np.uint32(0)
    for j in range(HALF):
        c0 = codes[j] & 0xFF
        c1 = codes[j + HALF] & 0xFF
        out[b, qs + U64(j)] = np.uint8(((c0 & 0x0F) | (c1 << 4)) & 0xFF)
        qh |= np.uint32((c0 & 0x10) >> 4) << np.uint32(j)
        qh |= np.uint32((c1 & 0x10) >> 4) << np.uint32(j + HALF)
    if QH_OFFSET[qtype] >= 0:
        _store_u32(out, b, QH_OFFSET[qtype], qh)


@njit(cache=True, inline="always")
def _block_extremes(row, start, qk):
    """The smallest and largest value of row[start:start + qk] (NaN/infinity among them if the
    block holds one), by integer min/max over order keys (a float one does not vectorise).
    ``qk`` (32) comes from the caller at run time: with a constant trip count LLVM unrolls the
    loop into a scalar chain of compares instead of vectorising it."""
    first = row[start]
    key_max = order_key(first)
    key_min = key_max
    for j in range(qk):
        key = order_key(row[start + j])
        key_max = max(key_max, key)
        key_min = min(key_min, key)
    return from_order_key(key_min, first), from_order_key(key_max, first)


@njit(cache=True, inline="always")
def _first_zero(row, start):
    """The first zero of the block, with its sign: GGML's strict < and > keep the first of
    +0 and -0 where the key order puts -0 first."""
    for j in range(U64(QK)):
        v = finite_to_float32(row[start + j])
        if v == np.float32(0.0):
            return v
    return np.float32(0.0)


@njit(cache=True, inline="always")
def _quantize_block_ref(row, start, qk, qtype, out, b):
    """One block (``qk`` = 32 values) by GGML's quantize_row_*_ref arithmetic; return 1 if it
    holds NaN/inf.

    Each quant loop has one body without branches, in int32 (``_c_int32``: cvttss2si; the
    int8_t / uint8_t casts: the low byte), so that LLVM vectorises it."""
    low, high = _block_extremes(row, start, qk)
    if not (np.isfinite(low) and np.isfinite(high)):
        out[b, :] = 0
        return 1
    if qtype == Q8_0:
        amax = np.float32(0.0)
        for j in range(U64(QK)):
            amax = max(amax, abs(finite_to_float32(row[start + j])))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
        store_half(out, b, 0, d)
        for j in range(U64(QK)):
            q = _c_roundf_int(finite_to_float32(row[start + j]) * inv)
            out[b, U64(2) + j] = np.uint8(q & 0xFF)
        return 0
    qs = U64(QS_OFFSET[qtype])
    if qtype == Q4_0 or qtype == Q5_0:
        # GGML keeps the first value of largest magnitude, sign kept (+0 if all are zeros);
        # it maps to -8 (-16)
        if high > -low:
            extreme = high
        elif -low > high:
            extreme = low
        elif high == np.float32(0.0):
            extreme = np.float32(0.0)
        else:  # both +m and -m occur: rare
            extreme = high
            for j in range(U64(QK)):
                v = finite_to_float32(row[start + j])
                if abs(v) == high:
                    extreme = v
                    break
        levels = np.float32(8.0) if qtype == Q4_0 else np.float32(16.0)
        d = extreme / -levels
        inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
        store_half(out, b, 0, d)
        # GGML truncates x * id + 8.5 (16.5) to int8, then takes min with 15 (31)
        offset = levels + np.float32(0.5)
        if qtype == Q4_0:
            for j in range(U64(HALF)):
                x0 = finite_to_float32(row[start + j]) * inv
                x1 = finite_to_float32(row[start + U64(HALF) + j]) * inv
                c0 = min(np.int32(15), np.int32(np.int8(_c_int32(x0 + offset))))
                c1 = min(np.int32(15), np.int32(np.int8(_c_int32(x1 + offset))))
                out[b, qs + j] = np.uint8((c0 & np.int32(0x0F)) | ((c1 & np.int32(0x0F)) << np.int32(4)))
            return 0
        qh = np.uint32(0)
        for j in range(U64(HALF)):
            x0 = finite_to_float32(row[start + j]) * inv
            x1 = finite_to_float32(row[start + U64(HALF) + j]) * inv
            c0 = min(np.int32(31), np.int32(np.int8(_c_int32(x0 + offset))))
            c1 = min(np.int32(31), np.int32(np.int8(_c_int32(x1 + offset))))
            out[b, qs + j] = np.uint8((c0 & np.int32(0x0F)) | ((c1 & np.int32(0x0F)) << np.int32(4)))
            qh |= (np.uint32((c0 & np.int32(0x10)) >> np.int32(4)) << np.uint32(j)) | (
                np.uint32((c1 & np.int32(0x10)) >> np.int32(4)) << np.uint32(j + U64(HALF))
            )
        _store_u32(out, b, QH_OFFSET[qtype], qh)
        return 0
    # Q4_1 / Q5_1: d = (max - min) / 15 (31), m = min; of equal zeros GGML keeps the first
    if low == np.float32(0.0):
        low = _first_zero(row, start)
    if high == np.float32(0.0):
        high = _first_zero(row, start)
    steps = np.float32(15.0) if qtype == Q4_1 else np.float32(31.0)
    d = (high - low) / steps
    inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
    store_half(out, b, 0, d)
    store_half(out, b, M_OFFSET[qtype], low)
    half = np.float32(0.5)
    if qtype == Q4_1:  # MIN(15, (int8_t)...)
        for j in range(U64(HALF)):
            x0 = (finite_to_float32(row[start + j]) - low) * inv
            x1 = (finite_to_float32(row[start + U64(HALF) + j]) - low) * inv
            c0 = min(np.int32(15), np.int32(np.int8(_c_int32(x0 + half))))
            c1 = min(np.int32(15), np.int32(np.int8(_c_int32(x1 + half))))
            out[b, qs + j] = np.uint8((c0 & np.int32(0x0F)) | ((c1 & np.int32(0x0F)) << np.int32(4)))
        return 0
    qh = np.uint32(0)
    for j in range(U64(HALF)):  # Q5_1: (uint8_t)... with no clamp
        x0 = (finite_to_float32(row[start + j]) - low) * inv
        x1 = (finite_to_float32(row[start + U64(HALF) + j]) - low) * inv
        c0 = _c_int32(x0 + half)
        c1 = _c_int32(x1 + half)
        out[b, qs + j] = np.uint8((c0 & np.int32(0x0F)) | ((c1 & np.int32(0x0F)) << np.int32(4)))
        qh |= (np.uint32((c0 & np.int32(0x10)) >> np.int32(4)) << np.uint32(j)) | (
            np.uint32((c1 & np.int32(0x10)) >> np.int32(4)) << np.uint32(j + U64(HALF))
        )
    _store_u32(out, b, QH_OFFSET[qtype], qh)
    return 0


@njit(cache=True, inline="always")
def _qx_levels(xb, iscale, nmax, levels):
    """levels[i] = float(MAX(-nmax, MIN(nmax - 1, nearest_int(iscale * xb[i])))), in int32 and
    without branches: a vectorised pass, kept out of the sequential float sums (in one loop
    with them, the scalar int -> float conversions cost more than twice the sums)."""
    low = np.int32(-nmax)
    high = np.int32(nmax - 1)
    for i in range(xb.shape[0]):
        bits = np.float32(iscale * xb[i] + _ROUND_MAGIC).view(np.int32)
        l = np.int32(np.int32(bits & np.int32(0x007FFFFF)) - np.int32(0x00400000))
        levels[i] = np.float32(max(low, min(high, l)))


@njit(cache=True)
def make_qx_quants(xb, weight, nmax, codes):
    """GGML's make_qx_quants with weights (rmse_type 1): codes[i] = l + nmax; returns d."""
    n = xb.shape[0]
    amax = np.float32(0.0)
    extreme = np.float32(0.0)
    for i in range(n):
        ax = abs(xb[i])
        if ax > amax:
            amax = ax
            extreme = xb[i]
    if amax < _GROUP_MAX_EPS:
        for i in range(n):
            codes[i] = 0
        return np.float32(0.0)
    levels = np.empty(n, dtype=np.float32)
    fmax = np.float32(nmax)
    iscale = -fmax / extreme
    _qx_levels(xb, iscale, nmax, levels)
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        fl = levels[i]
        codes[i] = np.int64(fl) + nmax
        sumlx += weight[i] * xb[i] * fl
        suml2 += weight[i] * fl * fl
    scale = sumlx / suml2 if suml2 != np.float32(0.0) else np.float32(0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fmax + np.float32(0.1) * np.float32(step)) / extreme
        _qx_levels(xb, iscale, nmax, levels)
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            fl = levels[i]
            sumlx += weight[i] * xb[i] * fl
            suml2 += weight[i] * fl * fl
        if suml2 > np.float32(0.0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                codes[i] = np.int64(levels[i]) + nmax
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True)
def _make_qkx3_quants(xb, weight, nmax, codes, aux):
    """GGML's make_qkx3_quants(rmin=-0.9, rdelta=0.05, nstep=36, use_mad=false) with weights:
    codes[i] in [0, nmax]; returns (d, m) with value ~ d * code + m."""
    n = xb.shape[0]
    low = xb[0]
    high = xb[0]
    sum_w = weight[0]
    sum_x = sum_w * xb[0]
    for i in range(1, n):
        if xb[i] < low:
            low = xb[i]
        if xb[i] > high:
            high = xb[i]
        sum_w += weight[i]
        sum_x += weight[i] * xb[i]
    if low > np.float32(0.0):
        low = np.float32(0.0)
    if high <= low:
        for i in range(n):
            codes[i] = 0
        return np.float32(0.0), low
    fmax = np.float32(nmax)
    iscale = fmax / (high - low)
    scale = np.float32(1.0) / iscale
    best_mad = np.float32(0.0)
    for i in range(n):
        l = max(0, min(nmax, nearest_int(iscale * (xb[i] - low))))
        codes[i] = l
        diff = scale * np.float32(l) + low - xb[i]
        best_mad += weight[i] * (diff * diff)
    for step in range(37):
        iscale = (np.float32(-0.9) + np.float32(0.05) * np.float32(step) + fmax) / (high - low)
        sum_l = np.float32(0.0)
        sum_l2 = np.float32(0.0)
        sum_xl = np.float32(0.0)
        for i in range(n):
            l = max(0, min(nmax, nearest_int(iscale * (xb[i] - low))))
            aux[i] = l
            fl = np.float32(l)
            sum_l += weight[i] * fl
            sum_l2 += weight[i] * fl * fl
            sum_xl += weight[i] * fl * xb[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > np.float32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > np.float32(0.0):
                this_min = np.float32(0.0)
                this_scale = sum_xl / sum_l2
            mad = np.float32(0.0)
            for i in range(n):
                diff = this_scale * np.float32(aux[i]) + this_min - xb[i]
                mad += weight[i] * (diff * diff)
            if mad < best_mad:
                for i in range(n):
                    codes[i] = aux[i]
                best_mad = mad
                scale = this_scale
                low = this_min
    return scale, low


@njit(cache=True)
def _quantize_row_weighted(row, qtype, quant_weights, out, first_block, xb, weight, codes, aux):
    """One row by GGML's quantize_row_q*_impl with quant_weights; returns its non-finite blocks."""
    k = row.shape[0]
    non_finite = 0
    sum_x2 = np.float32(0.0)
    for j in range(k):  # sequential float32 sum, as GGML's loop
        v = to_float32(row[j])
        sum_x2 += v * v
    if not np.isfinite(sum_x2):
        # a NaN/inf, or a sum past float32's range (which GGML carries on with): find out which
        for j in range(k):
            if not np.isfinite(to_float32(row[j])):
                non_finite = 1
                break
        if non_finite:
            for ib in range(k // QK):
                out[first_block + ib, :] = 0
            return k // QK
    sigma2 = sum_x2 / np.float32(k)
    for ib in range(k // QK):
        b = first_block + ib
        for j in range(QK):
            v = finite_to_float32(row[ib * QK + j])
            xb[j] = v
            weight[j] = quant_weights[ib * QK + j] * np.float32(np.sqrt(sigma2 + v * v))
        if qtype == Q4_0 or qtype == Q5_0:
            d = make_qx_quants(xb, weight, 8 if qtype == Q4_0 else 16, codes)
            store_half(out, b, 0, d)
        else:
            d, low = _make_qkx3_quants(xb, weight, 15 if qtype == Q4_1 else 31, codes, aux)
            store_half(out, b, 0, d)
            store_half(out, b, M_OFFSET[qtype], low)
        _store_nibbles(out, b, qtype, codes)
    return 0


@njit(parallel=True, cache=True, nogil=True)
def quantize_rows_legacy(x, qtype, out, quant_weights=None):
    """Quantize every row of ``x`` (rows, k), k % 32 == 0, to type code ``qtype`` into ``out``
    (rows * k // 32, BLOCK_BYTES[qtype]) uint8, C-contiguous, blocks in row-major order.

    ``x`` is float32, or raw bfloat16 (uint16) / float16 (int16) bits.  ``quant_weights``
    (k,) float32, finite and >= 0, selects GGML's weighted search (ignored by Q8_0).
    Returns the number of blocks holding a NaN or infinity (zeroed; the caller refuses them);
    with weights, every block of such a row counts (the row's mean square is undefined).
    """
    rows, k = x.shape
    blocks_per_row = k // QK
    non_finite = 0
    if quant_weights is None or qtype == Q8_0:
        for r in prange(rows):
            row = x[r]
            first = U64(r * blocks_per_row)
            qk = U64(k // max(blocks_per_row, 1))  # QK (k % 32 == 0), unknown to LLVM (see _block_extremes)
            for i in range(U64(blocks_per_row)):
                non_finite += _quantize_block_ref(row, i * qk, qk, qtype, out, first + i)
    else:
        for r in prange(rows):
            xb = np.empty(QK, dtype=np.float32)
            weight = np.empty(QK, dtype=np.float32)
            codes = np.empty(QK, dtype=np.int64)
            aux = np.empty(QK, dtype=np.int64)
            non_finite += _quantize_row_weighted(x[r], qtype, quant_weights, out, r * blocks_per_row, xb, weight, codes, aux)
    return non_finite


@njit(cache=True, inline="always")
def load_half(blocks, b, offset):
    bits = np.uint16(blocks[b, U64(offset)]) | (np.uint16(blocks[b, U64(offset + 1)]) << np.uint16(8))
    return to_float32(np.int16(bits))


@njit(parallel=True, cache=True, nogil=True)
def dequantize_blocks_legacy(blocks, qtype, out):
    """Dequantize ``blocks`` (n, BLOCK_BYTES[qtype]) uint8 into ``out`` (n, 32) float32,
    as GGML's dequantize_row_*: d * q (Q8_0), d * (q - 8) / (q - 16), d * q + m."""
    qs = U64(QS_OFFSET[qtype])
    for b in prange(blocks.shape[0]):
        d = load_half(blocks, b, 0)
        if qtype == Q8_0:
            for j in range(U64(QK)):
                out[b, j] = np.float32(np.int8(blocks[b, qs + j])) * d
            continue
        qh = np.uint32(0)
        if QH_OFFSET[qtype] >= 0:
            for i in range(4):
                qh |= np.uint32(blocks[b, U64(QH_OFFSET[qtype] + i)]) << np.uint32(8 * i)
        m = load_half(blocks, b, M_OFFSET[qtype]) if M_OFFSET[qtype] >= 0 else np.float32(0.0)
        bias = 8 if qtype == Q4_0 else (16 if qtype == Q5_0 else 0)
        for j in range(U64(HALF)):
            byte = np.int64(blocks[b, qs + j])
            q0 = (byte & 0x0F) | np.int64(((qh >> np.uint32(j)) << np.uint32(4)) & np.uint32(0x10))
            q1 = (byte >> 4) | np.int64((qh >> np.uint32(j + U64(12))) & np.uint32(0x10))
            if bias:
                out[b, j] = np.float32(q0 - bias) * d
                out[b, j + U64(HALF)] = np.float32(q1 - bias) * d
            else:
                out[b, j] = np.float32(q0) * d + m
                out[b, j + U64(HALF)] = np.float32(q1) * d + m
