"""GGML's IQ4_NL block type: quantize and dequantize kernels, byte-identical with
``ggml_quantize_chunk`` (``quantize_iq4_nl``) and ``dequantize_row_iq4_nl`` (layout:
``docs/formats.md``).

A block holds 32 consecutive values of a row (blocks never cross rows) in Q4_0's layout: fp16
``d``, then 16 bytes of 4-bit indices (value ``j`` in the low nibble of byte ``j``, value ``j + 16``
in its high nibble).  An index selects one of the 16 non-linear levels ``KVALUES`` (GGML's
``kvalues_iq4nl``): value = ``d * KVALUES[index]``.  llama.cpp falls back to IQ4_NL for Q2_K /
Q3_K tensors whose rows are not a multiple of 256 long.

``ggml_quantize_chunk`` always runs ``quantize_row_iq4_nl_impl(super_block_size = 32,
block_size = 32, ntry = 7)``, with or without an importance vector (``quantize_row_iq4_nl_ref``,
with ``ntry = -1``, is not what it calls).  Per block: weights ``x**2`` without a vector,
``qw[j] * sqrt(sigma2 + x[j]**2)`` with one (``sigma2``: twice the *block's* mean square); the
scale that the first value of largest magnitude ``max`` gives (``max / 127``) and the 15 inverse
scales ``(itry - 127) / max``, ``itry`` in -7..7, each give indices by nearest level and a
weighted least-squares scale ``sumqx / sumq2``; the one explaining most is kept, rounded to fp16
and every index is chosen again against its float32 value.  A block with ``amax < 1e-15`` has
``d = 0`` and every index 8 (the level nearest 0).

All arithmetic is float32 in GGML's evaluation order, without fused multiply-add (numba does not
contract without ``fastmath``; GGML's base library is built without FMA on x86-64), every sum
sequential.  The kernel reads float32 or 16-bit storage (one compiled signature per input type:
no importance vector is an empty one, not None).
"""

import numpy as np
from numba import prange
from qstrat.kernels.ggml_common import (
    BLOCKS_PER_TASK,
    GROUP_MAX_EPS,
    importance_weights,
    inverse_scale,
    load_block,
    signed_extreme,
    sum_squares,
)
from qstrat.kernels.half import load_half, store_half
from qstrat.kernels.jit import kernel
from qstrat.kernels.layout import U64
from qstrat.kernels.legacy import HALF, Q4_0, QK, _store_nibbles

#: GGML's kvalues_iq4nl: the level each 4-bit index stands for (times d)
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
#: bytes per 32-value block: fp16 d, then qs u8[16] (Q4_0's layout, stored by legacy's packer)
BLOCK_BYTES = 2 + HALF

_LEVELS = np.array(KVALUES, dtype=np.float32)
_NTRY = 7  # GGML's ntry for quantize_iq4_nl: inverse scales (itry - 127) / max, itry in -7..7


@kernel(inline="always")
def _best_index(x):
    """GGML's best_index_int8(16, kvalues_iq4nl, x), without branches: its binary search ends at
    the ``mu`` with levels[mu - 1] <= x < levels[mu], i.e. 1 + the number of inner levels 1..14
    that ``x < level`` is false for (15 for NaN, whose comparisons are all false, as in GGML's
    search); then the nearer of the two, the upper one on ties.  The end clamps of the C code
    (x <= -127 gives 0, x >= 113 gives 15) are what the final comparison gives for such x."""
    mu = np.int64(1)
    for i in range(1, 15):
        mu += np.int64(1) - np.int64(x < _LEVELS[i])
    return mu - np.int64(x - _LEVELS[U64(mu - 1)] < _LEVELS[U64(mu)] - x)


@kernel
def _fit(xb, weight, inv, levels):
    """Levels of every value against inverse scale ``inv`` (a pass without sums, kept apart from
    the sequential float32 sums), then GGML's (sumqx, sumq2) of the weighted fit."""
    for j in range(U64(QK)):
        levels[j] = _LEVELS[U64(_best_index(inv * xb[j]))]
    sumqx = np.float32(0.0)
    sumq2 = np.float32(0.0)
    for j in range(U64(QK)):
        w = weight[j]
        q = levels[j]
        sumqx += w * q * xb[j]
        sumq2 += w * q * q
    return sumqx, sumq2


