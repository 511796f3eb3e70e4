"""Quantization error measures, computed from the source values and the finished blocks.

``accumulate_block_measures`` runs inside the quantize kernel right after a block is made,
while its 256 source values are still in cache: validation costs no second pass over the
tensor.  Every sum is per block (a fixed order, whatever the threads), summed per tensor
or per row by the caller.
"""

import numpy as np
from numba import njit, prange
from qstrat.kernels.decode import finite_to_float32
from qstrat.kernels.layout import QK_K, U64, block_quant, block_scale

# Columns of a block's measures (float64): weight-error sums, then for each probe vector p
# the exact product W'.p and the dequantized product W^.p over the block's values.
ERROR_SQUARES = 0  # sum (w - w^)^2
REFERENCE_SQUARES = 1  # sum w^2
MAX_ABS_ERROR = 2  # max |w - w^|
CROSS = 3  # sum w * w^
DEQUANTIZED_SQUARES = 4  # sum w^^2
PROBE_COLUMNS = 5  # then exact, dequantized for each probe


def measure_columns(n_probes: int) -> int:
    """Width of the measures array for ``n_probes`` probe vectors."""
    return PROBE_COLUMNS + 2 * n_probes


@njit(cache=True, fastmath={"reassoc", "nnan", "ninf", "nsz"})
def accumulate_block_measures(row, start, blocks, b, probes, measures):
    """Measures of block ``b`` against row[start:start + 256] into ``measures[b]``.

    Reassociation lets LLVM vectorise the sums; the order is fixed by the compiled code,
    so results repeat exactly on a machine (they may differ in the last bits between CPUs
    of different vector widths).  Inputs are finite (the quantize kernel checked them).
    """
    d = block_scale(blocks, b)
    err2 = 0.0
    ref2 = 0.0
    cross = 0.0
    deq2 = 0.0
    worst_bits = np.int64(0)
    for j in range(U64(QK_K)):
        w = np.float64(finite_to_float32(row[start + j]))
        q = np.float64(d * np.float32(block_quant(blocks, b, j)))
        e = w - q
        err2 += e * e
        ref2 += w * w
        cross += w * q
        deq2 += q * q
        # non-negative float64s order like their bits: an integer max vectorises, a float one does not
        worst_bits = max(worst_bits, np.float64(abs(e)).view(np.int64))
    measures[b, ERROR_SQUARES] = err2
    measures[b, REFERENCE_SQUARES] = ref2
    measures[b, MAX_ABS_ERROR] = np.int64(worst_bits).view(np.float64)
    measures[b, CROSS] = cross
    measures[b, DEQUANTIZED_SQUARES] = deq2
    for p in range(probes.shape[0]):
        probe = probes[p]
        exact = 0.0
        quantized = 0.0
        for j in range(U64(QK_K)):
            x = np.float64(probe[start + j])
            exact += np.float64(finite_to_float32(row[start + j])) * x
            quantized += np.float64(d * np.float32(block_quant(blocks, b, j))) * x
        measures[b, PROBE_COLUMNS + 2 * p] = exact
        measures[b, PROBE_COLUMNS + 2 * p + 1] = quantized


@njit(parallel=True, cache=True)
def q8k_q8k_row_dots(blocks, probe_blocks, out):
    """Per row, the dot product of Q8K weights with a Q8K-quantized vector, as Candle computes it:
    an int32 sum of qs products per block, scaled by both blocks' d in float32."""
    blocks_per_row = probe_blocks.shape[0]
    for r in prange(out.shape[0]):
        total = np.float32(0.0)
        for i in range(blocks_per_row):
            b = U64(r * blocks_per_row + i)
            isum = 0
            for j in range(U64(QK_K)):
                isum += np.int32(block_quant(blocks, b, j)) * np.int32(block_quant(probe_blocks, U64(i), j))
            total += np.float32(isum) * block_scale(blocks, b) * block_scale(probe_blocks, U64(i))
        out[r] = total
