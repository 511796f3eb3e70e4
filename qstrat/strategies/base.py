"""The strategy interface: which tensors a strategy claims, and the permutations it picks."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from qstrat.errors import ConfigError

#: how a permutation is undone: not at all, by a run-time gather (.perm), or by the model itself
PERMUTATION_KINDS = ("none", "runtime", "joint")


class QuantizationStrategy(ABC):
    """A named way of choosing column permutations before Q8K quantization.

    ``claim`` runs at plan time on names and shapes only; ``column_permutations`` runs in a
    worker on the mapped tensors of one claimed group and must be a pure function of them,
    so that results never depend on tensor order, worker count or earlier runs.
    """

    name: ClassVar[str]
    permutation_kind: ClassVar[str]
    #: per-tensor strategies can take any tensor; group strategies only what they recognise
    per_tensor: ClassVar[bool] = True

    def __init__(self, match: str | None = None) -> None:
        try:
            self.match = re.compile(match) if match else None
        except re.error as err:
            raise ConfigError(f"strategy {self.name}: invalid match regex {match!r}: {err}") from None
        self.match_source = match

    def matches(self, tensor_name: str) -> bool:
        return self.match is None or self.match.search(tensor_name) is not None

    def claim(self, shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, ...]]:
        """Groups of tensor names this strategy takes, from the still unclaimed ``shapes``."""
        return [(name,) for name in sorted(shapes) if self.matches(name)]

    @abstractmethod
    def column_permutations(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | None]:
        """Per member of a claimed group, its gather map (stored j <- original perm[j]) or None."""

    def describe(self) -> dict[str, object]:
        spec: dict[str, object] = {"name": self.name}
        if self.match_source:
            spec["match"] = self.match_source
        return spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def descending_order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; ties keep ascending index (a stable sort)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable").astype(np.int64)


def common_width(tensors: Mapping[str, np.ndarray], strategy: str) -> int:
    widths = {array.shape[1] for array in tensors.values()}
    if len(widths) != 1:
        raise ConfigError(f"strategy {strategy}: members of one group differ in width: {sorted(widths)}")
    return widths.pop()


def validate_chain_names(names: Sequence[str], known: Sequence[str]) -> None:
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(known)}")
