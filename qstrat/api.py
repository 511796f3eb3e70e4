"""The library entry point the original tool's README shows."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from qstrat.config import QuantizationConfig
from qstrat.errors import ConfigError, InputError
from qstrat.results import QuantizationResult

if TYPE_CHECKING:
    from qstrat.runconfig import RunConfig


def quantize_safetensors(input_path: str | os.PathLike, config: RunConfig | None = None) -> QuantizationResult:
    """Quantize a .safetensors file or model directory into ``config.output_dir``.

    >>> config = QuantizationConfig(strategy_type=StrategyType.ATTENTION_AWARE, use_permutation=True)
    >>> result = quantize_safetensors("model.safetensors", config)  # doctest: +SKIP
    >>> print(f"Quantized {result.tensor_count} tensors with average MSE: {result.average_mse:.2e}")  # doctest: +SKIP
    """
    from qstrat.pipelines.run import (
        quantize_model,  # the pipeline builds on this package
    )
    from qstrat.runconfig import RunConfig

    if not isinstance(input_path, (str, os.PathLike)):
        raise InputError(f"quantize_safetensors: input_path is one path (str or os.PathLike), not {type(input_path).__name__}")
    if config is not None and not isinstance(config, RunConfig):
        raise ConfigError(f"quantize_safetensors: config is a QuantizationConfig(...) (a RunConfig), not {type(config).__name__}")
    return quantize_model(input_path, config or QuantizationConfig())
