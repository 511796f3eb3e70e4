"""What users of the original tool write: its ``StrategyType`` names, and its ``CANDLE_Q8K_*``
environment variables, each defined once in :data:`ENVIRONMENT` (both commands, the library's
``with_environment`` and the README's table use it)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from qstrat.blocks import DEFAULT_VARIANT, Q8K_VARIANTS
from qstrat.errors import ConfigError


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


def seed_chain(permute: bool, strategy: StrategyType) -> list[str]:
    """The chain the original tool ran: its strategy only when permuting, else no permutation."""
    return list(SEED_CHAINS[strategy]) if permute else ["identity"]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}  # an empty value is an error, as for the other variables


def parse_bool(value: str, where: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{where}: expected 1/true/yes/on or 0/false/no/off, got {value!r}")


def parse_positive_int(value: str, where: str) -> int:
    # digits, as Rust's usize parse reads them (Python's int() would also take 1_0)
    number = int(value.strip()) if re.fullmatch(r"\+?[0-9]+", value.strip()) else 0
    if number < 1:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return number


def _parse_strategy(value: str, where: str) -> StrategyType:
    return StrategyType.parse(value.strip(), where)


def _parse_variant(value: str, where: str) -> str:
    value = value.strip()  # as the other variables are read
    if value not in Q8K_VARIANTS:
        raise ConfigError(f"{where}: unknown Q8K variant {value!r}; choose one of {', '.join(Q8K_VARIANTS)}")
    return value


@dataclass(frozen=True)
class EnvVar:
    """One ``CANDLE_Q8K_*`` variable: the run config key it sets, how its text is read, its docs."""

    name: str
    key: str  # dotted path in the run config (YAML, --set)
    parse: Callable[[str, str], object]
    default: str  # the original tool's default, as written in the environment
    meaning: str  # markdown, one line


PERMUTE = "CANDLE_Q8K_PERMUTE"
STRATEGY = "CANDLE_Q8K_STRATEGY"

ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar(PERMUTE, "strategies", parse_bool, "off",
           "`1`/`true`/`yes`/`on`: permute, with the strategy `CANDLE_Q8K_STRATEGY` names; "
           "`0`/`false`/`no`/`off`: no permutation (chain `identity`)"),
    EnvVar(STRATEGY, "strategies", _parse_strategy, StrategyType.L2_NORM.value,
           f"{', '.join(f'`{s.value}`' for s in StrategyType)} (an unknown name is an error): the strategy "
           "`CANDLE_Q8K_PERMUTE=1` permutes with (`attention_aware` permutes the other tensors by `l2_norm`); "
           "alone it selects no permutation, as in the original tool"),
    EnvVar("CANDLE_Q8K_THREADS", "parallel.workers", parse_positive_int, "1", "worker processes"),
    EnvVar("CANDLE_Q8K_VALIDATION", "validation.enabled", parse_bool, "1",
           "`1`/`true`/`yes`/`on` (any case): measure the quantization error; `0`/`false`/`no`/`off`: skip it"),
    EnvVar("CANDLE_Q8K_VARIANT", "variant", _parse_variant, DEFAULT_VARIANT,
           f"Q8K rounding variant: {', '.join(f'`{v}`' for v in Q8K_VARIANTS)}"),
)

_BY_NAME = {var.name: var for var in ENVIRONMENT}


def environment_settings(environ: Mapping[str, str]) -> dict[str, object]:
    """Run config key -> value for every ``CANDLE_Q8K_*`` variable set in ``environ``.

    Either of ``CANDLE_Q8K_PERMUTE`` / ``CANDLE_Q8K_STRATEGY`` selects the original tool's chain
    for the pair, the one not set taking the original tool's default.
    """
    values = {var.name: var.parse(environ[var.name], var.name) for var in ENVIRONMENT if var.name in environ}
    settings = {_BY_NAME[name].key: value for name, value in values.items() if name not in (PERMUTE, STRATEGY)}
    if PERMUTE in values or STRATEGY in values:
        permute, strategy = (values.get(n, _BY_NAME[n].parse(_BY_NAME[n].default, n)) for n in (PERMUTE, STRATEGY))
        settings["strategies"] = seed_chain(permute, strategy)
    return settings


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The ``CANDLE_Q8K_*`` variables set in ``environ`` that qstrat does not read (misspelt ones)."""
    return sorted(name for name in environ if name.startswith("CANDLE_Q8K_") and name not in _BY_NAME)


def environment_table() -> str:
    """The README's table of the variables (a test checks that the README has it)."""
    rows = ["| variable | meaning | `qstrat run` key | default |", "| --- | --- | --- | --- |"]
    rows += [f"| `{v.name}` | {v.meaning} | `{v.key}` | `{v.default}` |" for v in ENVIRONMENT]
    return "\n".join(rows) + "\n"


def environment_help() -> str:
    """The variables for a command's ``--help`` (plain text, one per line)."""
    width = max(len(v.name) for v in ENVIRONMENT) + 2
    return "\n".join(f"  {v.name:<{width}}{v.meaning.replace('`', '')} (default {v.default})" for v in ENVIRONMENT)
