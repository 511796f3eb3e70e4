"""GGML's own reference quantizer, for cross-checks and benchmarks.

Needs the optional package ``libggml-python`` (installed with ``pip install 'qstrat[test]'``),
which ships prebuilt GGML libraries; ``quantize_row_q8_K_ref`` is called through ctypes.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from qstrat.errors import QstratError
from qstrat.kernels import BLOCK_BYTES, QK_K


@lru_cache(maxsize=1)
def _libggml_base() -> ctypes.CDLL:
    spec = importlib.util.find_spec("libggml")
    if spec is None or not spec.submodule_search_locations:
        raise QstratError("the GGML reference needs the package libggml-python (pip install 'qstrat[test]')")
    library = Path(next(iter(spec.submodule_search_locations))) / "lib64" / "libggml-base.so"
    lib = ctypes.CDLL(str(library))
    lib.quantize_row_q8_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.quantize_row_q8_K_ref.restype = None
    return lib


def ggml_quantize_q8k(x: np.ndarray) -> np.ndarray:
    """Quantize float32 ``x`` (any shape, size % 256 == 0) with GGML's ``quantize_row_q8_K_ref``.

    The output is zeroed first: GGML leaves the ``bsums`` of all-zero blocks unwritten.
    """
    values = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if values.size % QK_K:
        raise QstratError(f"size {values.size} is not a multiple of {QK_K}")
    out = np.zeros((values.size // QK_K, BLOCK_BYTES), dtype=np.uint8)
    _libggml_base().quantize_row_q8_K_ref(values.ctypes.data, out.ctypes.data, values.size)
    return out
