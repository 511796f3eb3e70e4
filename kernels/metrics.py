"""Quantization error sums, computed straight from the source storage and the blocks."""

import numpy as np
from numba import njit, prange
from qstrat.kernels.decode import source_index, to_float32
from qstrat.kernels.q8k import QK_K, QS_OFFSET, _load_f32_le


@njit(cache=True, fastmath={"reassoc", "nnan", "ninf", "nsz"})
def _block_error_sums(src, idx, block, sums):
    # Sums of one block; reassociation lets LLVM vectorise them.  The order is fixed by the
    # compiled code, not by threads, so results repeat exactly on a machine (they may differ
    # in the last bits between CPUs of different vector widths).  Inputs are checked finite.
    d = _load_f32_le(block, 0)
    qs = block[QS_OFFSET : QS_OFFSET + QK_K].view(np.int8)
    err2 = 0.0
    ref2 = 0.0
    cross = 0.0
    deq2 = 0.0
    worst = 0.0
    for j in range(QK_K):
        w = np.float64(to_float32(src[source_index(idx, j)]))
        q = np.float64(d * np.float32(qs[j]))
        e = w - q
        err2 += e * e
        ref2 += w * w
        cross += w * q
        deq2 += q * q
        worst = max(worst, abs(e))
    sums[0] += err2
    sums[1] += ref2
    sums[2] = max(sums[2], worst)
    sums[3] += cross
    sums[4] += deq2


@njit(parallel=True, cache=True)
def q8k_error_sums(x, row_perm, col_perm, blocks, out):
    """Error sums of ``blocks`` against ``x`` (rows, k) stored as x[row_perm[i], col_perm[j]].

    A None permutation is the identity; sums are per stored row.  ``out`` (rows, 5) float64
    (zeroed by the caller) receives, per row: sum (w - w^)^2, sum w^2, max |w - w^|,
    sum w * w^, sum w^^2 — enough for MSE, SQNR, relative error, max error and cosine.
    """
    rows, k = x.shape
    blocks_per_row = k // QK_K
    for r in prange(rows):
        row = x[source_index(row_perm, r)]
        for b in range(blocks_per_row):
            start = b * QK_K
            if col_perm is None:
                _block_error_sums(row[start : start + QK_K], None, blocks[r * blocks_per_row + b], out[r])
            else:
                _block_error_sums(row, col_perm[start : start + QK_K], blocks[r * blocks_per_row + b], out[r])


@njit(parallel=True, cache=True)
def q8k_probe_products(x, row_perm, col_perm, blocks, probe, out):
    """Per stored row r: out[r, 0] = W'[r] . probe and out[r, 1] = W^[r] . probe (float64).

    W' is ``x`` in the stored layout (x[row_perm[i], col_perm[j]]), W^ the dequantized blocks:
    the original tool's matrix-vector validation, with exact dequantized weights.
    """
    rows, k = x.shape
    blocks_per_row = k // QK_K
    for r in prange(rows):
        exact = 0.0
        quantized = 0.0
        for b in range(blocks_per_row):
            block = blocks[r * blocks_per_row + b]
            d = _load_f32_le(block, 0)
            for j in range(QK_K):
                col = b * QK_K + j
                p = np.float64(probe[col])
                exact += np.float64(to_float32(x[source_index(row_perm, r), source_index(col_perm, col)])) * p
                quantized += np.float64(d * np.float32(np.int8(block[QS_OFFSET + j]))) * p
        out[r, 0] = exact
        out[r, 1] = quantized


@njit(parallel=True, cache=True)
def q8k_q8k_row_dots(blocks, probe_blocks, out):
    """Per row, the dot product of Q8K weights with a Q8K-quantized vector, as Candle computes it:
    an int32 sum of qs products per block, scaled by both blocks' d in float32."""
    blocks_per_row = probe_blocks.shape[0]
    for r in prange(out.shape[0]):
        total = np.float32(0.0)
        for b in range(blocks_per_row):
            block = blocks[r * blocks_per_row + b]
            other = probe_blocks[b]
            isum = 0
            for j in range(QK_K):
                isum += np.int32(np.int8(block[QS_OFFSET + j])) * np.int32(np.int8(other[QS_OFFSET + j]))
            total += np.float32(isum) * _load_f32_le(block, 0) * _load_f32_le(other, 0)
        out[r] = total
