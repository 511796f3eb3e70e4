"""Q8K quantization kernels, bit-exact with GGML and Candle.

A Q8K super-block holds ``QK_K`` = 256 consecutive values of one row and is stored in
``BLOCK_BYTES`` = 292 little-endian bytes: ``d`` float32 (bytes 0..4), ``qs`` int8[256]
(4..260), ``bsums`` int16[16] (260..292, the sum of each group of 16 ``qs``).

Three rounding variants exist in the wild; they differ only in the inverse scale and
in how ties round (see ``docs/formats.md``).  All arithmetic is float32 and no
fused multiply-add is allowed (numba does not contract without ``fastmath``).
"""

import numpy as np
from numba import njit, prange
from qstrat.kernels.decode import source_index, to_float32

QK_K = 256
BSUM_GROUP = 16
D_OFFSET = 0
QS_OFFSET = 4
BSUMS_OFFSET = QS_OFFSET + QK_K
BLOCK_BYTES = BSUMS_OFFSET + 2 * (QK_K // BSUM_GROUP)  # 292

# Integer codes the kernels take; the names are what users write.
VARIANT_CANDLE = 0  # candle >= 0.11: iscale = -127/max, round half away from zero
VARIANT_CANDLE_0_9 = 1  # candle 0.9/0.10: iscale = -128/max, round half away, clamp to 127
VARIANT_GGML = 2  # ggml reference: iscale = -127/max, round half to even
VARIANT_CODES = {"candle": VARIANT_CANDLE, "candle-0.9": VARIANT_CANDLE_0_9, "ggml": VARIANT_GGML}


@njit(inline="always", cache=True)
def _store_u32_le(dst, offset, value):
    dst[offset] = np.uint8(value & np.uint32(0xFF))
    dst[offset + 1] = np.uint8((value >> np.uint32(8)) & np.uint32(0xFF))
    dst[offset + 2] = np.uint8((value >> np.uint32(16)) & np.uint32(0xFF))
    dst[offset + 3] = np.uint8((value >> np.uint32(24)) & np.uint32(0xFF))


@njit(inline="always", cache=True)
def _load_f32_le(src, offset):
    bits = (
        np.uint32(src[offset])
        | (np.uint32(src[offset + 1]) << np.uint32(8))
        | (np.uint32(src[offset + 2]) << np.uint32(16))
        | (np.uint32(src[offset + 3]) << np.uint32(24))
    )
    return np.uint32(bits).view(np.float32)


@njit(inline="always", cache=True)
def _zero_block(block):
    for i in range(BLOCK_BYTES):
        block[i] = np.uint8(0)


# A block's values are src[source_index(idx, j)], j in 0..255: either a 256-long slice of the
# row (idx None) or the whole row gathered through a 256-long slice of an unsigned permutation.
# Indexing a slice with the loop counter (or with unsigned indices) spares numba's negative-index
# wraparound check, which is what stops LLVM from vectorising these loops.


@njit(cache=True, fastmath={"nnan", "ninf"})
def _block_abs_max(src, idx):
    # Inputs are checked finite before any kernel runs, so the no-NaN/no-Inf flags are exact
    # here; they let LLVM vectorise the max reduction (max is associative, nothing is rounded).
    amax = np.float32(0.0)
    for j in range(QK_K):
        a = abs(to_float32(src[source_index(idx, j)]))
        amax = a if a > amax else amax
    return amax


@njit(cache=True)
def _quantize_block(src, idx, variant, block):
    amax = _block_abs_max(src, idx)
    if amax == np.float32(0.0):
        _zero_block(block)
        return
    # The extreme is the signed value of largest magnitude; the first one wins a tie.
    extreme = np.float32(0.0)
    for j in range(QK_K):
        v = to_float32(src[source_index(idx, j)])
        if abs(v) == amax:
            extreme = v
            break
    if variant == VARIANT_CANDLE_0_9:
        iscale = np.float32(-128.0) / extreme
    else:
        iscale = np.float32(-127.0) / extreme
    if not np.isfinite(iscale):
        # |max| below ~3.7e-37: no meaningful quants exist; the block dequantizes to zeros.
        _zero_block(block)
        return
    _store_quants(src, idx, iscale, variant != VARIANT_GGML, block)
    for g in range(QK_K // BSUM_GROUP):
        group_sum = 0
        for j in range(BSUM_GROUP):
            group_sum += np.int32(np.int8(block[QS_OFFSET + g * BSUM_GROUP + j]))
        s = np.uint32(group_sum & 0xFFFF)
        block[BSUMS_OFFSET + 2 * g] = np.uint8(s & np.uint32(0xFF))
        block[BSUMS_OFFSET + 2 * g + 1] = np.uint8(s >> np.uint32(8))
    d = np.float32(1.0) / iscale
    _store_u32_le(block, D_OFFSET, np.float32(d).view(np.uint32))


@njit(cache=True)
def _store_quants(src, idx, iscale, ties_away, block):
    half = np.float32(0.5)
    qs = block[QS_OFFSET : QS_OFFSET + QK_K].view(np.int8)
    for j in range(QK_K):
        scaled = iscale * to_float32(src[source_index(idx, j)])
        rounded = np.rint(scaled)  # ties to even: GGML's nearest_int
        # Rust's f32::round rounds ties away from zero; scaled +- 0.5 is exact here.  Written
        # as a select, not a branch, so that the loop vectorises.
        away = scaled + np.copysign(half, scaled)
        rounded = away if ties_away and abs(scaled - rounded) == half else rounded
        # |scaled| <= 128 by construction, so one clamp is each variant's own clamp
        # (ggml: min(127, v); candle: clamp(-128, 127); candle 0.9: min(127) + saturating cast).
        rounded = min(max(rounded, np.float32(-128.0)), np.float32(127.0))
        qs[j] = np.int8(np.int32(rounded))


@njit(parallel=True, cache=True)
def quantize_rows_q8k(x, row_perm, col_perm, variant, out):
    """Quantize every row of ``x`` (rows, k) into ``out`` (rows * k // 256, 292) uint8.

    ``x`` is float32, or raw bfloat16 (uint16) / float16 (int16) bits; ``k % 256 == 0``.
    ``row_perm`` and ``col_perm`` are None, or unsigned gather maps applied on the fly:
    stored element (i, j) is x[row_perm[i], col_perm[j]] (no permuted or float32 copy of
    ``x`` is made).  Blocks never cross rows and come out in row-major order.
    """
    rows, k = x.shape
    blocks_per_row = k // QK_K
    for b in prange(rows * blocks_per_row):
        r = b // blocks_per_row
        start = (b - r * blocks_per_row) * QK_K
        row = x[source_index(row_perm, r)]
        if col_perm is None:
            _quantize_block(row[start : start + QK_K], None, variant, out[b])
        else:
            _quantize_block(row, col_perm[start : start + QK_K], variant, out[b])


@njit(parallel=True, cache=True)
def dequantize_q8k_blocks(blocks, out):
    """Dequantize ``blocks`` (n, 292) uint8 into ``out`` (n, 256) float32: ``d * qs``."""
    for b in prange(blocks.shape[0]):
        d = _load_f32_le(blocks[b], D_OFFSET)
        for j in range(QK_K):
            q = np.int8(blocks[b, QS_OFFSET + j])
            out[b, j] = d * np.float32(q)


@njit(parallel=True, cache=True)
def first_nonfinite_index(x):
    """Flat row-major index of the first NaN or infinity in ``x`` (rows, k), or -1."""
    rows, k = x.shape
    first_in_row = np.full(rows, -1, dtype=np.int64)
    for r in prange(rows):
        for j in range(k):
            if not np.isfinite(to_float32(x[r, j])):
                first_in_row[r] = r * k + j
                break
    for r in range(rows):
        if first_in_row[r] >= 0:
            return first_in_row[r]
    return -1
