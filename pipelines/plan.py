"""Plan a run before a byte is written: which tensors, which strategy, which files."""

from __future__ import annotations

from dataclasses import dataclass

from qstrat.config import QuantizationConfig
from qstrat.io.names import assign_file_stems
from qstrat.io.safetensors import FLOAT_DTYPES, SafetensorsModel, TensorInfo
from qstrat.kernels import QK_K
from qstrat.strategies import QuantizationStrategy


@dataclass(frozen=True)
class TensorJob:
    """One tensor to quantize: where it is read from, and the stem of its output files."""

    info: TensorInfo
    stem: str


@dataclass(frozen=True)
class GroupJob:
    """Tensors that one strategy permutes together; the unit of work a worker takes."""

    strategy: QuantizationStrategy
    members: tuple[TensorJob, ...]

    @property
    def nbytes(self) -> int:
        return sum(m.info.nbytes for m in self.members)


@dataclass(frozen=True)
class PassthroughTensor:
    info: TensorInfo
    reason: str


@dataclass(frozen=True)
class Plan:
    groups: tuple[GroupJob, ...]
    passthrough: tuple[PassthroughTensor, ...]

    @property
    def quantized_names(self) -> list[str]:
        return sorted(m.info.name for g in self.groups for m in g.members)


def passthrough_reason(info: TensorInfo, skip_patterns: tuple[str, ...]) -> str | None:
    """Why a tensor is not quantized, or None if it is (the original tool's rules)."""
    if info.dtype not in FLOAT_DTYPES:
        return f"dtype {info.dtype} is not quantizable"
    if len(info.shape) != 2:
        return f"{len(info.shape)}-D, only 2-D matrices are quantized"
    if not info.name.endswith(".weight"):
        return "name does not end in .weight"
    for pattern in skip_patterns:
        if pattern in info.name:
            return f"matches skip pattern {pattern!r}"
    rows, k = info.shape
    if k == 0 or k % QK_K:
        return f"row length {k} is not a multiple of {QK_K}"
    if rows == 0:
        return "has no rows"
    return None


def make_plan(model: SafetensorsModel, config: QuantizationConfig) -> Plan:
    """Assign every tensor of ``model`` to a strategy group or to the passthrough file."""
    passthrough = []
    candidates: dict[str, TensorInfo] = {}
    for info in model:
        reason = passthrough_reason(info, tuple(config.skip_patterns))
        if reason is None:
            candidates[info.name] = info
        else:
            passthrough.append(PassthroughTensor(info, reason))
    stems = assign_file_stems(list(candidates))
    assignments = config.strategy_chain().assign({n: i.shape for n, i in candidates.items()})
    groups = tuple(
        GroupJob(a.strategy, tuple(TensorJob(candidates[n], stems[n]) for n in a.members)) for a in assignments
    )
    return Plan(groups, tuple(sorted(passthrough, key=lambda p: p.info.name)))
