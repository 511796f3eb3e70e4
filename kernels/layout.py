"""The Q8K block layout: the one place its sizes and offsets are defined.

A Q8K super-block holds ``QK_K`` = 256 consecutive values of one row and is stored in
``BLOCK_BYTES`` = 292 little-endian bytes: ``d`` float32 (bytes 0..4), ``qs`` int8[256]
(4..260), ``bsums`` int16[16] (260..292, the sum of each group of 16 ``qs``).
"""

import numpy as np
from numba import njit

QK_K = 256
BSUM_GROUP = 16
D_OFFSET = 0
QS_OFFSET = 4
BSUMS_OFFSET = QS_OFFSET + QK_K
BLOCK_BYTES = BSUMS_OFFSET + 2 * (QK_K // BSUM_GROUP)  # 292

# Kernel-side indices are unsigned where it matters: numba adds a negative-index wraparound
# check to every signed index, and that check is what stops LLVM from vectorising loops.
U64 = np.uint64


@njit(cache=True)
def block_scale(blocks, b):
    """The float32 ``d`` of block ``b`` of ``blocks`` (n, 292) uint8."""
    bits = np.uint32(0)
    for i in range(U64(4)):
        bits |= np.uint32(blocks[b, U64(D_OFFSET) + i]) << np.uint32(8 * i)
    return np.uint32(bits).view(np.float32)


@njit(cache=True)
def block_quant(blocks, b, j):
    """qs[j] of block ``b`` as an int8."""
    return np.int8(blocks[b, U64(QS_OFFSET) + j])
