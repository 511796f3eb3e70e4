"""Column statistics: the hot path of the permutation strategies.

Each column's statistic is accumulated by one thread in row order, so results do not
depend on the number of threads.
"""

import numpy as np
from numba import prange
from qstrat.kernels.decode import to_float32
from qstrat.kernels.jit import kernel

_COLUMN_TILE = 256


@kernel(parallel=True)
def column_sq_norms(x, out):
    """Add each column's sum of squares (float64) of ``x`` (rows, k) into ``out`` (k,)."""
    rows, k = x.shape
    for tile in prange((k + _COLUMN_TILE - 1) // _COLUMN_TILE):
        start = tile * _COLUMN_TILE
        stop = min(start + _COLUMN_TILE, k)
        for r in range(rows):
            for j in range(start, stop):
                v = np.float64(to_float32(x[r, j]))
                out[j] += v * v


@kernel(parallel=True)
def column_abs_max(x, out):
    """Raise each entry of ``out`` (k,) float32 to its column's largest |value| in ``x``."""
    rows, k = x.shape
    for tile in prange((k + _COLUMN_TILE - 1) // _COLUMN_TILE):
        start = tile * _COLUMN_TILE
        stop = min(start + _COLUMN_TILE, k)
        for r in range(rows):
            for j in range(start, stop):
                a = abs(to_float32(x[r, j]))
                if a > out[j]:
                    out[j] = a
