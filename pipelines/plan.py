"""Plan a run before a byte is written: which tensors, which strategy, which files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from qstrat.errors import ConfigError, InputError
from qstrat.formats import block_type
from qstrat.presets import (
    PresetError,
    TensorChoice,
    choose_types,
    fallback_type,
    gguf_arch,
    gguf_tensor_names,
    tensor_allows_quantization,
)
from qstrat.report import stacked_passthrough
from qstrat.runconfig import DEFAULT_FORMAT, RunConfig
from qstrat.io.names import assign_file_stems
from qstrat.io.safetensors import (
    FLOAT_DTYPES,
    SafetensorsModel,
    TensorInfo,
    read_model_config,
    stacked_rows,
)
from qstrat.strategies import (
    Assignment,
    Candidate,
    IdentityStrategy,
    Permutation,
    QuantizationStrategy,
    ResidualChoice,
    ResidualStreamStrategy,
)


def writes_q8k(choice: TensorChoice) -> bool:
    """Whether a tensor is the original tool's Q8K, written as a .q8k file in the run's variant."""
    return choice.type_name == DEFAULT_FORMAT


def in_its_type(info: TensorInfo, choice: TensorChoice) -> bool:
    """Whether a GGUF input stores the tensor in the type it is written in: unless its columns move,
    it is copied (llama.cpp's quantizer quantizes only when the type changes; requantizing the decoded
    values would lose a little more).  Q8K files are always the run's variant of the original tool."""
    return info.encoding == choice.type_name and not writes_q8k(choice)


@dataclass(frozen=True)
class TensorJob:
    """One tensor of a group: where it is read from, and (if quantized) its file stem and type."""

    info: TensorInfo
    stem: str | None  # None: not quantized, only permuted with its group into the passthrough file
    choice: TensorChoice | None = None
    #: the importance vector (float32, one value per column in source order; a stack's: one per
    #: matrix, as rows), with an imatrix
    importance: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: the model's residual-stream permutation on this tensor's axis that carries the stream
    residual: Permutation | None = field(default=None, compare=False, repr=False)

    @property
    def quantize(self) -> bool:
        return self.stem is not None


@dataclass(frozen=True)
class GroupJob:
    """Tensors that one strategy permutes together; the unit of work a worker takes."""

    strategy: QuantizationStrategy
    group_id: str
    members: tuple[TensorJob, ...]
    with_imatrix: bool = False  # whether the run has an importance matrix (members may lack a vector)

    @property
    def nbytes(self) -> int:
        return sum(m.info.nbytes for m in self.members)


@dataclass(frozen=True)
class PassthroughTensor:
    info: TensorInfo
    reason: str


@dataclass(frozen=True)
class ImportanceUse:
    """The run's importance matrix: which file, and which quantized tensors it has no vector for."""

    path: Path
    sha256: str
    datasets: tuple[str, ...]
    chunk_count: int
    used: tuple[str, ...]
    missing: tuple[str, ...]

    def describe(self) -> dict[str, object]:
        """What the manifest records (its digest makes it part of the run's fingerprint)."""
        return {"path": str(self.path), "sha256": self.sha256, "datasets": list(self.datasets), "chunk_count": self.chunk_count}


@dataclass(frozen=True)
class ResidualPlan:
    """residual_stream in a run: the strategy, the axis carrying the stream in each tensor that
    has one, and (once chosen, after the plan) the permutation."""

    strategy: ResidualStreamStrategy
    axes: dict[str, int]
    choice: ResidualChoice | None = None

    def permutation(self, name: str) -> Permutation | None:
        axis = self.axes.get(name)
        return None if axis is None or self.choice is None else self.choice.permutation(axis)


