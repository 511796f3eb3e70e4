"""Permutation strategies, registered by the name a user writes, and the strategy chain."""

from __future__ import annotations

import inspect

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qstrat.errors import ConfigError
from qstrat.strategies.attention import AttentionAwareStrategy
from qstrat.strategies.base import (
    PERMUTATION_KINDS,
    Candidate,
    Permutation,
    QuantizationStrategy,
    SquaredError,
    descending_order,
)
from qstrat.strategies.columnwise import (
    AbsMaxStrategy,
    IdentityStrategy,
    L2NormStrategy,
)
from qstrat.strategies.joint import HeadOrderStrategy, MlpJointStrategy
from qstrat.strategies.qr import QrPivotStrategy
from qstrat.strategies.residual import ResidualChoice, ResidualStreamStrategy

STRATEGIES: dict[str, type[QuantizationStrategy]] = {
    cls.name: cls
    for cls in (
        IdentityStrategy,
        L2NormStrategy,
        AbsMaxStrategy,
        QrPivotStrategy,
        AttentionAwareStrategy,
        MlpJointStrategy,
        HeadOrderStrategy,
        ResidualStreamStrategy,
    )
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
    accepted = inspect.signature(STRATEGIES[name]).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        known = ", ".join(accepted) or "none"
        raise ConfigError(f"strategy {name}: unknown option(s) {', '.join(unknown)} (its options: {known})")
    return STRATEGIES[name](**options)


@dataclass(frozen=True)
class Assignment:
    """One group of tensors and the strategy that permutes it."""

    strategy: QuantizationStrategy
    members: tuple[str, ...]


class StrategyChain:
    """An ordered list of strategies; each tensor goes to the first one that claims it.

    Per-tensor strategies take the quantizable tensors still unclaimed; group strategies
    claim whole groups (joint ones may include tensors that are not quantized, such as
    biases, which are then stored permuted), and a group that overlaps an earlier claim is
    an error at plan time.  Quantizable tensors nobody claims go to the last entry when it
    is a per-tensor strategy, else to ``identity``.
    """

    def __init__(self, entries: Sequence[str | Mapping[str, object] | QuantizationStrategy] = ()) -> None:
        strategies = [make_strategy(e) for e in entries]
        model_level = [s for s in strategies if s.model_level]
        if len(model_level) > 1:
            raise ConfigError(f"strategy {model_level[0].name} appears twice in the chain")
        runtime = sorted({s.name for s in strategies if s.permutation_kind == "runtime"})
        if model_level and runtime:
            raise ConfigError(
                f"strategy {model_level[0].name} combines only with function-preserving strategies (mlp_joint, "
                f"head_order) and identity, not with {', '.join(runtime)}: a run-time gather would permute the "
                "columns it permutes"
            )
        #: the model-level strategy (residual_stream), if the chain has one
        self.model_level = model_level[0] if model_level else None
        self.strategies = [s for s in strategies if not s.model_level] or [IdentityStrategy()]
        last = self.strategies[-1]
        if last.per_tensor and last.match is not None:
            # it takes every quantizable tensor left (below): a match there was silently ignored
            raise ConfigError(f"strategy {last.name}: match {last.match_source!r} on the last entry, which takes every "
                              "tensor left whatever its name: add identity after it for the others")

    def assign(
        self, candidates: Mapping[str, Candidate], model_config: Mapping[str, object] | None = None
    ) -> list[Assignment]:
        model_config = model_config or {}
        owner: dict[str, str] = {}
        assignments: list[Assignment] = []
        for strategy in self.strategies:
            offered = (
                {n: c for n, c in candidates.items() if n not in owner} if strategy.per_tensor else candidates
            )
            for members in strategy.claim(offered, model_config):
                for member in members:
                    if member in owner and owner[member] == strategy.name:
                        raise ConfigError(f"strategy {strategy.name} appears twice in the chain, and both claim tensor {member!r}: "
                                          "keep one, or narrow each with match")
                    if member in owner:
                        raise ConfigError(
                            f"tensor {member!r} is claimed by both {owner[member]} and {strategy.name}; "
                            "a tensor can belong to one group only: reorder or narrow the strategy chain"
                        )
                    owner[member] = strategy.name
                assignments.append(Assignment(strategy, tuple(members)))
        last = self.strategies[-1]
        fallback = last if last.per_tensor else IdentityStrategy()
        assignments.extend(
            Assignment(fallback, (name,))
            for name in sorted(candidates)
            if name not in owner and candidates[name].quantizable
        )
        return assignments

    def notes(self, candidates: Mapping[str, Candidate], model_config: Mapping[str, object] | None = None) -> list[str]:
        """What the chain's strategies recognise in ``candidates`` yet leave unpermuted, and why: one
        sentence each, named by strategy."""
        return [f"strategy {s.name}: {sentence}" for s in self.strategies for sentence in s.passed_over(candidates, model_config or {})]

    def describe(self) -> list[dict[str, object]]:
        return ([self.model_level.describe()] if self.model_level else []) + [s.describe() for s in self.strategies]


__all__ = [
    "PERMUTATION_KINDS",
    "STRATEGIES",
    "AbsMaxStrategy",
    "Assignment",
    "AttentionAwareStrategy",
    "Candidate",
    "HeadOrderStrategy",
    "MlpJointStrategy",
    "Permutation",
    "QrPivotStrategy",
    "ResidualChoice",
    "ResidualStreamStrategy",
    "IdentityStrategy",
    "L2NormStrategy",
    "QuantizationStrategy",
    "SquaredError",
    "StrategyChain",
    "descending_order",
    "make_strategy",
]
