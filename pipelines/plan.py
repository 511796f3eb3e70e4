"""Plan a run before a byte is written: which tensors, which strategy, which files."""

from __future__ import annotations

from dataclasses import dataclass

from qstrat.errors import ConfigError, InputError
from qstrat.formats import block_type
from qstrat.presets import PresetError, TensorChoice, choose_types, fallback_type, gguf_arch, gguf_tensor_names
from qstrat.runconfig import DEFAULT_FORMAT, RunConfig
from qstrat.io.names import assign_file_stems
from qstrat.io.safetensors import (
    FLOAT_DTYPES,
    SafetensorsModel,
    TensorInfo,
    read_model_config,
)
from qstrat.strategies import Candidate, QuantizationStrategy


def writes_q8k(choice: TensorChoice) -> bool:
    """Whether a tensor is the original tool's Q8K, written as a .q8k file in the run's variant."""
    return choice.type_name == DEFAULT_FORMAT


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


def tensor_choice(info: TensorInfo, config: RunConfig, preset_types: dict[str, TensorChoice]) -> TensorChoice | str:
    """The block type of a tensor, or why it is not quantized: the original tool's rules, then
    ``format_rules``, the preset's type (``preset_types``) or ``format``, with llama.cpp's
    fallback where a type's blocks do not divide the rows."""
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
    if rows == 0 or k == 0:
        return "has no rows" if k else "row length 0"
    asked = config.rule_format(info.name)
    if asked is None and config.preset is not None:
        chosen = preset_types.get(info.name)
        return chosen if chosen is not None else f"llama.cpp's {config.preset} does not quantize it"
    asked = asked or config.format
    if asked == DEFAULT_FORMAT:
        # the original tool's Q8K has no fallback: such a tensor passes through, as there
        block = block_type(asked).block_size
        return TensorChoice(asked, None) if k % block == 0 else f"row length {k} is not a multiple of {block}"
    fitting = fallback_type(asked, k)
    return TensorChoice(fitting, None if fitting == asked else asked)


def preset_types(model: SafetensorsModel, config: RunConfig) -> dict[str, TensorChoice]:
    """Each tensor's type under ``config.preset``, by llama.cpp's rules (qstrat.presets), which
    need the model's llama.cpp tensor names and its config.json."""
    if config.preset is None:
        return {}
    hf = read_model_config(model)
    where = f"{model.path}: preset {config.preset}"
    try:
        arch = gguf_arch(str(hf.get("model_type")))
        n_layer, n_head = int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
        n_head_kv = int(hf.get("num_key_value_heads") or n_head)
        n_expert = int(hf.get("num_local_experts") or 0)
    except KeyError as err:
        raise InputError(f"{where} needs config.json's {err.args[0]}") from None
    except (PresetError, TypeError, ValueError) as err:
        raise InputError(f"{where}: {err}") from None
    names = gguf_tensor_names(list(model.tensors), arch, n_layer)
    listed = [(gguf_name, model.tensors[name].shape) for name, gguf_name in names.items() if gguf_name is not None]
    try:
        chosen = choose_types(config.preset, listed, n_head=n_head, n_head_kv=n_head_kv, n_layer=n_layer, n_expert=n_expert, arch=arch)
    except PresetError as err:
        raise InputError(f"{where}: {err}") from None
    return {name: chosen[gguf_name] for name, gguf_name in names.items() if gguf_name in chosen}


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
    by_preset = preset_types(model, config)
    choices = {info.name: tensor_choice(info, config, by_preset) for info in model}
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
    check_llama_cpp_target(model, config, groups, config.output_kinds if outputs is None else tuple(outputs))
    return Plan(groups, passthrough)
