"""``QuantizationConfig(...)``: the original tool's constructor, building the one run model.

Every setting, its default and its check live in :class:`qstrat.runconfig.RunConfig`; this
function only maps the original tool's keyword arguments onto it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from qstrat.errors import ConfigError
from qstrat.legacy import StrategyType, seed_chain

if TYPE_CHECKING:
    from qstrat.runconfig import RunConfig


def QuantizationConfig(  # noqa: N802 - the original tool's class name, kept for its users
    strategy_type: StrategyType | str = StrategyType.L2_NORM,
    use_permutation: bool = False,
    skip_patterns: Sequence[str] | None = None,
    output_dir: str | os.PathLike = "./quantized",
    attention_aware: bool = False,
    *,
    variant: str | None = None,
    strategies: Sequence[str | Mapping[str, Any]] | None = None,
    validation: bool | None = None,
    validation_stages: Sequence[str] | None = None,
    validation_product: str | None = None,
    workers: int | None = None,
    backend: str | None = None,
    address: str | None = None,
    force: bool = False,
) -> RunConfig:
    """The settings of a run; an argument left out (None) takes :class:`RunConfig`'s default.

    The first five are the original tool's: ``use_permutation`` with ``strategy_type`` (or
    ``attention_aware``) select its strategy chain, unless ``strategies`` (a list of strategy
    names or ``{"name", "match", ...}`` mappings) gives one.  ``force`` replaces output of
    another config or input.  Errors are :class:`qstrat.errors.ConfigError`.
    """
    # pydantic costs a noticeable part of start-up: imported only when settings are built
    from qstrat.runconfig import RunConfig

    kind = StrategyType.ATTENTION_AWARE if attention_aware else StrategyType.parse(strategy_type, "strategy_type")
    for key, value in (("strategies", strategies), ("skip_patterns", skip_patterns), ("validation_stages", validation_stages)):
        if isinstance(value, str):  # list() would make one entry of each character
            raise ConfigError(f"QuantizationConfig: {key}: a list of names, not the string {value!r}")
    chain = seed_chain(use_permutation, kind) if strategies is None else [e if isinstance(e, str) else dict(e) for e in strategies]
    data: dict[str, Any] = {
        "output": os.fspath(output_dir),
        "strategies": chain,
        "variant": variant,
        "skip_patterns": None if skip_patterns is None else list(skip_patterns),
        "validation": {"enabled": validation, "product": validation_product,
                       "stages": None if validation_stages is None else list(validation_stages)},
        "parallel": {"workers": workers, "backend": backend, "address": address},
    }
    return RunConfig.build(_given(data), "QuantizationConfig", force=force)


def _given(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the None values (nested too): those keys keep the model's defaults."""
    return {k: _given(v) if isinstance(v, dict) else v for k, v in data.items() if v is not None}


__all__ = ["QuantizationConfig", "StrategyType"]
