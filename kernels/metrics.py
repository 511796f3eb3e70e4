"""Quantization error measures, computed from the source values and the finished blocks.

``accumulate_block_measures`` runs inside the quantize kernel right after a block is made,
while its 256 source values are still in cache: validation costs no second pass over the
tensor.  Sums are float32 within a block (vectorised, like the quantization itself) and
float64 across blocks, in a fixed order whatever the threads: relative accuracy is about
1e-6, far below what any report shows, and the W'x - W^x differences are summed as such
rather than as two nearly equal products.
"""

import numpy as np
from numba import prange
from numba.extending import register_jitable
from qstrat.kernels.decode import finite_to_float32
from qstrat.kernels.jit import kernel
from qstrat.kernels.layout import QK_K, U64, block_quant, block_scale

# Columns of a stored row's measures (float64): weight-error sums over the row, then for each
# probe vector p the exact product W'.p and the error W'.p - W^.p over the row's values.
ERROR_SQUARES = 0  # sum (w - w^)^2
REFERENCE_SQUARES = 1  # sum w^2
DEQUANTIZED_SQUARES = 2  # sum w^^2 (with the other two, it gives sum w * w^)
MAX_ABS_ERROR = 3  # max |w - w^|
PROBE_COLUMNS = 4  # then exact product, product error for each probe


@register_jitable  # plain Python, and callable from kernels too
def measure_columns(n_probes: int) -> int:
    """Width of the measures array for ``n_probes`` probe vectors."""
    return PROBE_COLUMNS + 2 * n_probes


# finite inputs; reassociation lets the sums vectorise
_SUMMING = {"reassoc", "nnan", "ninf", "nsz"}

#: Probe vectors summed in the same loop as the weight error; any further ones take a pass
#: each.  The kernels take at least this many rows of probes (zeros for absent ones), so that
#: one compiled loop serves every count: a second variant without the probe products would
#: measure 10 % faster but cost a first run 0.8 s more to compile.
FUSED_PROBES = 2


def fused_probes(probes: np.ndarray | None, k: int) -> np.ndarray:
    """``probes`` (n, k) as the kernels take them: float32, contiguous, padded with zero rows
    to at least FUSED_PROBES (a zero probe adds nothing to a sum that is not kept)."""
    n = 0 if probes is None else probes.shape[0]
    padded = np.zeros((max(n, FUSED_PROBES), k), np.float32)
    if n:
        padded[:n] = probes
    return padded


@kernel(fastmath=_SUMMING)
def _scaled_block_sums(row, start, scale, scaled_d, blocks, b, probe_a, probe_b):
    """One pass over a block's values (scaled by ``scale``) and its dequantized values:
    float32 sums of e^2, w^2, w^^2, the largest |e| (e = w - w^), and w.p, e.p for each of
    ``probe_a`` and ``probe_b``."""
    err2 = np.float32(0.0)
    ref2 = np.float32(0.0)
    deq2 = np.float32(0.0)
    worst_bits = np.int32(0)
    exact_a = np.float32(0.0)
    error_a = np.float32(0.0)
    exact_b = np.float32(0.0)
    error_b = np.float32(0.0)
    for j in range(U64(QK_K)):
        w = finite_to_float32(row[start + j]) * scale
        q = scaled_d * np.float32(block_quant(blocks, b, j))  # d * qs as dequantizers compute it, scaled
        e = w - q
        err2 += e * e
        ref2 += w * w
        deq2 += q * q
        # non-negative floats order like their bits: an integer max vectorises, a float one does not
        bits = np.float32(abs(e)).view(np.int32)
        worst_bits = bits if bits > worst_bits else worst_bits
        x = probe_a[start + j]
        exact_a += w * x
        error_a += e * x
        x = probe_b[start + j]
        exact_b += w * x
        error_b += e * x
    worst = np.int32(worst_bits).view(np.float32)
    return err2, ref2, deq2, worst, exact_a, error_a, exact_b, error_b


@kernel
def accumulate_block_measures(row, start, blocks, b, probes, totals):
    """Add the measures of block ``b`` against row[start:start + 256] to ``totals`` (one row's,
    ``measure_columns(n)`` long for n probes).  ``probes`` holds at least FUSED_PROBES rows
    (see ``fused_probes``); only the first n count.

    Values are scaled by a power of two near 1/d first (exact), so that float32 squares
    neither overflow near float32's limit nor underflow for tiny blocks.  Reassociation
    lets LLVM vectorise the sums; the order is fixed by the compiled code, so results
    repeat exactly on a machine (they may differ in the last bits between CPUs of different
    vector widths).  Inputs are finite (the quantize kernel checked them).
    """
    d = block_scale(blocks, b)
    if d != np.float32(0.0):
        # 2**n (float32) with d * 2**n in [1, 2) for a normal d > 0, and within float32's normal
        # range for a subnormal one: scaling by it is exact.  (|d| <= FLT_MAX / 127 keeps the
        # exponent at most 248: the upper clamp never acts.)
        exponent = np.int32((np.float32(d).view(np.uint32) >> np.uint32(23)) & np.uint32(0xFF))
        n = 127 - (np.int32(1) if exponent < 1 else (np.int32(253) if exponent > 253 else exponent))
        scale = np.uint32((n + 127) << 23).view(np.float32)
    else:
        # A block stored as zeros (d = 0) holds only values below ~3.7e-37 in magnitude (or
        # zeros): 2**100 brings them into float32's normal range, where their squares neither
        # underflow nor overflow, and every value is its own error.
        scale = np.float32(2.0**100)
    # (d * qs) * scale == (d * scale) * qs for a normal d (both scalings exact); for a subnormal
    # d the dequantizer's d * qs rounds coarser, by at most half a subnormal ulp per value
    scaled_d = d * scale
    n_probes = (totals.shape[0] - PROBE_COLUMNS) // 2
    sums = _scaled_block_sums(row, start, scale, scaled_d, blocks, b, probes[0], probes[1])
    err2, ref2, deq2, worst, exact_a, error_a, exact_b, error_b = sums
    unscale = np.float64(1.0) / np.float64(scale)
    unscale2 = unscale * unscale
    totals[ERROR_SQUARES] += np.float64(err2) * unscale2
    totals[REFERENCE_SQUARES] += np.float64(ref2) * unscale2
    totals[DEQUANTIZED_SQUARES] += np.float64(deq2) * unscale2
    worst_error = np.float64(worst) * unscale
    if worst_error > totals[MAX_ABS_ERROR]:
        totals[MAX_ABS_ERROR] = worst_error
    if n_probes >= 1:
        totals[PROBE_COLUMNS] += np.float64(exact_a) * unscale
        totals[PROBE_COLUMNS + 1] += np.float64(error_a) * unscale
    if n_probes >= 2:
        totals[PROBE_COLUMNS + 2] += np.float64(exact_b) * unscale
        totals[PROBE_COLUMNS + 3] += np.float64(error_b) * unscale
    for p in range(FUSED_PROBES, n_probes):
        # rare (validation uses two): the weight sums of this pass are computed again, unused
        sums = _scaled_block_sums(row, start, scale, scaled_d, blocks, b, probes[p], probes[p])
        totals[PROBE_COLUMNS + 2 * p] += np.float64(sums[4]) * unscale
        totals[PROBE_COLUMNS + 2 * p + 1] += np.float64(sums[5]) * unscale


@kernel(parallel=True)
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