@dataclass(frozen=True)
class Plan:
    groups: tuple[GroupJob, ...]
    passthrough: tuple[PassthroughTensor, ...]
    importance: ImportanceUse | None = None
    residual: ResidualPlan | None = None
    #: sentences a user should read before the run: most of the model passed through, a layer a
    #: strategy recognised yet leaves unpermuted
    notes: tuple[str, ...] = ()

    def residual_readers(self) -> dict[str, TensorJob]:
        """The quantized tensors whose columns are the residual stream (what its choice measures)."""
        if self.residual is None:
            return {}
        return {m.info.name: m for g in self.groups for m in g.members if m.quantize and self.residual.axes.get(m.info.name) == 1}

    def with_residual(self, choice: ResidualChoice) -> Plan:
        """The plan with the residual-stream permutation chosen and handed to every member."""
        residual = replace(self.residual, choice=choice)
        groups = tuple(
            replace(g, members=tuple(replace(m, residual=residual.permutation(m.info.name)) for m in g.members))
            for g in self.groups
        )
        return replace(self, groups=groups, residual=residual)


def tensor_choice(info: TensorInfo, config: RunConfig, preset_types: dict[str, TensorChoice]) -> TensorChoice | str:
    """The block type of a tensor, or why it is not quantized: the original tool's rules, then
    ``format_rules``, the preset's type (``preset_types``) or ``format``, with llama.cpp's
    fallback where a type's blocks do not divide the rows."""
    if info.dtype not in FLOAT_DTYPES:
        return f"dtype {info.dtype} is not quantizable"
    if len(info.shape) not in (2, 3):
        return f"{len(info.shape)}-D, only 2-D matrices (and 3-D stacks of them) are quantized"
    if not info.name.endswith(".weight"):
        return "name does not end in .weight"
    pattern = config.skips(info.name)
    if pattern is not None:
        return f"matches skip pattern {pattern!r}"
    rows, k = stacked_rows(info.shape), info.shape[-1]
    if rows == 0 or k == 0:
        return "has no rows" if k else "row length 0"
    asked = config.rule_format(info.name)
    if asked is None and config.preset is not None:
        chosen = preset_types.get(info.name)
        return chosen if chosen is not None else f"llama.cpp's {config.preset} does not quantize it"
    if asked is None and config.format != DEFAULT_FORMAT and not tensor_allows_quantization(info.name, info.shape):
        # a uniform format is llama.cpp's pure quantization, which keeps a MoE router, position and
        # token-type embeddings as they are; the original tool's Q8K quantizes every matrix
        return f"llama.cpp never quantizes it (nor does its pure {config.format}); a format_rules entry can"
    asked = asked or config.format
    if asked == DEFAULT_FORMAT and len(info.shape) == 3:
        return "3-D: a stack of matrices (a MoE model's experts); Q8_K holds matrices only (the original tool's .q8k files): give stacks a GGUF block type"
    if asked == DEFAULT_FORMAT:
        # the original tool's Q8K has no fallback: such a tensor passes through, as there
        block = block_type(asked).block_size
        return TensorChoice(asked, None) if k % block == 0 else f"row length {k} is not a multiple of {block}"
    fitting = fallback_type(asked, k)
    return TensorChoice(fitting, None if fitting == asked else asked)


def tensor_choices(model: SafetensorsModel, config: RunConfig) -> dict[str, TensorChoice | str]:
    """:func:`tensor_choice` of every tensor of ``model``: its block type, or why it is not quantized."""
    by_preset = preset_types(model, config)
    return {info.name: tensor_choice(info, config, by_preset) for info in model}


