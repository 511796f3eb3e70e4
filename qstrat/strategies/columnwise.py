"""Per-tensor strategies: one column permutation per tensor (or none)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from qstrat.kernels import column_abs_max, column_sq_norms
from qstrat.strategies.base import QuantizationStrategy, descending_order


class IdentityStrategy(QuantizationStrategy):
    """No permutation: columns stay where they are."""

    name = "identity"
    permutation_kind = "none"

    def column_permutations(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | None]:
        return {name: None for name in tensors}


class L2NormStrategy(QuantizationStrategy):
    """Columns by descending L2 norm (ties by ascending index), as the original tool did."""

    name = "l2_norm"
    permutation_kind = "runtime"

    def column_permutations(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | None]:
        result: dict[str, np.ndarray | None] = {}
        for name, array in tensors.items():
            norms = np.zeros(array.shape[1], dtype=np.float64)
            column_sq_norms(array, norms)
            result[name] = descending_order(norms)
        return result


class AbsMaxStrategy(QuantizationStrategy):
    """Columns by descending max-abs value, so outlier columns share blocks."""

    name = "amax"
    permutation_kind = "runtime"

    def column_permutations(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | None]:
        result: dict[str, np.ndarray | None] = {}
        for name, array in tensors.items():
            amax = np.zeros(array.shape[1], dtype=np.float32)
            column_abs_max(array, amax)
            result[name] = descending_order(amax)
        return result
