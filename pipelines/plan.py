"""Plan a run before a byte is written: which tensors, which strategy, which files."""

from __future__ import annotations

from dataclasses import dataclass

from qstrat.formats import block_type, fitting_type
from qstrat.runconfig import DEFAULT_FORMAT, RunConfig
from qstrat.io.names import assign_file_stems
from qstrat.io.safetensors import (
    FLOAT_DTYPES,
    SafetensorsModel,
    TensorInfo,
    read_model_config,
)
from qstrat.strategies import Candidate, QuantizationStrategy


@dataclass(frozen=True)
class TensorChoice:
    """The block type a quantized tensor gets, and the one asked for when that could not take its rows."""

    format: str
    fallback_from: str | None = None

    @property
    def q8k(self) -> bool:
        """Whether it is the original tool's Q8K, written as a .q8k file in the run's variant."""
        return self.format == DEFAULT_FORMAT


@dataclass(frozen=True)
class TensorJob:
    """One tensor of a group: where it is read from, and (if quantized) its file stem and type."""

    info: TensorInfo
    stem: str | None  # None: not quantized, only permuted with its group into the passthrough file
    choice: TensorChoice | None = None

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


def tensor_choice(info: TensorInfo, config: RunConfig) -> TensorChoice | str:
    """The block type of a tensor, or why it is not quantized (the original tool's rules, and
    llama.cpp's fallback where a type's blocks do not divide the rows)."""
    if info.dtype not in FLOAT_DTYPES:
        return f"dtype {info.dtype} is not quantizable"
    if len(info.shape) != 2:
        return f"{len(info.shape)}-D, only 2-D matrices are quantized"
    if not info.name.endswith(".weight"):
        return "name does not end in .weight"
    for pattern in config.skip_list:
        if pattern in info.name:
            return f"matches skip pattern {pattern!r}"
    rows, k = info.shape
    asked = config.format_of(info.name)
    fitting = fitting_type(asked, k) if k else None
    if fitting is None:
        return f"row length {k} is not a multiple of {block_type(asked).block_size}"
    if rows == 0:
        return "has no rows"
    return TensorChoice(fitting, None if fitting == asked else asked)


def make_plan(model: SafetensorsModel, config: RunConfig) -> Plan:
    """Assign every tensor of ``model`` to a strategy group and/or the passthrough file."""
    choices = {info.name: tensor_choice(info, config) for info in model}
    reasons = {name: c for name, c in choices.items() if isinstance(c, str)}
    # joint groups may hold float tensors that are not quantized (biases), never other dtypes
    candidates = {
        name: Candidate(info.shape, name not in reasons)
        for name, info in model.tensors.items()
        if info.dtype in FLOAT_DTYPES
    }
    stems = assign_file_stems([n for n in choices if n not in reasons])
    assignments = config.strategy_chain().assign(candidates, read_model_config(model))
    groups = tuple(
        GroupJob(
            a.strategy,
            a.strategy.group_id(a.members),
            tuple(TensorJob(model.tensors[n], stems.get(n), None if n in reasons else choices[n]) for n in a.members),
        )
        for a in assignments
    )
    passthrough = tuple(
        PassthroughTensor(model.tensors[name], reason) for name, reason in sorted(reasons.items())
    )
    return Plan(groups, passthrough)
