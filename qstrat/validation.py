"""Validation stages, by the name a user writes in the config.

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

from qstrat.blocks import quantize_rows
from qstrat.errors import OutputError
from qstrat.io.q8k import q8k_file_holds, read_perm
from qstrat.io.qblock import SUFFIX as QBLK_SUFFIX, blocks_file_holds
from qstrat.kernels import q8k_q8k_row_dots

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


def matvec_mse(products: np.ndarray, blocks: np.ndarray, probe: np.ndarray, product: str, variant: str) -> float:
    """MSE over rows between W'x (float) and the quantized product, computed as ``product`` says.

    ``products`` (rows, 2) holds W'x and W'x - W^x per stored row, as the quantize kernel
    measured them (``QuantizedMatrix.probe_products``); ``candle`` compares W'x with Candle's
    Q8K x Q8K dots instead.
    """
    if not len(products):
        return 0.0
    if product == "candle":
        probe_blocks = quantize_rows(probe[None, :], variant)
        dots = np.zeros(len(products), dtype=np.float32)
        q8k_q8k_row_dots(blocks, probe_blocks, dots)
        errors = products[:, 0] - dots.astype(np.float64)
    else:
        errors = products[:, 1]
    return float(np.mean(errors**2))


def check_roundtrip(tensor_path: Path, blocks: np.ndarray, perm_path: Path | None, perm: np.ndarray | None) -> None:
    """Read back what was written (a .q8k or .qblk file) and compare it with the in-memory result."""
    holds = blocks_file_holds if tensor_path.suffix == QBLK_SUFFIX else q8k_file_holds
    if not holds(tensor_path, blocks):
        raise OutputError(f"{tensor_path}: the file read back differs from what was quantized (roundtrip)")
    if perm_path is not None and not np.array_equal(read_perm(perm_path, len(perm)), perm):
        raise OutputError(f"{perm_path}: the permutation read back differs from the one applied (roundtrip)")
