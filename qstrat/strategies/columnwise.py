"""Per-tensor strategies: one column permutation per tensor (or none)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qstrat.kernels import column_abs_max, column_sq_norms
from qstrat.strategies.base import Permutation, QuantizationStrategy, SquaredError, descending_order


def column_l2_order(array: np.ndarray) -> np.ndarray:
    norms = np.zeros(array.shape[1], dtype=np.float64)
    column_sq_norms(array, norms)
    return descending_order(norms)


def column_amax_order(array: np.ndarray) -> np.ndarray:
    amax = np.zeros(array.shape[1], dtype=np.float32)
    column_abs_max(array, amax)
    return descending_order(amax)


class IdentityStrategy(QuantizationStrategy):
    """No permutation: columns stay where they are."""

    name = "identity"
    permutation_kind = "none"

    def permutations(self, tensors: Mapping[str, np.ndarray], error: SquaredError) -> dict[str, Permutation | None]:
        return {name: None for name in tensors}


class L2NormStrategy(QuantizationStrategy):
    """Columns by descending L2 norm (ties by ascending index), as the original tool did."""

    name = "l2_norm"
    permutation_kind = "runtime"
    needs_finite_values = False

    def permutations(self, tensors: Mapping[str, np.ndarray], error: SquaredError) -> dict[str, Permutation | None]:
        return {name: Permutation(column_l2_order(array), 1) for name, array in tensors.items()}


class AbsMaxStrategy(QuantizationStrategy):
    """Columns by descending max-abs value, so outlier columns share blocks."""

    name = "amax"
    permutation_kind = "runtime"
    needs_finite_values = False

    def permutations(self, tensors: Mapping[str, np.ndarray], error: SquaredError) -> dict[str, Permutation | None]:
        return {name: Permutation(column_amax_order(array), 1) for name, array in tensors.items()}
