"""qr_pivot: columns in the order of QR with column pivoting (LAPACK ``geqp3`` via SciPy).

The pivot order puts the most linearly independent columns first.  It depends only on
the Gram matrix WᵀW, so a tall matrix is first reduced to its k x k triangular factor R
(an unpivoted QR, much cheaper) and R is pivoted instead.  The result is always checked to
be a permutation (the original tool's implementation could drop or repeat columns).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qstrat.blocks import storage_to_float32
from qstrat.io.q8k import check_permutation
from qstrat.strategies.base import Permutation, QuantizationStrategy, SquaredError


def to_float32_array(storage: np.ndarray) -> np.ndarray:
    """A float32 copy of kernel storage that QR may overwrite."""
    values = storage_to_float32(storage)
    return values.copy() if values is storage else values


def qr_pivot_order(matrix: np.ndarray) -> np.ndarray:
    """Column order of QR with column pivoting of ``matrix`` (rows, k), as int64 (k,)."""
    import scipy.linalg  # imported here, not by every run: it takes a tenth of a second

    values = to_float32_array(matrix).astype(np.float64)
    rows, k = values.shape
    if rows > k:
        values = scipy.linalg.qr(values, mode="r", overwrite_a=True, check_finite=False)[0][:k]
    _, pivots = scipy.linalg.qr(values, mode="r", pivoting=True, overwrite_a=True, check_finite=False)
    order = np.asarray(pivots, dtype=np.int64)
    check_permutation(order, k, "qr_pivot")
    return order


class QrPivotStrategy(QuantizationStrategy):
    name = "qr_pivot"
    permutation_kind = "runtime"

    def permutations(self, tensors: Mapping[str, np.ndarray], error: SquaredError) -> dict[str, Permutation | None]:
        return {name: Permutation(qr_pivot_order(array), 1) for name, array in tensors.items()}