@kernel
def _quantize_block(xb, qw, weighted, weight, levels, codes, out, b):
    """One block (xb: 32 finite float32) by quantize_row_iq4_nl_impl(32, 32, ntry = 7);
    ``qw``: the importance vector's 32 values if ``weighted``."""
    if weighted:
        importance_weights(xb, qw, sum_squares(xb) * np.float32(2.0 / QK), weight)  # GGML: 2.f / super_block_size
    else:
        for j in range(U64(QK)):
            weight[j] = xb[j] * xb[j]
    extreme, amax = signed_extreme(xb)  # GGML's max and amax
    d = np.float32(0.0)
    if not amax < GROUP_MAX_EPS:
        d = -extreme / _LEVELS[0]  # GGML: -max / values[0] (ntry > 0)
        sumqx, sumq2 = _fit(xb, weight, np.float32(1.0) / d, levels)
        d = sumqx / sumq2 if sumq2 > np.float32(0.0) else np.float32(0.0)
        best = d * sumqx
        for itry in range(-_NTRY, _NTRY + 1):
            # GGML: (itry + values[0]) / max, the int sum converted to float
            sumqx, sumq2 = _fit(xb, weight, np.float32(itry + KVALUES[0]) / extreme, levels)
            if sumq2 > np.float32(0.0) and sumqx * sumqx > best * sumq2:
                d = sumqx / sumq2
                best = d * sumqx
    store_half(out, b, 0, d)
    # every index again against the float32 d (GGML: scales[0] ? 1/scales[0] : 0; NaN is true)
    inv = inverse_scale(d)
    for j in range(U64(QK)):
        codes[j] = _best_index(inv * xb[j])
    _store_nibbles(out, b, Q4_0, codes)  # Q4_0's packing: qs at byte 2, no qh


@kernel(parallel=True, nogil=True)
def quantize_rows_iq4nl(x, out, quant_weights):
    """Quantize every row of ``x`` (rows, k), k % 32 == 0, to IQ4_NL into ``out`` (rows * k // 32,
    BLOCK_BYTES) uint8, C-contiguous, blocks in row-major order.  ``x`` is float32, or raw
    bfloat16 (uint16) / float16 (int16) bits, decoded block by block as the kernel reads them.

    ``quant_weights`` is the importance vector, (k,) float32, finite and >= 0, or an empty
    float32 array for none (one compiled signature for both).  Returns the number of blocks
    holding a NaN or infinity (zeroed; the caller refuses them).
    """
    rows, k = x.shape
    blocks_per_row = k // QK
    n_blocks = rows * blocks_per_row
    weighted = quant_weights.shape[0] > 0
    non_finite = 0
    for task in prange((n_blocks + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK):
        xb = np.empty(QK, dtype=np.float32)
        weight = np.empty(QK, dtype=np.float32)
        levels = np.empty(QK, dtype=np.float32)
        codes = np.empty(QK, dtype=np.int64)
        for b in range(task * BLOCKS_PER_TASK, min(n_blocks, (task + 1) * BLOCKS_PER_TASK)):
            start, bad = load_block(x, b, xb, out)
            if bad:
                non_finite += 1
                continue
            qw = quant_weights[start : start + QK] if weighted else quant_weights
            _quantize_block(xb, qw, weighted, weight, levels, codes, out, b)
    return non_finite


@kernel(parallel=True, nogil=True)
def dequantize_blocks_iq4nl(blocks, out):
    """Dequantize ``blocks`` (n, BLOCK_BYTES) uint8 into ``out`` (n, 32) float32, as GGML's
    dequantize_row_iq4_nl: d * kvalues_iq4nl[index]."""
    for b in prange(blocks.shape[0]):
        d = load_half(blocks, b, 0)
        for j in range(U64(HALF)):
            byte = blocks[b, U64(2) + j]
            out[b, j] = d * _LEVELS[U64(byte & np.uint8(0x0F))]
            out[b, j + U64(HALF)] = d * _LEVELS[U64(byte >> np.uint8(4))]