def preset_types(model: SafetensorsModel, config: RunConfig) -> dict[str, TensorChoice]:
    """Each tensor's type under ``config.preset``, by llama.cpp's rules (qstrat.presets), which
    need the model's llama.cpp tensor names and its config.json."""
    if config.preset is None:
        return {}
    hf = read_model_config(model)
    where = f"{model.path}: preset {config.preset}"
    try:
        arch = gguf_arch(hf.get("model_type"))
        n_layer, n_head = int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
        n_head_kv = int(hf.get("num_key_value_heads") or n_head)
        n_expert = int(hf.get("num_local_experts") or 0)
    except KeyError as err:
        raise InputError(f"{where} needs config.json's {err.args[0]}") from None
    except PresetError as err:  # not an architecture the rules serve: a setting to change (compare goes on to its other cases)
        raise ConfigError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:
        raise InputError(f"{where}: {err}") from None
    names = gguf_tensor_names(list(model.tensors), arch, n_layer)
    listed = [(gguf_name, model.tensors[name].shape) for name, gguf_name in names.items() if gguf_name is not None]
    try:
        chosen = choose_types(config.preset, listed, n_head=n_head, n_head_kv=n_head_kv, n_layer=n_layer, n_expert=n_expert, arch=arch,
                              has_imatrix=config.imatrix is not None)
    except PresetError as err:  # this preset cannot serve this model (or not without an imatrix): a setting to change
        raise ConfigError(f"{where}: {err}") from None
    return {name: chosen[gguf_name] for name, gguf_name in names.items() if gguf_name in chosen}


def llama_cpp_names(model: SafetensorsModel) -> dict[str, str]:
    """Each tensor's llama.cpp name, where the model is of the Llama family (a GGUF input's names
    are llama.cpp's already); otherwise its own name."""
    from qstrat.llama_gguf import LLAMA_FAMILY

    names = {name: name for name in model.tensors}
    hf = read_model_config(model)
    if hf.get("model_type") not in LLAMA_FAMILY or "gguf_architecture" in hf:
        return names
    try:
        mapped = gguf_tensor_names(list(model.tensors), gguf_arch(str(hf["model_type"])), int(hf["num_hidden_layers"]))
    except (KeyError, PresetError, TypeError, ValueError):
        return names
    return {name: mapped.get(name) or name for name in names}


def importance_vectors(model: SafetensorsModel, config: RunConfig, quantized: dict[str, TensorInfo]) -> tuple[dict[str, np.ndarray], ImportanceUse | None]:
    """The importance vector of each quantized tensor from ``config.imatrix`` (by the tensor's
    llama.cpp name, as llama-quantize looks it up), and what the report says of the file."""
    if config.imatrix is None:
        return {}, None
    from qstrat.imatrix import read_imatrix

    path = Path(config.imatrix)
    imatrix = read_imatrix(path)
    names = llama_cpp_names(model)
    vectors, missing = {}, []
    for name, info in sorted(quantized.items()):
        key = names.get(name, name)
        vector = imatrix.vector(key)
        # one vector per matrix: a stack's (MoE experts) are rows, as llama-quantize slices them
        matrices, k = (info.shape[0] if len(info.shape) == 3 else 1), info.shape[-1]
        if vector is not None and vector.size != matrices * k:
            if key == "token_embd.weight":  # llama-quantize ignores a token embedding's mismatch
                vector = None
            else:
                expected = f"rows of {k}" if matrices == 1 else f"{matrices} matrices with rows of {k} ({matrices * k} values)"
                held = f" ({vector.size // k} of {k})" if vector.size % k == 0 and vector.size > k else ""
                raise InputError(f"imatrix {path}: {key} has {vector.size} values{held}; tensor {name!r} has {expected}")
        if vector is None:
            missing.append(name)
        else:
            vectors[name] = vector if matrices == 1 else vector.reshape(matrices, k)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    use = ImportanceUse(path, digest, tuple(imatrix.datasets), imatrix.chunk_count, tuple(sorted(vectors)), tuple(missing))
    return vectors, use


def check_llama_cpp_target(model: SafetensorsModel, config: RunConfig, groups: tuple[GroupJob, ...], outputs: tuple[str, ...]) -> None:
    """Refuse run-time permutations in a run whose GGUF is a llama.cpp model (a Llama-family
    model, weights in types llama.cpp runs): llama.cpp has no way to gather its input."""
    from qstrat.llama_gguf import LLAMA_FAMILY

    model_type = read_model_config(model).get("model_type")
    if "gguf" not in outputs or model_type not in LLAMA_FAMILY:
        return
    members = [m for g in groups for m in g.members if m.quantize]
    if any(writes_q8k(m.choice) for m in members):
        return  # Q8_K: qstrat's container, for Candle; llama.cpp cannot run it anyway
    runtime = sorted({g.strategy.name for g in groups if g.strategy.permutation_kind == "runtime"})
    if runtime:
        raise ConfigError(
            f"strategies: {', '.join(runtime)} permute{'s' if len(runtime) == 1 else ''} columns at run time (.perm gather maps), "
            f"which llama.cpp cannot apply, and this run writes a llama.cpp GGUF ({model_type} model, "
            f"{config.preset or config.format}); use the function-preserving strategies mlp_joint, head_order "
            "(configs/function_preserving.yaml), or identity"
        )


