"""Validation stages, registered by the name a user writes in the config.

- ``weight_error``: MSE, relative Frobenius error, SQNR, max error, cosine of W^ against W.
- ``sum_test`` (the original tool's Method 1): x = ones(k); MSE over rows of W'x - W^x.
- ``gradient_test`` (Method 2): x_i = (i + 1) / k, the same; sensitive to the permutation.
- ``roundtrip``: the written files read back equal what was computed in memory.

W' is the float matrix in its stored (permuted) layout, as in the original tool.  The
quantized product is computed either with exact dequantized weights (``exact``) or the way
Candle's Q8K matmul computes it, with the input vector quantized to Q8K as well (``candle``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qstrat.blocks import as_gather_map, quantize_rows
from qstrat.errors import OutputError
from qstrat.io.q8k import read_perm, read_q8k
from qstrat.kernels import q8k_probe_products, q8k_q8k_row_dots

STAGES = ("weight_error", "sum_test", "gradient_test", "roundtrip")
PRODUCTS = ("exact", "candle")


@dataclass(frozen=True)
class ValidationSettings:
    stages: tuple[str, ...] = STAGES
    product: str = "exact"


def probe_vector(stage: str, k: int) -> np.ndarray:
    """The input vector of a matrix-vector stage."""
    if stage == "sum_test":
        return np.ones(k, dtype=np.float32)
    return ((np.arange(k, dtype=np.float64) + 1) / k).astype(np.float32)


def matvec_mse(
    storage: np.ndarray,
    blocks: np.ndarray,
    probe: np.ndarray,
    product: str,
    variant: str,
    row_perm: np.ndarray | None = None,
    col_perm: np.ndarray | None = None,
) -> float:
    """MSE over rows between W'x (float) and the quantized product, computed as ``product`` says."""
    out = np.zeros((storage.shape[0], 2), dtype=np.float64)
    q8k_probe_products(storage, as_gather_map(row_perm), as_gather_map(col_perm), blocks, probe, out)
    if product == "candle":
        probe_blocks = quantize_rows(probe[None, :], variant)
        dots = np.zeros(storage.shape[0], dtype=np.float32)
        q8k_q8k_row_dots(blocks, probe_blocks, dots)
        out[:, 1] = dots
    return float(np.mean((out[:, 0] - out[:, 1]) ** 2)) if len(out) else 0.0


def check_roundtrip(q8k_path: Path, blocks: np.ndarray, perm_path: Path | None, perm: np.ndarray | None) -> None:
    """Read back what was written and compare it with the in-memory result."""
    stored = read_q8k(q8k_path)
    if not np.array_equal(np.asarray(stored.blocks), blocks):
        raise OutputError(f"{q8k_path}: the file read back differs from what was quantized (roundtrip)")
    if perm_path is not None and not np.array_equal(read_perm(perm_path, stored.k), perm):
        raise OutputError(f"{perm_path}: the permutation read back differs from the one applied (roundtrip)")
