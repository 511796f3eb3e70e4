"""Permutation strategies, registered by the name a user writes, and the strategy chain."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qstrat.errors import ConfigError
from qstrat.strategies.attention import AttentionAwareStrategy
from qstrat.strategies.base import PERMUTATION_KINDS, QuantizationStrategy, descending_order
from qstrat.strategies.columnwise import AbsMaxStrategy, IdentityStrategy, L2NormStrategy

STRATEGIES: dict[str, type[QuantizationStrategy]] = {
    cls.name: cls for cls in (IdentityStrategy, L2NormStrategy, AbsMaxStrategy, AttentionAwareStrategy)
}


def make_strategy(spec: str | Mapping[str, object] | QuantizationStrategy) -> QuantizationStrategy:
    """A strategy from its name, or from a mapping ``{"name": ..., "match": ..., options...}``."""
    if isinstance(spec, QuantizationStrategy):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    options = dict(spec)
    name = options.pop("name", None)
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    try:
        return STRATEGIES[name](**options)
    except TypeError:
        raise ConfigError(f"strategy {name}: unknown option(s) {', '.join(sorted(options))}") from None


@dataclass(frozen=True)
class Assignment:
    """One group of tensors and the strategy that permutes it."""

    strategy: QuantizationStrategy
    members: tuple[str, ...]


class StrategyChain:
    """An ordered list of strategies; each tensor goes to the first one that claims it.

    Tensors no entry claims go to the last entry when it is a per-tensor strategy, else to
    ``identity``.  A tensor claimed twice by one group strategy is an error at plan time.
    """

    def __init__(self, entries: Sequence[str | Mapping[str, object] | QuantizationStrategy] = ()) -> None:
        self.strategies = [make_strategy(e) for e in entries] or [IdentityStrategy()]

    def assign(self, shapes: Mapping[str, tuple[int, ...]]) -> list[Assignment]:
        remaining = dict(shapes)
        assignments: list[Assignment] = []
        for strategy in self.strategies:
            claimed: set[str] = set()
            for members in strategy.claim(remaining):
                for member in members:
                    if member in claimed:
                        raise ConfigError(f"strategy {strategy.name} claims tensor {member!r} in two groups")
                    claimed.add(member)
                assignments.append(Assignment(strategy, tuple(members)))
            for member in claimed:
                remaining.pop(member)
        last = self.strategies[-1]
        fallback = last if last.per_tensor else IdentityStrategy()
        assignments.extend(Assignment(fallback, (name,)) for name in sorted(remaining))
        return assignments

    def describe(self) -> list[dict[str, object]]:
        return [s.describe() for s in self.strategies]


__all__ = [
    "PERMUTATION_KINDS",
    "STRATEGIES",
    "AbsMaxStrategy",
    "Assignment",
    "AttentionAwareStrategy",
    "IdentityStrategy",
    "L2NormStrategy",
    "QuantizationStrategy",
    "StrategyChain",
    "descending_order",
    "make_strategy",
]
