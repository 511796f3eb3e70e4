"""Q8K quantization kernels, bit-exact with GGML and Candle (layout: ``layout.py``).

Three rounding variants exist in the wild; they differ only in the inverse scale and
in how ties round (see ``docs/formats.md``).  All arithmetic is float32 and no
fused multiply-add is allowed (numba does not contract without ``fastmath``).
"""

import numpy as np
from numba import prange
from qstrat.kernels.decode import finite_to_float32, from_order_key, order_key, source_index, to_float32
from qstrat.kernels.jit import kernel
from qstrat.kernels.layout import (
    BSUM_GROUP,
    BSUMS_OFFSET,
    D_OFFSET,
    QK_K,
    QS_OFFSET,
    U64,
    block_quant,
    block_scale,
    group_quant_sum,
)
from qstrat.kernels.metrics import accumulate_block_measures, fused_probes, measure_columns

# Integer codes the kernels take; the names are what users write.
VARIANT_CANDLE = 0  # candle >= 0.11: iscale = -127/max, round half away from zero
VARIANT_CANDLE_0_9 = 1  # candle 0.9/0.10: iscale = -128/max, round half away, clamp to 127
VARIANT_GGML = 2  # ggml reference: iscale = -127/max, round half to even
VARIANT_CODES = {"candle": VARIANT_CANDLE, "candle-0.9": VARIANT_CANDLE_0_9, "ggml": VARIANT_GGML}


# Adding and subtracting 1.5 * 2**23 rounds a float32 of magnitude < 2**22 to the nearest
# integer, ties to even (GGML's nearest_int); numba never reassociates without fastmath.
_ROUND_MAGIC = np.float32(12582912.0)


