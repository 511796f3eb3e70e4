"""Numba kernels: pure functions over arrays (no I/O, no configuration, no logging).

Installed as ``qstrat.kernels``.  Numba has no float16/bfloat16 arrays, so 16-bit
inputs reach the kernels as raw bits: ``uint16`` holds bfloat16, ``int16`` holds
IEEE float16 (see :mod:`qstrat.kernels.decode`).  Wrappers in ``qstrat`` make those
views; a user never has to.
"""

from qstrat.kernels import _jit_cache

_jit_cache.install()  # before any kernel is compiled or loaded from a cache

from qstrat.kernels.columns import column_abs_max, column_sq_norms
from qstrat.kernels.decode import BF16_BITS, F16_BITS
from qstrat.kernels.layout import BLOCK_BYTES, BSUM_GROUP, QK_K
from qstrat.kernels.metrics import measure_columns, q8k_q8k_row_dots
from qstrat.kernels.q8k import (
    VARIANT_CODES,
    dequantize_q8k_blocks,
    first_nonfinite_index,
    quantize_rows_q8k,
)

__all__ = [
    "BF16_BITS",
    "BLOCK_BYTES",
    "BSUM_GROUP",
    "F16_BITS",
    "QK_K",
    "VARIANT_CODES",
    "column_abs_max",
    "column_sq_norms",
    "measure_columns",
    "q8k_q8k_row_dots",
    "dequantize_q8k_blocks",
    "first_nonfinite_index",
    "quantize_rows_q8k",
]