def make_plan(model: SafetensorsModel, config: RunConfig, outputs: tuple[str, ...] | None = None) -> Plan:
    """Assign every tensor of ``model`` to a strategy group and/or the passthrough file.
    ``outputs`` (default: the config's) decide whether the run writes a llama.cpp GGUF, which
    refuses run-time permutations."""
    choices = tensor_choices(model, config)
    reasons = {name: c for name, c in choices.items() if isinstance(c, str)}
    # joint groups may hold float tensors that are not quantized (biases), never other dtypes;
    # stacks of matrices (MoE experts) are quantized as they are: no strategy permutes them
    candidates = {
        name: Candidate(info.shape, name not in reasons)
        for name, info in model.tensors.items()
        if info.dtype in FLOAT_DTYPES and len(info.shape) <= 2
    }
    stems = assign_file_stems([n for n in choices if n not in reasons])
    vectors, importance = importance_vectors(model, config, {n: model.tensors[n] for n in stems})
    chain = config.strategy_chain()
    model_config = read_model_config(model)
    assignments = chain.assign(candidates, model_config)
    stacked = stacked_passthrough(model.tensors, reasons)
    notes = ([stacked] if stacked else []) + chain.notes(candidates, model_config)
    assignments += [Assignment(IdentityStrategy(), (name,)) for name in sorted(stems) if name not in candidates]
    residual = None
    if chain.model_level is not None:
        residual = ResidualPlan(chain.model_level, chain.model_level.axes({n: i.shape for n, i in model.tensors.items()}))
    groups = tuple(
        GroupJob(
            a.strategy,
            a.strategy.group_id(a.members),
            tuple(
                TensorJob(model.tensors[n], stems.get(n), None if n in reasons else choices[n], vectors.get(n))
                for n in a.members
            ),
            importance is not None,
        )
        for a in assignments
    )
    passthrough = tuple(
        PassthroughTensor(model.tensors[name], reason) for name, reason in sorted(reasons.items())
    )
    outputs = config.output_kinds if outputs is None else tuple(outputs)
    check_llama_cpp_target(model, config, groups, outputs)
    empty = sorted(info.name for info in model if "gguf" in outputs and 0 in info.shape)
    if empty:  # GGUF readers (gguf-py's, llama.cpp's checks of tensor data) take no tensor without values
        shape = tuple(model.tensors[empty[0]].shape)
        raise InputError(f"{model.tensors[empty[0]].path}: tensor {empty[0]!r} has shape {shape}, no values, which a GGUF "
                         f"file cannot hold for qstrat's readers ({len(empty)} such tensor(s)); write outputs: [q8k] (format q8_k) instead")
    if residual is not None:
        _check_residual_axes(groups, residual)
    return Plan(groups, passthrough, importance, residual, tuple(notes))


def _check_residual_axes(groups: tuple[GroupJob, ...], residual: ResidualPlan) -> None:
    """A group strategy may permute only the other axis of a tensor the residual stream runs through
    (mlp_joint and head_order do, by construction); checked on names, before anything is read."""
    for group in groups:
        if group.strategy.permutation_kind != "joint":
            continue
        for member in group.members:
            axis = residual.axes.get(member.info.name)
            if axis is not None and len(member.info.shape) == 1:
                raise ConfigError(
                    f"strategies residual_stream and {group.strategy.name} both permute the 1-D tensor {member.info.name!r}"
                )
