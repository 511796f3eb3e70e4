"""One matrix through the arithmetic: check, permute, quantize, measure.

Pipelines call this per tensor; it knows arrays, not files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from qstrat.blocks import as_gather_map, quantize_rows
from qstrat.kernels import q8k_error_sums


@dataclass(frozen=True)
class TensorMetrics:
    """Weight error of one quantized tensor, in its original column order."""

    mse: float | None
    relative_error: float | None  # ||W - W^||_F / ||W||_F
    sqnr_db: float | None  # 20 log10(||W|| / ||W - W^||); inf for an exact result
    max_abs_error: float | None
    cosine: float | None
    sum_test_mse: float | None = None  # the original tool's Method 1
    gradient_test_mse: float | None = None  # Method 2

    @classmethod
    def from_sums(cls, sums: np.ndarray, numel: int) -> TensorMetrics:
        err2, ref2, deq2, cross = (float(sums[:, i].sum()) for i in (0, 1, 4, 3))
        worst = float(sums[:, 2].max()) if len(sums) else 0.0
        norm_ref, norm_err = math.sqrt(ref2), math.sqrt(err2)
        if norm_err == 0.0:
            sqnr = math.inf
        elif norm_ref == 0.0:
            sqnr = -math.inf
        else:
            sqnr = 20.0 * math.log10(norm_ref / norm_err)
        denominator = math.sqrt(ref2 * deq2)
        cosine = cross / denominator if denominator else (1.0 if err2 == 0.0 else 0.0)
        return cls(
            mse=err2 / numel if numel else 0.0,
            relative_error=norm_err / norm_ref if norm_ref else (0.0 if err2 == 0.0 else math.inf),
            sqnr_db=sqnr,
            max_abs_error=worst,
            cosine=cosine,
        )

    @classmethod
    def empty(cls) -> TensorMetrics:
        return cls(None, None, None, None, None)

    @classmethod
    def from_dict(cls, values: dict[str, float | None]) -> TensorMetrics:
        """Inverse of :meth:`as_dict` (JSON has no infinity: an exact SQNR is stored as "inf")."""
        return cls(**{k: (math.inf if v == "inf" else v) for k, v in values.items()})

    def as_dict(self) -> dict[str, float | str | None]:
        return {k: ("inf" if v == math.inf else v) for k, v in asdict(self).items()}


def quantize_matrix(
    storage: np.ndarray,
    variant: str,
    row_perm: np.ndarray | None = None,
    col_perm: np.ndarray | None = None,
    *,
    tensor_name: str = "array",
    measure: bool = True,
    finite_checked: bool = False,
) -> tuple[np.ndarray, TensorMetrics | None]:
    """Quantize kernel storage (rows, k) stored as ``storage[row_perm[i], col_perm[j]]``.

    Returns the Q8K blocks and, when ``measure``, the weight error against the source
    (permutations move values, they do not change which value is compared with which).
    """
    blocks = quantize_rows(
        storage, variant, tensor_name, row_perm=row_perm, col_perm=col_perm, finite_checked=finite_checked
    )
    if not measure:
        return blocks, None
    return blocks, TensorMetrics.from_sums(_error_sums(storage, blocks, row_perm, col_perm), storage.size)


def _error_sums(storage, blocks, row_perm, col_perm) -> np.ndarray:
    sums = np.zeros((storage.shape[0], 5), dtype=np.float64)
    q8k_error_sums(storage, as_gather_map(row_perm), as_gather_map(col_perm), blocks, sums)
    return sums


def squared_error(
    storage: np.ndarray, variant: str, row_perm: np.ndarray | None = None, col_perm: np.ndarray | None = None
) -> float:
    """Total squared Q8K error of ``storage`` under the given permutations (for choosing orders)."""
    blocks = quantize_rows(storage, variant, row_perm=row_perm, col_perm=col_perm, finite_checked=True)
    return float(_error_sums(storage, blocks, row_perm, col_perm)[:, 0].sum())
