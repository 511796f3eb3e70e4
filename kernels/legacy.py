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
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic
from qstrat.kernels.decode import finite_to_float32, from_order_key, magnitude_bits, order_key, to_float32
from qstrat.kernels.ggml_common import importance_weights, inverse_scale, make_qkx_quants, make_qx_quants
from qstrat.kernels.half import float32_to_f16_bits, load_half, store_half, store_half_bits
from qstrat.kernels.jit import kernel
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

_INT_MIN = np.int32(-2147483648)
_TWO_31 = np.float32(2147483648.0)


@kernel(inline="always")
def _c_int32(value):
    """C's float -> int conversion as x86-64 runs it (cvttss2si): truncation toward zero,
    and INT_MIN for NaN, infinity or anything out of range (C leaves that undefined).  A
    select in int32, no branch: the loops using it vectorise."""
    return np.int32(value) if abs(value) < _TWO_31 else _INT_MIN


@kernel(inline="always")
def _c_roundf_int32(value):
    """(int)roundf(value) as int32: ties away from zero, INT_MIN where cvttss2si gives it.
    Selects, no branch, so that Q8_0's rounding loop vectorises."""
    in_range = abs(value) < _TWO_31
    t = np.int32(value) if in_range else np.int32(0)
    frac = value - np.float32(t)  # exact: the fraction of a float32 needs no more bits
    rounded = t + np.int32(frac >= np.float32(0.5)) - np.int32(frac <= np.float32(-0.5))
    return rounded if in_range else _INT_MIN


@kernel(inline="always")
def _store_u32(out, b, offset, value):
    for i in range(4):
        out[b, U64(offset + i)] = np.uint8((value >> np.uint32(8 * i)) & np.uint32(0xFF))


@kernel(inline="always")
def _pack_pair(out, b, qs, j, c0, c1):
    """Codes c0 (value j of the block) and c1 (value j + 16), int32 whose low five bits GGML
    keeps: their low nibbles into byte qs + j; returns their fifth bits at bits j and j + 16 of qh."""
    out[b, qs + j] = np.uint8((c0 & np.int32(0x0F)) | ((c1 & np.int32(0x0F)) << np.int32(4)))
    return (np.uint32((c0 & np.int32(0x10)) >> np.int32(4)) << np.uint32(j)) | (
        np.uint32((c1 & np.int32(0x10)) >> np.int32(4)) << np.uint32(j + U64(HALF))
    )


@kernel(inline="always")
def _store_nibbles(out, b, qtype, codes):
    """Pack 5-bit or 4-bit codes (int64[32], each the uint8 GGML stores): low nibbles of
    j and j + 16 share byte j, the fifth bits go to qh (Q5 types)."""
    qh = np.uint32(0)
    for j in range(U64(HALF)):
        qh |= _pack_pair(out, b, U64(QS_OFFSET[qtype]), j, np.int32(codes[j]), np.int32(codes[j + U64(HALF)]))
    if QH_OFFSET[qtype] >= 0:
        _store_u32(out, b, QH_OFFSET[qtype], qh)


@kernel(inline="always")
def _pack_codes_ref(row, start, low, inv, offset, cap, out, b, qs, code_bytes, five_bits):
    """A block's codes as quantize_row_q{4,5}_{0,1}_ref computes them: low nibbles packed into
    ``out``; with ``five_bits``, each code's low byte into ``code_bytes`` (uint8[32]), whose bit 4
    ``_fifth_bits`` gathers into qh.
    Code = MIN(cap, (int8_t)((x - low) * id + offset)), truncated as cvttss2si (``_c_int32``):
    low = 0 for the _0 types (x - 0 is x exactly), cap = 127 (no clamp: the low five bits kept)
    for Q5_1.  One body without branches, in int32, so that LLVM vectorises it; each caller
    passes constants, so each type gets its own loop."""
    for j in range(U64(HALF)):
        x0 = (finite_to_float32(row[start + j]) - low) * inv
        x1 = (finite_to_float32(row[start + U64(HALF) + j]) - low) * inv
        c0 = min(cap, np.int32(np.int8(_c_int32(x0 + offset))))
        c1 = min(cap, np.int32(np.int8(_c_int32(x1 + offset))))
        out[b, qs + j] = np.uint8((c0 & np.int32(0x0F)) | ((c1 & np.int32(0x0F)) << np.int32(4)))
        if five_bits:
            code_bytes[j] = np.uint8(c0 & np.int32(0xFF))
            code_bytes[j + U64(HALF)] = np.uint8(c1 & np.int32(0xFF))


