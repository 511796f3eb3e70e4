"""Plan a run before a byte is written: which tensors, which strategy, which files."""

from __future__ import annotations

from dataclasses import dataclass

from qstrat.kernels import QK_K

from qstrat.runconfig import RunConfig
from qstrat.io.names import assign_file_stems
from qstrat.io.safetensors import (
    FLOAT_DTYPES,
    SafetensorsModel,
    TensorInfo,
    read_model_config,
)
from qstrat.strategies import Candidate, QuantizationStrategy


@dataclass(frozen=True)
class TensorJob:
    """One tensor of a group: where it is read from, and (if quantized) its file stem."""

    info: TensorInfo
    stem: str | None  # None: not quantized, only permuted with its group into the passthrough file

    @property
    def quantize(self) -> bool:
        return self.stem is not None


@dataclass(frozen=True)
class GroupJob:
    """Tensors that one strategy permutes together; the unit of work a worker takes."""

    strategy: QuantizationStrategy
    group_id: str
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


def make_plan(model: SafetensorsModel, config: RunConfig) -> Plan:
    """Assign every tensor of ``model`` to a strategy group and/or the passthrough file."""
    reasons = {info.name: passthrough_reason(info, tuple(config.skip_patterns)) for info in model}
    # joint groups may hold float tensors that are not quantized (biases), never other dtypes
    candidates = {
        name: Candidate(info.shape, reasons[name] is None)
        for name, info in model.tensors.items()
        if info.dtype in FLOAT_DTYPES
    }
    stems = assign_file_stems([n for n, r in reasons.items() if r is None])
    assignments = config.strategy_chain().assign(candidates, read_model_config(model))
    groups = tuple(
        GroupJob(
            a.strategy,
            a.strategy.group_id(a.members),
            tuple(TensorJob(model.tensors[n], stems.get(n)) for n in a.members),
        )
        for a in assignments
    )
    passthrough = tuple(
        PassthroughTensor(model.tensors[name], reason) for name, reason in sorted(reasons.items()) if reason is not None
    )
    return Plan(groups, passthrough)
