"""The strategy interface: which tensors a strategy claims, and the permutations it picks."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np

from qstrat.errors import ConfigError

#: how a permutation is undone: not at all, by a run-time gather (.perm), or by the model itself
PERMUTATION_KINDS = ("none", "runtime", "joint")


@dataclass(frozen=True)
class Candidate:
    """What a strategy may know of a tensor at plan time."""

    shape: tuple[int, ...]
    quantizable: bool


#: (member name, its kernel storage, a column order or None) -> the member's total squared
#: quantization error in the type it is written in, with its columns in that order
SquaredError = Callable[[str, np.ndarray, "np.ndarray | None"], float]


@dataclass(frozen=True)
class Permutation:
    """A gather map along one axis: stored index i holds source index ``perm[i]``."""

    perm: np.ndarray
    axis: int  # 0: rows (output features), 1: columns (input features)
    #: 10 log10(identity's error / this order's) of the tensor whose columns it moves, where measured
    gain_db: float | None = field(default=None, compare=False)


def gain_db(identity_error: float, error: float) -> float:
    """10 log10(identity_error / error): what an order gains over no permutation."""
    if error == identity_error:
        return 0.0
    return float("inf") if error == 0 else float(10 * np.log10(identity_error / error))


class QuantizationStrategy(ABC):
    """A named way of choosing permutations before quantization.

    ``claim`` runs at plan time on names and shapes only; ``permutations`` runs in a worker
    on the mapped tensors of one claimed group and must be a pure function of them, so that
    results never depend on tensor order, worker count or earlier runs.
    """

    name: ClassVar[str]
    permutation_kind: ClassVar[str]
    #: per-tensor strategies take any quantizable tensor left; group strategies only what they recognise
    per_tensor: ClassVar[bool] = True
    #: a model-level strategy (residual_stream) claims no group: one permutation for the whole model
    model_level: ClassVar[bool] = False
    #: whether ``permutations`` must see finite values only (the worker checks them first); a
    #: strategy of column statistics need not: a NaN spoils only the order of a tensor that the
    #: quantize kernel then refuses, naming the value (and the check's kernel is not compiled)
    needs_finite_values: ClassVar[bool] = True

    def __init__(self, match: str | None = None) -> None:
        self.match = compile_regex(match, f"strategy {self.name}: match") if match else None
        self.match_source = match

    def matches(self, tensor_name: str) -> bool:
        return self.match is None or self.match.search(tensor_name) is not None

    def planned_permutation(self, members: Sequence[str]) -> str:
        """The kind of permutation the claimed group ``members`` gets, as a plan shows it: the strategy's."""
        return self.permutation_kind

    def claim(
        self, candidates: Mapping[str, Candidate], model_config: Mapping[str, object]
    ) -> list[tuple[str, ...]]:
        """Groups of tensor names this strategy takes (per-tensor: one group per tensor)."""
        return [(name,) for name in sorted(candidates) if candidates[name].quantizable and self.matches(name)]

    def passed_over(self, candidates: Mapping[str, Candidate], model_config: Mapping[str, object]) -> list[str]:
        """Sentences for the user: what this strategy recognised yet leaves unpermuted, and why (a
        group strategy's; a per-tensor one takes every tensor it matches)."""
        return []

    @abstractmethod
    def permutations(self, tensors: Mapping[str, np.ndarray], error: SquaredError) -> dict[str, Permutation | None]:
        """Per member of a claimed group (kernel storage arrays), its permutation or None;
        ``error`` measures a member's actual quantization error under a column order."""

    def group_id(self, members: Sequence[str]) -> str:
        """A stable name for a claimed group (joint permutations are stored under it)."""
        return members[0]

    def describe(self) -> dict[str, object]:
        spec: dict[str, object] = {"name": self.name}
        if self.match_source:
            spec["match"] = self.match_source
        return spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def compile_regex(source: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(source)
    except re.error as err:
        raise ConfigError(f"{where}: invalid regex {source!r}: {err}") from None


def compile_patterns(sources: Sequence[str], where: str, groups: set[str]) -> list[re.Pattern[str]]:
    patterns = [compile_regex(p, where) for p in sources]
    for pattern in patterns:
        if not groups <= set(pattern.groupindex):
            raise ConfigError(f"{where}: pattern {pattern.pattern!r} needs the named groups {sorted(groups)}")
    return patterns


def descending_order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; ties keep ascending index (a stable sort)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable").astype(np.int64)


def common_width(tensors: Mapping[str, np.ndarray], strategy: str) -> int:
    widths = {array.shape[1] for array in tensors.values()}
    if len(widths) != 1:
        raise ConfigError(f"strategy {strategy}: members of one group differ in width: {sorted(widths)}")
    return widths.pop()