@intrinsic
def _fifth_bits(typingctx, code_bytes):
    """qh: a uint32 whose bit j is bit 4 of ``code_bytes[j]`` (uint8[32]).  Eight bytes at a time,
    each tested as a vector and its 8 results read as one byte (on x86 with AVX-512 a test into a
    mask register); eight, because the code loop stores them 8 at a time and a load spanning two
    stores waits for both to reach the cache.  Numba has no such vector operation, hence the IR:
    Q5_0 / Q5_1 10-13 % faster than extracting the bits in the code loop and gathering them by
    multiplication."""
    sig = types.uint32(code_bytes)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        lanes = ir.VectorType(ir.IntType(8), 8)
        word = ir.IntType(32)
        qh = ir.Constant(word, 0)
        for first in (0, 8, 16, 24):
            address = builder.bitcast(builder.gep(data, [ir.Constant(ir.IntType(64), first)]), lanes.as_pointer())
            fifth = builder.and_(builder.load(address, align=1), ir.Constant(lanes, [0x10] * 8))
            mask = builder.bitcast(builder.icmp_unsigned("!=", fifth, ir.Constant(lanes, [0] * 8)), ir.IntType(8))
            qh = builder.or_(qh, builder.shl(builder.zext(mask, word), ir.Constant(word, first)))
        return qh

    return sig, codegen


@kernel(inline="always")
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


@kernel(inline="always")
def _first_zero(row, start):
    """The first zero of the block, with its sign: GGML's strict < and > keep the first of
    +0 and -0 where the key order puts -0 first."""
    for j in range(U64(QK)):
        v = finite_to_float32(row[start + j])
        if v == np.float32(0.0):
            return v
    return np.float32(0.0)


@kernel(inline="always")
def _block_ranges(row, qk, qtype, lows, highs):
    """Pass 1 of a row: each block's extremes into ``lows`` / ``highs`` (Q8_0: its largest
    magnitude into ``highs``), NaN/infinity among them if the block holds one.  A reduction
    per block and nothing else, so each block's loop vectorises."""
    if qtype == Q8_0:
        for i in range(U64(lows.shape[0])):
            # GGML's amax: one integer max over the magnitudes' bits (a NaN or infinity among
            # them, beyond every finite one, shows), where the extremes take two
            largest = np.uint32(0)
            for j in range(qk):
                largest = max(largest, magnitude_bits(to_float32(row[i * qk + j])))
            highs[i] = np.uint32(largest).view(np.float32)
        return
    for i in range(U64(lows.shape[0])):
        lows[i], highs[i] = _block_extremes(row, i * qk, qk)


@kernel(inline="always")
def _extreme_tie(row, start, high):
    """Of a block whose largest and smallest values are +high and -high: the first of the two
    in the block, which GGML keeps (+0 if all are zeros)."""
    if high == np.float32(0.0):
        return np.float32(0.0)
    for j in range(U64(QK)):
        v = finite_to_float32(row[start + j])
        if abs(v) == high:
            return v
    return high


