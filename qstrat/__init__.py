"""qstrat: quantize .safetensors weights to Q8K, with column-permutation strategies, and arrays to
GGUF block types (``quantize`` / ``dequantize``).

The public API is what this module exports; see the README for an example.  Each name is
imported from its module when first used: importing ``qstrat`` (as every command and every
``qstrat.*`` submodule import does first) stays light, so that the commands can take over
Ctrl-C and SIGTERM before numba loads, and ``--help`` does not wait for it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from qstrat._version import __version__

if TYPE_CHECKING:  # the same names, for type checkers and readers
    from qstrat.api import quantize_safetensors
    from qstrat.blocks import Q8K_VARIANTS, dequantize_blocks, quantize_blocks
    from qstrat.config import QuantizationConfig, StrategyType
    from qstrat.errors import QstratError
    from qstrat.formats import dequantize, quantize
    from qstrat.io.q8k import Q8KTensor, read_perm, read_q8k
    from qstrat.matrix import TensorMetrics
    from qstrat.model import OpenModel, load_model, open_model
    from qstrat.results import QuantizationResult, TensorRecord
    from qstrat.strategies import QuantizationStrategy, StrategyChain

#: public name -> the module that defines it
_EXPORTS = {
    "quantize_safetensors": "qstrat.api",
    "Q8K_VARIANTS": "qstrat.blocks",
    "dequantize_blocks": "qstrat.blocks",
    "quantize_blocks": "qstrat.blocks",
    "QuantizationConfig": "qstrat.config",
    "StrategyType": "qstrat.config",
    "QstratError": "qstrat.errors",
    "dequantize": "qstrat.formats",
    "quantize": "qstrat.formats",
    "Q8KTensor": "qstrat.io.q8k",
    "read_perm": "qstrat.io.q8k",
    "read_q8k": "qstrat.io.q8k",
    "TensorMetrics": "qstrat.matrix",
    "load_model": "qstrat.model",
    "open_model": "qstrat.model",
    "OpenModel": "qstrat.model",
    "QuantizationResult": "qstrat.results",
    "TensorRecord": "qstrat.results",
    "QuantizationStrategy": "qstrat.strategies",
    "StrategyChain": "qstrat.strategies",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
