"""qstrat: quantize .safetensors weights to Q8K, with column-permutation strategies, and arrays to
GGUF block types (``quantize`` / ``dequantize``).

The public API is what this module exports; see the README for an example.
"""

from qstrat._version import __version__
from qstrat.api import quantize_safetensors
from qstrat.blocks import Q8K_VARIANTS, dequantize_blocks, quantize_blocks
from qstrat.config import QuantizationConfig, StrategyType
from qstrat.errors import QstratError
from qstrat.io.q8k import Q8KTensor, read_perm, read_q8k
from qstrat.model import load_model
from qstrat.matrix import TensorMetrics
from qstrat.results import QuantizationResult, TensorRecord
from qstrat.strategies import QuantizationStrategy, StrategyChain

__all__ = [
    "Q8KTensor",
    "Q8K_VARIANTS",
    "QstratError",
    "QuantizationConfig",
    "QuantizationResult",
    "QuantizationStrategy",
    "StrategyChain",
    "StrategyType",
    "TensorMetrics",
    "TensorRecord",
    "__version__",
    "dequantize",
    "dequantize_blocks",
    "load_model",
    "quantize",
    "quantize_blocks",
    "quantize_safetensors",
    "read_perm",
    "read_q8k",
]


def __getattr__(name: str):
    # quantize / dequantize load gguf-py's type tables (~0.2 s) when first used, so that
    # commands which never touch GGUF types do not pay for them
    if name in ("quantize", "dequantize"):
        from qstrat import formats

        globals()[name] = function = getattr(formats, name)
        return function
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