@kernel(inline="always")
def _block_scales_ref(row, qtype, lows, highs, invs, d_bits, m_bits, non_finite):
    """Pass 2 of a row: each block's d (and m) by GGML's quantize_row_*_ref arithmetic, as fp16
    bits into ``d_bits`` (``m_bits``); 1 / d (or 0) into ``invs``, and for Q4_1 / Q5_1 the m
    pass 3 subtracts into ``lows``; ``non_finite[i]`` = 1 for a block holding NaN/inf, whose d and
    codes are zeroed.  Returns how many do.  The common case is one loop of selects over the
    blocks, so it vectorises; GGML's tie-breaks (which of +-m, which zero) are rare, and redone
    block by block afterwards."""
    blocks = U64(lows.shape[0])
    count = 0
    rare = False
    zero = np.float32(0.0)
    if qtype == Q8_0:
        for i in range(blocks):
            bad = not np.isfinite(highs[i])
            d = highs[i] / np.float32(127.0)
            invs[i] = zero if bad else inverse_scale(d)
            d_bits[i] = float32_to_f16_bits(d)
            non_finite[i] = np.uint8(bad)
            count += np.int64(bad)
    elif qtype == Q4_0 or qtype == Q5_0:
        # GGML keeps the first value of largest magnitude, sign kept, and maps it to -8 (-16).
        # A select, not a branch: which side wins is a coin toss per block
        levels = np.float32(-8.0) if qtype == Q4_0 else np.float32(-16.0)
        for i in range(blocks):
            low, high = lows[i], highs[i]
            bad = not (np.isfinite(low) and np.isfinite(high))
            rare |= high == -low  # a tie: all zeros, or both +m and -m occur
            d = (high if high > -low else low) / levels
            invs[i] = zero if bad else inverse_scale(d)
            d_bits[i] = float32_to_f16_bits(d)
            non_finite[i] = np.uint8(bad)
            count += np.int64(bad)
        if rare:
            for i in range(blocks):
                if highs[i] == -lows[i] and not non_finite[i]:
                    d = _extreme_tie(row, i * U64(QK), highs[i]) / levels
                    invs[i] = inverse_scale(d)
                    d_bits[i] = float32_to_f16_bits(d)
    else:  # Q4_1 / Q5_1: d = (max - min) / 15 (31), m = min
        steps = np.float32(15.0) if qtype == Q4_1 else np.float32(31.0)
        for i in range(blocks):
            low, high = lows[i], highs[i]
            bad = not (np.isfinite(low) and np.isfinite(high))
            rare |= (low == zero) | (high == zero)
            d = (high - low) / steps
            invs[i] = zero if bad else inverse_scale(d)
            lows[i] = zero if bad else low
            d_bits[i] = float32_to_f16_bits(d)
            m_bits[i] = float32_to_f16_bits(low)
            non_finite[i] = np.uint8(bad)
            count += np.int64(bad)
        if rare:  # of equal zeros (+0, -0) GGML keeps the first
            for i in range(blocks):
                low, high = lows[i], highs[i]
                if (low == zero or high == zero) and not non_finite[i]:
                    low = _first_zero(row, i * U64(QK)) if low == zero else low
                    high = _first_zero(row, i * U64(QK)) if high == zero else high
                    d = (high - low) / steps
                    invs[i] = inverse_scale(d)
                    lows[i] = low
                    d_bits[i] = float32_to_f16_bits(d)
                    m_bits[i] = float32_to_f16_bits(low)
    return count


