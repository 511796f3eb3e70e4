"""QuantizationConfig: every knob of a run, with defaults, and the original tool's environment.

Precedence (lowest first): built-in defaults < YAML config < ``CANDLE_Q8K_*`` environment
variables < command-line flags.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

from qstrat.blocks import DEFAULT_VARIANT, Q8K_VARIANTS
from qstrat.errors import ConfigError
from qstrat.strategies import StrategyChain
from qstrat.validation import PRODUCTS, STAGES, ValidationSettings


class StrategyType(str, Enum):
    """The strategies of the original tool's ``StrategyType``, plus qstrat's own."""

    IDENTITY = "identity"
    L2_NORM = "l2_norm"
    AMAX = "amax"
    ATTENTION_AWARE = "attention_aware"

    @classmethod
    def parse(cls, value: str | StrategyType, where: str = "strategy") -> StrategyType:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"{where}: unknown strategy {value!r}; choose one of {', '.join(s.value for s in cls)}"
            ) from None


#: the strategy chain each seed strategy name stands for (attention_aware permuted the rest by L2 norm)
SEED_CHAINS: dict[StrategyType, tuple[str, ...]] = {
    StrategyType.IDENTITY: ("identity",),
    StrategyType.L2_NORM: ("l2_norm",),
    StrategyType.AMAX: ("amax",),
    StrategyType.ATTENTION_AWARE: ("attention_aware", "l2_norm"),
}

DEFAULT_SKIP_PATTERNS = ("embed_tokens", "norm")


@dataclass
class QuantizationConfig:
    """Everything a run needs; every field has a default.

    The first five fields are the original tool's.  ``strategies`` (a list of strategy
    names or ``{"name", "match", ...}`` mappings) overrides ``strategy_type`` /
    ``use_permutation`` when given.
    """

    strategy_type: StrategyType = StrategyType.L2_NORM
    use_permutation: bool = False
    skip_patterns: Sequence[str] = DEFAULT_SKIP_PATTERNS
    output_dir: Path = Path("./quantized")
    attention_aware: bool = False
    variant: str = DEFAULT_VARIANT
    strategies: Sequence[str | Mapping[str, object]] | None = None
    validation: bool = True
    validation_stages: Sequence[str] = STAGES
    validation_product: str = "exact"  # or "candle": the input vector quantized to Q8K too
    workers: int = 1
    backend: str = "loky"  # or "dask": the groups run on the Dask cluster at ``address``
    address: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        self.strategy_type = StrategyType.parse(self.strategy_type, "strategy_type")
        self.output_dir = Path(self.output_dir)
        self.skip_patterns = tuple(self.skip_patterns)
        self.validation_stages = tuple(self.validation_stages)
        unknown = [s for s in self.validation_stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"validation.stages: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
        if self.validation_product not in PRODUCTS:
            raise ConfigError(f"validation.product: {self.validation_product!r} is not one of {', '.join(PRODUCTS)}")
        if self.variant not in Q8K_VARIANTS:
            raise ConfigError(f"variant: unknown Q8K variant {self.variant!r}; choose one of {', '.join(Q8K_VARIANTS)}")
        if self.backend not in ("loky", "dask"):
            raise ConfigError(f"parallel.backend: {self.backend!r} is not one of loky, dask")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise ConfigError(f"workers: must be a positive integer, got {self.workers!r}")

    def validation_settings(self) -> ValidationSettings | None:
        """The stages a worker runs (None when validation is off)."""
        return ValidationSettings(self.validation_stages, self.validation_product) if self.validation else None

    def chain_entries(self) -> list[str | Mapping[str, object]]:
        """The strategy chain this config selects, as entries for :class:`StrategyChain`."""
        if self.strategies is not None:
            return list(self.strategies)
        if not self.use_permutation:
            return ["identity"]
        kind = StrategyType.ATTENTION_AWARE if self.attention_aware else self.strategy_type
        return list(SEED_CHAINS[kind])

    def strategy_chain(self) -> StrategyChain:
        return StrategyChain(self.chain_entries())

    def describe(self) -> dict[str, object]:
        """A JSON-ready record of the settings that shape the output (for the manifest)."""
        return {
            "variant": self.variant,
            "strategies": self.strategy_chain().describe(),
            "skip_patterns": list(self.skip_patterns),
            "validation": {
                "enabled": self.validation,
                "stages": list(self.validation_stages) if self.validation else [],
                "product": self.validation_product,
            },
        }

    def with_environment(self, environ: Mapping[str, str] | None = None) -> QuantizationConfig:
        """This config overridden by the original tool's ``CANDLE_Q8K_*`` variables."""
        env = os.environ if environ is None else environ
        changes: dict[str, object] = {}
        if "CANDLE_Q8K_PERMUTE" in env:
            changes["use_permutation"] = parse_bool(env["CANDLE_Q8K_PERMUTE"], "CANDLE_Q8K_PERMUTE")
        if "CANDLE_Q8K_STRATEGY" in env:
            changes["strategy_type"] = StrategyType.parse(env["CANDLE_Q8K_STRATEGY"], "CANDLE_Q8K_STRATEGY")
            changes["attention_aware"] = False
        if changes:
            # the original tool's switches select the seed chain, replacing an explicit one
            changes["strategies"] = None
        if "CANDLE_Q8K_THREADS" in env:
            changes["workers"] = parse_positive_int(env["CANDLE_Q8K_THREADS"], "CANDLE_Q8K_THREADS")
        if "CANDLE_Q8K_VALIDATION" in env:
            changes["validation"] = parse_bool(env["CANDLE_Q8K_VALIDATION"], "CANDLE_Q8K_VALIDATION")
        if "CANDLE_Q8K_VARIANT" in env:
            changes["variant"] = env["CANDLE_Q8K_VARIANT"]
        return replace(self, **changes)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(value: str, where: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{where}: expected 1/true/yes/on or 0/false/no/off, got {value!r}")


def parse_positive_int(value: str, where: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return number

