"""qstrat: quantize .safetensors weights to Q8K, with column-permutation strategies."""

from qstrat.blocks import Q8K_VARIANTS, dequantize_blocks, quantize_blocks
from qstrat.errors import QstratError

__version__ = "0.1.0"

__all__ = ["Q8K_VARIANTS", "QstratError", "__version__", "dequantize_blocks", "quantize_blocks"]