@kernel
def _quantize_row_ref(row, qtype, out, first, lows, highs, invs, d_bits, m_bits, non_finite, code_bytes):
    """One row by GGML's quantize_row_*_ref arithmetic, in three passes over its blocks: ranges,
    scales, codes.  Block by block in one loop, the scale's scalar work sat between two vector
    loops; in passes, each loop vectorises (all cores, Q4_0: +30 %).  Returns the number of
    blocks holding NaN/inf (zeroed).  Scratch, one element per block: ``lows``, ``highs``,
    ``invs`` float32, ``d_bits``, ``m_bits`` uint16, ``non_finite`` uint8; ``code_bytes``: uint8[32],
    for the Q5 types' fifth bits."""
    k = row.shape[0]
    blocks = k // QK
    qk = U64(k // max(blocks, 1))  # QK (k % 32 == 0), unknown to LLVM (see _block_extremes)
    _block_ranges(row, qk, qtype, lows, highs)
    count = _block_scales_ref(row, qtype, lows, highs, invs, d_bits, m_bits, non_finite)
    # one loop per type, each with its constants: a type test inside the loop kept it scalar
    qs = U64(QS_OFFSET[qtype])
    half = np.float32(0.5)
    if qtype == Q8_0:
        for i in range(U64(blocks)):
            store_half_bits(out, first + i, 0, d_bits[i])
            inv = invs[i]
            for j in range(qk):
                q = _c_roundf_int32(finite_to_float32(row[i * qk + j]) * inv)
                out[first + i, qs + j] = np.uint8(q & np.int32(0xFF))
    # GGML truncates x * id + 8.5 (16.5) to int8, then takes min with 15 (31); Q4_1 / Q5_1
    # truncate (x - m) * id + 0.5, Q5_1 to uint8 (no clamp: the low five bits kept)
    elif qtype == Q4_0:
        for i in range(U64(blocks)):
            store_half_bits(out, first + i, 0, d_bits[i])
            _pack_codes_ref(row, i * qk, np.float32(0.0), invs[i], np.float32(8.5), np.int32(15), out, first + i, qs, code_bytes, False)
    elif qtype == Q4_1:
        for i in range(U64(blocks)):
            store_half_bits(out, first + i, 0, d_bits[i])
            store_half_bits(out, first + i, M_OFFSET[Q4_1], m_bits[i])
            _pack_codes_ref(row, i * qk, lows[i], invs[i], half, np.int32(15), out, first + i, qs, code_bytes, False)
    elif qtype == Q5_0:
        for i in range(U64(blocks)):
            store_half_bits(out, first + i, 0, d_bits[i])
            _pack_codes_ref(row, i * qk, np.float32(0.0), invs[i], np.float32(16.5), np.int32(31), out, first + i, qs, code_bytes, True)
            _store_u32(out, first + i, QH_OFFSET[Q5_0], _fifth_bits(code_bytes))
    else:
        for i in range(U64(blocks)):
            store_half_bits(out, first + i, 0, d_bits[i])
            store_half_bits(out, first + i, M_OFFSET[Q5_1], m_bits[i])
            _pack_codes_ref(row, i * qk, lows[i], invs[i], half, np.int32(127), out, first + i, qs, code_bytes, True)
            _store_u32(out, first + i, QH_OFFSET[Q5_1], _fifth_bits(code_bytes))
    if count:  # blocks holding NaN/inf are zeroed (the caller refuses them)
        for i in range(U64(blocks)):
            if non_finite[i]:
                out[first + i, :] = 0
    return count


@kernel
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
            xb[j] = finite_to_float32(row[ib * QK + j])
        importance_weights(xb, quant_weights[ib * QK : ib * QK + QK], sigma2, weight)
        if qtype == Q4_0 or qtype == Q5_0:
            store_half(out, b, 0, make_qx_quants(xb, weight, 8 if qtype == Q4_0 else 16, codes))
        else:  # make_qkx3_quants(rmin -0.9, rdelta 0.05, nstep 36, no mad); a literal nmax reuses
            # the search compiled for Q4_K / Q5_K's
            if qtype == Q4_1:
                d, the_min = make_qkx_quants(xb, weight, 15, codes, aux, np.float32(-0.9), np.float32(0.05), 36, False)
            else:
                d, the_min = make_qkx_quants(xb, weight, 31, codes, aux, np.float32(-0.9), np.float32(0.05), 36, False)
            store_half(out, b, 0, d)
            store_half(out, b, M_OFFSET[qtype], -the_min)
        _store_nibbles(out, b, qtype, codes)
    return 0


@kernel(parallel=True, nogil=True)
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
        # rows in chunks, so that a task's scratch serves several rows (at most 256 tasks)
        chunk = max(1, min(16, rows // 256))
        for c in prange((rows + chunk - 1) // chunk):
            lows = np.empty(blocks_per_row, dtype=np.float32)
            highs = np.empty(blocks_per_row, dtype=np.float32)
            invs = np.empty(blocks_per_row, dtype=np.float32)
            d_bits = np.empty(blocks_per_row, dtype=np.uint16)
            m_bits = np.empty(blocks_per_row, dtype=np.uint16)
            row_non_finite = np.empty(blocks_per_row, dtype=np.uint8)
            code_bytes = np.empty(QK, dtype=np.uint8)
            chunk_non_finite = 0
            for r in range(c * chunk, min(rows, c * chunk + chunk)):
                chunk_non_finite += _quantize_row_ref(
                    x[r], qtype, out, U64(r * blocks_per_row), lows, highs, invs, d_bits, m_bits, row_non_finite, code_bytes
                )
            non_finite += chunk_non_finite
    else:
        for r in prange(rows):
            xb = np.empty(QK, dtype=np.float32)
            weight = np.empty(QK, dtype=np.float32)
            codes = np.empty(QK, dtype=np.int64)
            aux = np.empty((6, QK), dtype=np.float32)  # make_qkx_quants' scratch
            non_finite += _quantize_row_weighted(x[r], qtype, quant_weights, out, r * blocks_per_row, xb, weight, codes, aux)
    return non_finite


@kernel(parallel=True, nogil=True)
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