@kernel
def _quantize_block(row, start, variant, out, b):
    """Quantize row[start:start + 256] into out[b]; return 1 if it holds a NaN or infinity (out[b]
    is then zeros).  ``row`` is contiguous: a permuted row is gathered before.  (One function:
    each compiled helper costs a first run about a tenth of a second.)"""
    # the block's smallest and largest value, by integer keys (an integer min/max vectorises).
    # Here and below, selects rather than the builtin min/max: each of their type pairs is one
    # more function for a first run to compile.
    first = row[start]
    key_max = order_key(first)
    key_min = key_max
    for j in range(U64(QK_K)):
        key = order_key(row[start + j])
        key_max = key if key > key_max else key_max
        key_min = key if key < key_min else key_min
    low, high = from_order_key(key_min, first), from_order_key(key_max, first)
    if not (np.isfinite(low) and np.isfinite(high)):
        out[b, :] = 0
        return 1
    # The extreme is the signed value of largest magnitude; the first one wins a tie.
    if high > -low:
        extreme = high
    elif -low > high:
        extreme = low
    elif high == np.float32(0.0):
        out[b, :] = 0
        return 0
    else:  # both +m and -m occur: rare, so a scalar search is fine
        extreme = high
        for j in range(U64(QK_K)):
            value = to_float32(row[start + j])
            if abs(value) == high:
                extreme = value
                break
    if variant == VARIANT_CANDLE_0_9:
        iscale = np.float32(-128.0) / extreme
    else:
        iscale = np.float32(-127.0) / extreme
    if not np.isfinite(iscale):
        # |max| below ~3.7e-37: GGML's quants are all zero here (its nearest_int of +-inf and of NaN),
        # and its d is 1 / iscale, a zero of the sign opposite to max's
        out[b, :] = 0
    else:
        half = np.float32(0.5)
        # One loop body serves every variant (a branch here gets the loop unswitched into a
        # copy that LLVM vectorises badly): |x - rint(x)| is never -1, so ties never go away.
        away_tie = half if variant != VARIANT_GGML else np.float32(-1.0)
        for j in range(U64(QK_K)):
            scaled = iscale * finite_to_float32(row[start + j])
            rounded = (scaled + _ROUND_MAGIC) - _ROUND_MAGIC  # ties to even
            # Rust's f32::round takes ties away from zero; scaled +- 0.5 is exact here.
            away = scaled + np.copysign(half, scaled)
            rounded = away if abs(scaled - rounded) == away_tie else rounded
            # |scaled| <= 128 by construction, so one clamp is each variant's own clamp
            # (ggml: min(127, v); candle: clamp(-128, 127); candle 0.9: min(127) + saturating cast).
            rounded = np.float32(127.0) if rounded > np.float32(127.0) else rounded
            rounded = np.float32(-128.0) if rounded < np.float32(-128.0) else rounded
            out[b, U64(QS_OFFSET) + j] = np.uint8(np.int32(rounded) & 0xFF)
        # bsums from the stored bytes: a horizontal float sum per group in the loop above cost
        # almost as much as quantizing the group
        for g in range(U64(QK_K // BSUM_GROUP)):
            bits = group_quant_sum(out, b, g) & 0xFFFF
            out[b, U64(BSUMS_OFFSET) + U64(2) * g] = np.uint8(bits & 0xFF)
            out[b, U64(BSUMS_OFFSET + 1) + U64(2) * g] = np.uint8(bits >> 8)
    d = np.float32(np.float32(1.0) / iscale).view(np.uint32)
    for i in range(U64(4)):
        out[b, U64(D_OFFSET) + i] = np.uint8((d >> np.uint32(8 * i)) & np.uint32(0xFF))
    return 0


#: With probe vectors, each task of the row-wise paths walks up to this many rows together,
#: block column by block column: each probe slice is then read from L1 by every row, instead
#: of all of each probe being streamed through L1 once per row (twice as slow at k = 4096).
#: Without probes, one row at a time streams best.
PROBED_CHUNK_ROWS = 8
#: Chunks shrink so that a matrix still splits into at least this many tasks: enough for the
#: threads of a large machine (the thread count itself would keep numba from caching the kernel).
_TASKS_WANTED = 256


def _chunk_rows(rows: int, n_probes: int) -> int:
    """Rows per task of the row-wise paths (see PROBED_CHUNK_ROWS)."""
    if n_probes == 0:
        return 1
    return max(1, min(PROBED_CHUNK_ROWS, rows // _TASKS_WANTED))


@kernel
def _quantize_rows_blockwise(rows_buffer, first, count, variant, out, probes, measures):
    """Quantize stored rows first .. first + count - 1, held in rows_buffer[0 .. count - 1],
    block column by block column, measuring them unless ``measures`` has no columns.
    Returns the number of non-finite blocks."""
    blocks_per_row = rows_buffer.shape[1] // QK_K
    measure = measures.shape[1] > 0
    non_finite = 0
    for i in range(blocks_per_row):
        start = U64(i * QK_K)
        for g in range(count):
            r = first + g
            row = rows_buffer[g]
            b = U64(r * blocks_per_row + i)
            non_finite += _quantize_block(row, start, variant, out, b)
            if measure:
                accumulate_block_measures(row, start, out, b, probes, measures[r])
    return non_finite


def quantize_rows_q8k(x, row_perm, col_perm, variant, out, probes=None, measures=None):
    """Quantize every row of ``x`` (rows, k) into ``out`` (rows * k // 256, 292) uint8, C-contiguous.

    ``x`` is float32, or raw bfloat16 (uint16) / float16 (int16) bits; ``k % 256 == 0``.
    ``row_perm`` and ``col_perm`` are None, or unsigned gather maps applied on the fly:
    stored element (i, j) is x[row_perm[i], col_perm[j]] (no permuted or float32 copy of
    ``x`` is made).  Blocks never cross rows and come out in row-major order.

    With ``measures`` (rows, ``measure_columns(len(probes))``) float64, zeroed, each stored
    row's error measures against its source values are computed in the same pass (see
    ``metrics.py``); ``probes`` (n_probes, k) float32 are vectors in stored column order.

    Returns the number of blocks holding a NaN or infinity (zeroed; the caller refuses them).

    Compiling is most of a first run's time, so the arguments reach the kernels in one type
    each (``x`` read-only, maps and probes always arrays, see ``fused_probes``): every run
    compiles one row-wise kernel per input dtype, and each helper once.
    """
    if measures is not None and (measures.shape[0] != x.shape[0] or measures.shape[1] != measure_columns(probes.shape[0])):
        raise ValueError("measures must be (rows, measure_columns(len(probes))), zeroed: the kernel adds to it")
    source = x.view()
    source.flags.writeable = False
    if col_perm is None and measures is None:
        return _quantize_blocks(source, row_perm, variant, out)
    n_probes = 0 if probes is None else probes.shape[0]
    return _quantize_rows(
        source,
        _gather_map(row_perm),
        _gather_map(col_perm),
        variant,
        out,
        fused_probes(probes, x.shape[1]),
        np.zeros((x.shape[0], 0)) if measures is None else measures,
        _chunk_rows(x.shape[0], n_probes),
    )


def _gather_map(perm):
    """A gather map as ``_quantize_rows`` takes it: writable contiguous uint32, empty for none."""
    return np.zeros(0, np.uint32) if perm is None else np.require(perm, np.uint32, ["C", "W"])


@kernel(parallel=True, nogil=True)  # nogil: a worker writes files meanwhile
def _quantize_blocks(x, row_perm, variant, out):
    """Block by block: parallel even for a tensor of a few long rows."""
    rows, k = x.shape
    blocks_per_row = k // QK_K
    non_finite = 0
    for b in prange(rows * blocks_per_row):
        r = b // blocks_per_row
        row = x[source_index(row_perm, r)]
        non_finite += _quantize_block(row, U64((b - r * blocks_per_row) * QK_K), variant, out, U64(b))
    return non_finite


@kernel(parallel=True, nogil=True)
def _quantize_rows(x, row_perm, col_perm, variant, out, probes, measures, chunk):
    """By chunks of ``chunk`` rows, each copied (through the gather maps; an empty map is the
    identity) into a small contiguous buffer first, so that each row's measures are summed by one
    thread, in block order.  ``measures`` with no columns: none are taken."""
    rows, k = x.shape
    non_finite = 0
    for c in prange((rows + chunk - 1) // chunk):
        first = c * chunk
        count = chunk if chunk < rows - first else rows - first
        # Copying the rows once into a small buffer that stays in cache costs less than
        # gathering every element in each block pass.  Its shape does not depend on the task,
        # so numba allocates it once per thread, not once per task.
        gathered = np.empty((chunk, k), dtype=x.dtype)
        for g in range(count):
            r = first + g
            row = x[row_perm[r] if row_perm.shape[0] else r]
            if col_perm.shape[0]:
                for j in range(U64(k)):
                    gathered[g, j] = row[col_perm[j]]
            else:
                gathered[g, :] = row
        non_finite += _quantize_rows_blockwise(gathered, first, count, variant, out, probes, measures)
    return non_finite


#: the compiled kernels behind quantize_rows_q8k (for inspecting numba's cache statistics)
QUANTIZE_KERNELS = (_quantize_blocks, _quantize_rows)


@kernel(parallel=True)
def dequantize_q8k_blocks(blocks, out):
    """Dequantize ``blocks`` (n, 292) uint8 into ``out`` (n, 256) float32: ``d * qs``."""
    for b in prange(blocks.shape[0]):
        d = block_scale(blocks, U64(b))
        for j in range(U64(QK_K)):
            out[b, j] = d * np.float32(block_quant(blocks, U64(b), j))


@kernel(parallel=True)
def first_nonfinite_index(x):
    """Flat row-major index of the first NaN or infinity in ``x`` (rows, k), or -1."""
    rows, k = x.shape
    first_in_row = np.full(rows, -1, dtype=np.int64)
    if k == 0:
        return -1
    for r in prange(rows):
        row = x[r]
        # NaN and infinity lie beyond every finite value in key order: a vectorised min/max
        # clears a row, and only a row that fails it is searched element by element.
        key_low = order_key(row[0])
        key_high = key_low
        for j in range(U64(k)):
            key = order_key(row[j])
            key_high = max(key_high, key)
            key_low = min(key_low, key)
        if np.isfinite(from_order_key(key_low, row[0])) and np.isfinite(from_order_key(key_high, row[0])):
            continue
        for j in range(k):
            if not np.isfinite(to_float32(row[j])):
                first_in_row[r] = r * k + j
                break
    for r in range(rows):
        if first_in_row[r] >= 0:
            return first_in_row[r]
    return -1
