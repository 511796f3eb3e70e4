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
from qstrat.kernels.decode import from_order_key, order_key, source_index, to_float32

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
def _load_f32_le(src, offset):
    bits = (
        np.uint32(src[offset])
        | (np.uint32(src[offset + 1]) << np.uint32(8))
        | (np.uint32(src[offset + 2]) << np.uint32(16))
        | (np.uint32(src[offset + 3]) << np.uint32(24))
    )
    return np.uint32(bits).view(np.float32)


# Kernel-side indices are unsigned: numba adds a negative-index wraparound check to every
# signed index, and that check is what stops LLVM from vectorising these loops.
_U = np.uint64
# Adding and subtracting 1.5 * 2**23 rounds a float32 of magnitude < 2**22 to the nearest
# integer, ties to even (GGML's nearest_int); numba never reassociates without fastmath.
_ROUND_MAGIC = np.float32(12582912.0)


@njit(cache=True)
def _block_extremes(row, perm, start):
    """The smallest and largest value of the block row[source_index(perm, start + j)], j < 256."""
    first = row[source_index(perm, start)]
    key_max = order_key(first)
    key_min = key_max
    for j in range(_U(QK_K)):
        key = order_key(row[source_index(perm, start + j)])
        key_max = max(key_max, key)
        key_min = min(key_min, key)
    return from_order_key(key_min, first), from_order_key(key_max, first)


@njit(cache=True, fastmath={"reassoc", "nsz", "nnan", "ninf"})
def _add_small_integers(total, value):
    # Every operand and partial sum is an integer below 2**24 in magnitude, so any order of
    # summation gives the same exact result: reassociation only lets the sum vectorise.
    return total + value


@njit(cache=True)
def _store_quants(row, perm, start, iscale, ties_away, out, b):
    half = np.float32(0.5)
    # One loop body serves every variant (a branch here gets the loop unswitched into a
    # copy that LLVM vectorises badly): |x - rint(x)| is never -1, so ties never go away.
    away_tie = half if ties_away else np.float32(-1.0)
    for g in range(_U(QK_K // BSUM_GROUP)):
        group_sum = np.float32(0.0)
        for j in range(_U(BSUM_GROUP)):
            scaled = iscale * to_float32(row[source_index(perm, start + g * _U(BSUM_GROUP) + j)])
            rounded = (scaled + _ROUND_MAGIC) - _ROUND_MAGIC  # ties to even
            # Rust's f32::round takes ties away from zero; scaled +- 0.5 is exact here.
            away = scaled + np.copysign(half, scaled)
            rounded = away if abs(scaled - rounded) == away_tie else rounded
            # |scaled| <= 128 by construction, so one clamp is each variant's own clamp
            # (ggml: min(127, v); candle: clamp(-128, 127); candle 0.9: min(127) + saturating cast).
            rounded = min(max(rounded, np.float32(-128.0)), np.float32(127.0))
            out[b, _U(QS_OFFSET) + g * _U(BSUM_GROUP) + j] = np.uint8(np.int32(rounded) & 0xFF)
            group_sum = _add_small_integers(group_sum, rounded)
        bits = np.int32(group_sum) & 0xFFFF
        out[b, _U(BSUMS_OFFSET) + _U(2) * g] = np.uint8(bits & 0xFF)
        out[b, _U(BSUMS_OFFSET + 1) + _U(2) * g] = np.uint8(bits >> 8)


@njit(cache=True)
def _quantize_block(row, perm, start, variant, out, b):
    low, high = _block_extremes(row, perm, start)
    # The extreme is the signed value of largest magnitude; the first one wins a tie.
    if high > -low:
        extreme = high
    elif -low > high:
        extreme = low
    elif high == np.float32(0.0):
        out[b, :] = 0
        return
    else:  # both +m and -m occur: rare, so a scalar search is fine
        extreme = high
        for j in range(_U(QK_K)):
            value = to_float32(row[source_index(perm, start + j)])
            if abs(value) == high:
                extreme = value
                break
    if variant == VARIANT_CANDLE_0_9:
        iscale = np.float32(-128.0) / extreme
    else:
        iscale = np.float32(-127.0) / extreme
    if not np.isfinite(iscale):
        # |max| below ~3.7e-37: no meaningful quants exist; the block dequantizes to zeros.
        out[b, :] = 0
        return
    _store_quants(row, perm, start, iscale, variant != VARIANT_GGML, out, b)
    d = np.float32(np.float32(1.0) / iscale).view(np.uint32)
    for i in range(_U(4)):
        out[b, _U(D_OFFSET) + i] = np.uint8((d >> np.uint32(8 * i)) & np.uint32(0xFF))


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
    if col_perm is None:
        for b in prange(rows * blocks_per_row):
            r = b // blocks_per_row
            start = _U((b - r * blocks_per_row) * QK_K)
            _quantize_block(x[source_index(row_perm, r)], None, start, variant, out, _U(b))
    else:
        # Gathering a row once into a small contiguous buffer (it stays in cache) costs less
        # than gathering every element twice inside the block passes.
        for r in prange(rows):
            row = x[source_index(row_perm, r)]
            gathered = np.empty(k, dtype=x.dtype)
            for j in range(_U(k)):
                gathered[j] = row[col_perm[j]]
            for block in range(blocks_per_row):
                _quantize_block(gathered, None, _U(block * QK_K), variant, out, _U(r * blocks_per_row + block))


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
