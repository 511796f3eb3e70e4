"""The one model of a run (:class:`RunConfig`: defaults and checks), its YAML file with
line-numbered errors, and the precedence of overrides.

Precedence, lowest first: built-in defaults < the YAML file < ``CANDLE_Q8K_*`` environment
variables (:data:`qstrat.legacy.ENVIRONMENT`) < command-line flags (``--input``, ``--output``,
``--set key.path=value``).  ``qstrat.QuantizationConfig(...)`` builds the same model.
Relative paths in the file are relative to the file's own directory (so a cron job can run
it from anywhere); paths given as flags are relative to the current directory.
"""

from __future__ import annotations

import glob
import os
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from qstrat.blocks import DEFAULT_VARIANT, Q8K_VARIANTS
from qstrat.errors import ConfigError, describe_validation_error
from qstrat.io.gguf_read import is_gguf_name
from qstrat.io.names import JOURNAL_NAME, LOCK_NAME
from qstrat.legacy import environment_settings
from qstrat.strategies import StrategyChain, make_strategy
from qstrat.validation import PRODUCTS, STAGES, ValidationSettings

OUTPUT_FORMATS = ("q8k", "gguf")
#: the block type of the original tool, written as .q8k files with the configured ``variant``
DEFAULT_FORMAT = "q8_k"
#: what the original tool never quantizes; other formats, like llama.cpp, quantize every matrix
Q8K_SKIP_PATTERNS = ("embed_tokens", "norm")


def _format_name(value: object) -> object:
    """A block type of the registry, by its name in any case."""
    if not isinstance(value, str):
        return value
    from qstrat.formats import FORMATS  # the registry loads the kernels: only when settings are built

    from qstrat.presets import is_preset

    name = value.strip().lower()
    if name not in FORMATS:
        if is_preset(name):
            raise ValueError(f"{value!r} is a llama.cpp file type, not a block type: write preset: {name}")
        raise ValueError(f"unknown format {value!r}; choose one of {', '.join(FORMATS)}")
    return name


def _preset_name(value: object) -> object:
    """One of llama.cpp's file types that qstrat can write, by its name in any case."""
    if not isinstance(value, str):
        return value
    from qstrat.presets import is_preset, preset_names

    name = value.strip().lower()
    if not is_preset(name):
        raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(preset_names())}")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StrategyEntry(BaseModel):
    """``{name: l2_norm, match: "mlp", ...options}``; options are checked by the strategy."""

    model_config = ConfigDict(extra="allow")
    name: str
    match: str | None = None


#: each threshold: the validation stage that measures it, the tensor metric it limits, and whether a
#: value below it ("min") or above it ("max") fails the tensor
THRESHOLDS = {
    "min_sqnr_db": ("weight_error", "sqnr_db", "min"),
    "max_mse": ("weight_error", "mse", "max"),
    "min_cosine": ("weight_error", "cosine", "min"),
    "max_sum_test_mse": ("sum_test", "sum_test_mse", "max"),
    "max_gradient_test_mse": ("gradient_test", "gradient_test_mse", "max"),
}


class Thresholds(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # JSON reports hold no NaN
    min_sqnr_db: float | None = None
    max_mse: float | None = Field(default=None, ge=0)
    min_cosine: float | None = Field(default=None, ge=-1, le=1)
    max_sum_test_mse: float | None = Field(default=None, ge=0)
    max_gradient_test_mse: float | None = Field(default=None, ge=0)

    @field_validator(*THRESHOLDS, mode="before")
    @classmethod
    def _numbers(cls, value):
        # YAML reads 1e-3 as a string: accept numbers written that way, but nothing else
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value


class FormatRule(_Strict):
    """``{match: REGEX, format: q6_k}``: tensors whose name the regex matches (searched) get ``format``."""

    match: str
    format: str

    @field_validator("match")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
        return value

    _format = field_validator("format")(classmethod(lambda cls, value: _format_name(value)))


class ValidationSection(_Strict):
    enabled: bool = True
    stages: list[Literal[STAGES]] = Field(default_factory=lambda: list(STAGES))  # type: ignore[valid-type]
    product: Literal[PRODUCTS] = "exact"  # type: ignore[valid-type]
    thresholds: Thresholds = Field(default_factory=Thresholds)


#: a Dask scheduler's address: [scheme://]host:port, in a scheme distributed speaks
_SCHEDULER_ADDRESS = re.compile(r"((tcp|tls|ucx|ws|wss)://)?(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d{1,5}")


class ParallelSection(_Strict):
    workers: int = Field(default=1, ge=1)
    backend: Literal["loky", "dask"] = "loky"
    address: str | None = None  # tcp://host:port of a Dask scheduler

    @field_validator("address")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        if value is not None and not _SCHEDULER_ADDRESS.fullmatch(value.strip()):
            raise ValueError(f"{value!r} is not a scheduler address such as tcp://host:8786")
        return value if value is None else value.strip()

    @model_validator(mode="after")
    def _address_for_dask(self) -> ParallelSection:
        # checked when the config is read (a --dry-run says so), not once the output directory exists
        if self.backend == "dask" and self.address is None:
            raise ValueError("backend dask needs address: the scheduler's, such as tcp://host:8786")
        if self.backend == "loky" and self.address is not None:
            raise ValueError("address is a Dask scheduler's: set backend: dask too (local workers need none)")
        return self


class RunConfig(_Strict):
    """Everything a run needs, with its defaults: the YAML file's schema (where ``input`` and
    ``output`` are required) and what ``QuantizationConfig(...)`` builds."""

    input: Union[str, list[str], None] = None
    output: Union[str, None] = None  # a directory; in a file, a template with {model}
    variant: Literal[Q8K_VARIANTS] = DEFAULT_VARIANT  # type: ignore[valid-type]
    format: str = DEFAULT_FORMAT  # the block type of every quantized tensor (see format_rules)
    preset: Union[str, None] = None  # instead of format: llama.cpp's file type (q4_k_m, ...), its rules per tensor
    format_rules: list[FormatRule] = Field(default_factory=list)  # the first rule matching a tensor wins
    strategies: list[Union[str, StrategyEntry]] = Field(default_factory=lambda: ["identity"], min_length=1)
    skip_patterns: Union[list[str], None] = None  # None: Q8K_SKIP_PATTERNS for Q8K only, else none
    validation: ValidationSection = Field(default_factory=ValidationSection)
    outputs: Union[list[Literal[OUTPUT_FORMATS]], None] = Field(default=None, min_length=1)  # type: ignore[valid-type]
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    # an importance matrix (llama.cpp's GGUF imatrix or legacy .dat); in a file, a template with {model}
    imatrix: Union[str, None] = None
    # replace output of another config or input (a command's flag, never a file's key)
    _force: bool = PrivateAttr(default=False)

    _format = field_validator("format")(classmethod(lambda cls, value: _format_name(value)))

    @field_validator("input", "output", "imatrix")
    @classmethod
    def _path(cls, value: str | list[str] | None) -> str | list[str] | None:
        # an empty path would be the current directory: never what was meant
        if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, list) else [value])):
            raise ValueError("an empty path")
        return value

    @field_validator("skip_patterns")
    @classmethod
    def _patterns(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not pattern for pattern in value):
            raise ValueError("an empty pattern is in every name: it would skip every tensor")
        return value

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str | None, info: ValidationInfo) -> str | None:
        value = _preset_name(value)
        if value is not None and info.data.get("format", DEFAULT_FORMAT) != DEFAULT_FORMAT:
            raise ValueError(f"give format ({info.data['format']}) or preset ({value}), not both")
        return value

    @field_validator("validation")
    @classmethod
    def _product_fits_formats(cls, value: ValidationSection, info: ValidationInfo) -> ValidationSection:
        if value.product == "candle" and _other_formats(info.data):
            raise ValueError(f"product: candle multiplies Q8K blocks; format {_other_formats(info.data)[0]} needs product: exact")
        return value

    @field_validator("outputs")
    @classmethod
    def _outputs_fit_formats(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is not None and "q8k" in value and _other_formats(info.data):
            raise ValueError(f".q8k files hold Q8K only; format {_other_formats(info.data)[0]} is written to GGUF: use [gguf]")
        return value

    @property
    def skip_list(self) -> tuple[str, ...]:
        """The skip patterns in force: the configured ones, or the default for the format: the
        original tool's for Q8K (applied to the tensors no format rule matches, see ``skips``)."""
        if self.skip_patterns is not None:
            return tuple(self.skip_patterns)
        return Q8K_SKIP_PATTERNS if self.format == DEFAULT_FORMAT and self.preset is None else ()

    def skips(self, tensor_name: str) -> str | None:
        """The skip pattern ``tensor_name`` contains, if it is skipped: a configured pattern skips any
        tensor; Q8K's default only those no format rule gives a type (a rule asks for that tensor)."""
        if self.skip_patterns is None and self.rule_format(tensor_name) is not None:
            return None
        return next((pattern for pattern in self.skip_list if pattern in tensor_name), None)

    @property
    def output_kinds(self) -> tuple[str, ...]:
        """The outputs in force: the configured ones, or .q8k files for Q8K only, else GGUF."""
        if self.outputs is not None:
            return tuple(self.outputs)
        return ("q8k",) if not _other_formats(self.__dict__) else ("gguf",)

    @property
    def block_types(self) -> frozenset[str]:
        """The block types this run asks for by name: its format, or its preset's default type,
        and those of its format rules (a preset's rules may add others, chosen per tensor)."""
        from qstrat.presets import default_type

        main = default_type(self.preset) if self.preset else self.format
        return frozenset([main, *(rule.format for rule in self.format_rules)])

    @property
    def unchecked_thresholds(self) -> list[str]:
        """A sentence for each threshold set that this run does not check: validation is off, or
        the stage that measures it is not among ``validation.stages``."""
        validation = self.validation
        unchecked = []
        for key, (stage, _, _) in THRESHOLDS.items():
            if getattr(validation.thresholds, key) is None:
                continue
            if not validation.enabled:
                unchecked.append(f"validation.thresholds.{key} is not checked: validation.enabled is false")
            elif stage not in validation.stages:
                unchecked.append(f"validation.thresholds.{key} is not checked: validation.stages lacks {stage}")
        return unchecked

    def unmatched_rules(self, tensor_names: Iterable[str]) -> list[str]:
        """A sentence for each of ``format_rules`` that matches none of ``tensor_names`` (a misspelt
        pattern: the run writes no tensor in its type, yet a Q8K run's output becomes GGUF for it)."""
        names = list(tensor_names)
        return [
            f"format_rules.{i} (match {rule.match!r}, format {rule.format}) matches no tensor of the model"
            for i, rule in enumerate(self.format_rules)
            if not any(re.search(rule.match, name) for name in names)
        ]

    def rule_format(self, tensor_name: str) -> str | None:
        """The block type the first of ``format_rules`` matching ``tensor_name`` gives, if any."""
        for rule in self.format_rules:
            if re.search(rule.match, tensor_name):
                return rule.format
        return None

    @classmethod
    def build(cls, data: dict[str, Any], where: str, *, force: bool = False) -> RunConfig:
        """Validated settings; errors name ``where`` and the key, as one ConfigError."""
        try:
            config = cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(describe_validation_error(err, where)) from None
        config._force = force
        return config

    @property
    def force(self) -> bool:
        return self._force

    @property
    def output_dir(self) -> Path:
        if self.output is None:
            raise ConfigError("output: no output directory given")
        return Path(self.output)

    def validation_settings(self) -> ValidationSettings | None:
        """The stages a worker runs (None when validation is off)."""
        return ValidationSettings(tuple(self.validation.stages), self.validation.product) if self.validation.enabled else None

    def chain_entries(self) -> list[str | dict[str, Any]]:
        """The strategy chain, as entries for :class:`StrategyChain`."""
        return [e if isinstance(e, str) else e.model_dump(exclude_none=True) for e in self.strategies]

    def strategy_chain(self) -> StrategyChain:
        return StrategyChain(self.chain_entries())

    def describe(self) -> dict[str, object]:
        """A JSON-ready record of the settings that shape the output (for the manifest)."""
        return {
            "variant": self.variant,
            # recorded only when set, so that a Q8K run's record (and fingerprint) stays the original's
            **({"format": self.format} if self.format != DEFAULT_FORMAT else {}),
            **({"preset": self.preset} if self.preset else {}),
            **({"format_rules": [r.model_dump() for r in self.format_rules]} if self.format_rules else {}),
            "strategies": self.strategy_chain().describe(),
            "skip_patterns": list(self.skip_list),
            "validation": {
                "enabled": self.validation.enabled,
                "stages": list(self.validation.stages) if self.validation.enabled else [],
                "product": self.validation.product,
            },
        }

    def with_environment(self, environ: Mapping[str, str] | None = None) -> RunConfig:
        """These settings overridden by the ``CANDLE_Q8K_*`` variables, as ``qstrat run`` applies them."""
        data = self.model_dump()
        apply_environment(data, os.environ if environ is None else environ)
        return RunConfig.build(data, "CANDLE_Q8K_* environment", force=self.force)

    def evaluated(self) -> RunConfig:
        """These settings with validation on (an in-memory comparison measures everything)."""
        return self.model_copy(update={"validation": self.validation.model_copy(update={"enabled": True})})


def _other_formats(data: Mapping[str, Any]) -> list[str]:
    """The formats other than Q8K that settings (validated so far) ask for."""
    asked = [data.get("format", DEFAULT_FORMAT), data.get("preset") or DEFAULT_FORMAT]
    asked += [rule.format for rule in data.get("format_rules") or ()]
    return [f for f in asked if f != DEFAULT_FORMAT]


@dataclass(frozen=True)
class ModelJob:
    """One model of a run: where it is read, where it is written."""

    name: str
    input: Path
    output: Path
    imatrix: Path | None = None  # the importance matrix of this model, when the run uses one


@dataclass(frozen=True)
class RunSpec:
    """A validated run: the models and the quantization settings they share."""

    models: tuple[ModelJob, ...]
    config: RunConfig
    source: Path | None
    #: the input named several models or a glob: one model's failure does not stop the others
    batch: bool = False

    @property
    def thresholds(self) -> Thresholds:
        return self.config.validation.thresholds

    def config_for(self, job: ModelJob) -> RunConfig:
        """The settings of one model: the shared ones, with its own importance matrix."""
        if job.imatrix is None:
            return self.config
        return self.config.model_copy(update={"imatrix": str(job.imatrix)})

    @property
    def raw(self) -> dict[str, Any]:
        return self.config.model_dump()

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.config.output_kinds


# -- YAML with line numbers ----------------------------------------------------------------------


class _NoDuplicatesLoader(yaml.SafeLoader):
    """Safe loading only (no object construction); duplicate keys are errors."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor`: its keys are defaults the mapping's own keys override
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(f"line {key_node.start_mark.line + 1}: a key must be a plain value, not a "
                              f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}")
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str):  # every key of a config is a name (YAML reads `1:` or `yes:` as others)
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key_node.value!r} is not a name; quote it if it is one")
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_NoDuplicatesLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_index(node, path=(), index=None) -> dict[tuple, int]:
    """Key path -> 1-based line, for every node of a composed YAML document."""
    index = {} if index is None else index
    index[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = path + (key.value,)
            index[child] = key.start_mark.line + 1
            _line_index(value, child, index)
            index[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, path + (i,), index)
    return index


def _parse_yaml(text: str, where: str) -> tuple[dict, dict[tuple, int]]:
    try:
        node = yaml.compose(text, Loader=_NoDuplicatesLoader)
        data = yaml.load(text, Loader=_NoDuplicatesLoader)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        position = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}: {position}{err.problem or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of settings")
    return data, (_line_index(node) if node is not None else {})


# -- overrides -----------------------------------------------------------------------------------


def _set_path(data: dict, dotted: str, value: Any, origin: str | None = None) -> None:
    """``data[a][b]... = value`` for ``dotted`` "a.b..."; ``origin`` names what gave it (default: --set)."""
    keys = dotted.split(".")
    target = data
    for key in keys[:-1]:
        child = target.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin or '--set ' + dotted}: {key!r} is not a section (the config holds {child!r} there)")
        target = child
    target[keys[-1]] = value


def parse_set_option(option: str) -> tuple[str, Any]:
    """``key.path=value``, the value read as a YAML scalar or flow collection."""
    key, sep, text = option.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {option!r}: expected key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {option!r}: the value is not valid YAML (quote a text holding {{, [, * or :, "
                          f"as in --set '{key.strip()}=\"...\"')") from None
    return key.strip(), value


def apply_environment(data: dict, environ: Mapping[str, str]) -> None:
    """The ``CANDLE_Q8K_*`` variables set in ``environ``, written over ``data`` (the raw config)."""
    for key, value in environment_settings(environ).items():
        _set_path(data, key, value, f"{key} from the CANDLE_Q8K_* environment variables")


# -- loading -------------------------------------------------------------------------------------


def _resolve(path_text: str, base: Path) -> Path:
    path = Path(os.path.expanduser(path_text))
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _model_inputs(patterns: Sequence[str], base: Path, from_file: bool, origin: str = "input") -> list[Path]:
    """The model paths ``patterns`` name; errors begin with ``origin`` (the flag, or the file, line and key)."""
    inputs: list[Path] = []
    for pattern in patterns:
        resolved = _resolve(pattern, base if from_file else Path.cwd())
        if glob.has_magic(str(resolved)):
            matches = sorted(Path(p) for p in glob.glob(str(resolved)))
            if not matches:
                raise ConfigError(f"{origin}: the pattern {pattern!r} matches nothing")
            # a run's own output directories (say, written beside the models) are not models: a nightly
            # batch would otherwise quantize last night's outputs, and nest one more each night
            models = [m for m in matches if not _in_output_directory(m)]
            if not models:
                raise ConfigError(f"{origin}: the pattern {pattern!r} matches only qstrat output directories")
            inputs.extend(models)
        elif resolved.is_dir() and _in_output_directory(resolved):
            # its passthrough.safetensors would be read as the whole model: a model without its weights
            raise ConfigError(f"{origin}: {pattern} is a qstrat output directory, not a model: give its source model, "
                              "or its .gguf file (a run with outputs: [gguf] writes one)")
        else:
            if from_file and len(patterns) == 1 and not resolved.exists() and not Path(os.path.expanduser(pattern)).is_absolute():
                # one model that is not there (a batch goes on past a missing one): say where it was looked for
                raise ConfigError(f"{origin}: {pattern} names {resolved}, which does not exist "
                                  "(a relative input in a config file is relative to the file's directory)")
            inputs.append(resolved)
    return inputs


def _in_output_directory(path: Path) -> bool:
    """A qstrat output directory, or a file in one (a run's GGUF container): every run leaves its
    lock file and journal there, names no model uses (``manifest.json`` is too common a name)."""
    directory = path if path.is_dir() else path.parent
    return (directory / LOCK_NAME).is_file() or (directory / JOURNAL_NAME).is_file()


def fill_template(template: str, model: str, what: str) -> str:
    """``template`` with each ``{model}`` replaced by the model's name (``{{`` and ``}}`` are braces);
    any other field (``{model.name}``, ``{model!r}``, ``{0}``) is an error naming ``what``."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]
    except ValueError as err:  # an unmatched brace
        raise ConfigError(f"{what}: only {{model}} may be used ({err})") from None
    for name, spec, conversion in fields:
        if name != "model" or spec or conversion:
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ConfigError(f"{what}: only {{model}} may be used, not {field}")
    return template.format(model=model)


def _model_name(path: Path) -> str:
    return path.stem if path.suffix == ".safetensors" or is_gguf_name(path) else path.name


def load_run_config(
    config_path: str | os.PathLike | None,
    *,
    environ: Mapping[str, str] | None = None,
    input_override: Sequence[str] | None = None,
    output_override: str | None = None,
    sets: Sequence[str] = (),
) -> RunSpec:
    """Read, overlay and validate a run configuration; every error names the key (and line)."""
    environ = os.environ if environ is None else environ
    where = str(config_path) if config_path else "configuration"
    base = Path.cwd()
    data: dict[str, Any] = {}
    lines: dict[tuple, int] = {}
    if config_path is not None:
        path = Path(config_path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read: {err}") from None
        data, lines = _parse_yaml(text, where)
        base = path.resolve().parent
    in_file = {key for key in ("input", "output", "imatrix") if key in data}
    # keys a flag gave (--input, --output, --set): their errors are the flag's, not the file's
    flags: dict[tuple, str] = {}
    apply_environment(data, environ)
    if input_override:
        data["input"] = list(input_override)
        flags[("input",)] = "--input"
    if output_override is not None:
        data["output"] = output_override
        flags[("output",)] = "--output"
    for option in sets:
        key, value = parse_set_option(option)
        _set_path(data, key, value)
        path = tuple(key.split("."))
        flags[path] = f"--set {option}"
        for location in [loc for loc in lines if loc[: len(path)] == path]:
            del lines[location]  # the file's line for it no longer says where the value came from
    # a path the file gives is relative to the file, one a flag gives to the current directory
    input_from_file, output_from_file, imatrix_from_file = (key in in_file and (key,) not in flags for key in ("input", "output", "imatrix"))
    #: where input and output came from, for their errors: the flag, or the file (and line)
    origin = {key: flags.get((key,)) or f"{where}: " + (f"line {lines[(key,)]}: " if (key,) in lines else "") + key
              for key in ("input", "output", "imatrix")}
    for key in ("input", "output"):  # optional in the model (the library passes them otherwise), not in a file
        if data.get(key) is None:
            if (key,) in flags:  # --set output=null
                raise ConfigError(f"{flags[(key,)]}: {key}: must be set")
            line = lines.get((key,))
            raise ConfigError(f"{where}: {f'line {line}: ' if line else ''}{key}: " + ("must be set" if key in data else "required key is missing"))
    try:
        schema = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, where, lines, flags)) from None
    for i, entry in enumerate(schema.chain_entries()):
        try:
            make_strategy(entry)  # unknown names and options fail here, before anything runs
        except ConfigError as err:
            if ("strategies",) in flags:
                raise ConfigError(f"{flags[('strategies',)]}: strategies.{i}: {err}") from None
            line = lines.get(("strategies", i))
            raise ConfigError(f"{where}: {f'line {line}: ' if line else ''}strategies.{i}: {err}") from None
    try:
        schema.strategy_chain()  # what only the whole chain shows (residual_stream twice, a match on the last entry)
    except ConfigError as err:
        line = lines.get(("strategies",))
        raise ConfigError(f"{flags.get(('strategies',)) or where}: {f'line {line}: ' if line else ''}strategies: {err}") from None
    patterns = [schema.input] if isinstance(schema.input, str) else schema.input
    if not patterns:
        raise ConfigError(f"{origin['input']}: an empty list names no model to quantize")
    inputs = _model_inputs(patterns, base, input_from_file, origin["input"])
    output_template = str(_resolve(schema.output, base if output_from_file else Path.cwd()))
    if len(inputs) > 1 and "{model}" not in output_template:
        raise ConfigError(f"{origin['output']}: must contain {{model}} when the input names several models")
    imatrix_template = str(_resolve(schema.imatrix, base if imatrix_from_file else Path.cwd())) if schema.imatrix else None
    models = []
    for model_path in inputs:
        name = _model_name(model_path)
        paths = {}
        for key, template, raw in (("output", output_template, schema.output), ("imatrix", imatrix_template, schema.imatrix)):
            paths[key] = Path(fill_template(template, name, f"{origin[key]} template {raw!r}")) if template else None
        # a model file's own directory too: the run's <model>.gguf would overwrite a GGUF input there
        own_directory = model_path if model_path.is_dir() else model_path.parent
        if paths["output"].resolve() == own_directory.resolve():
            raise ConfigError(f"{origin['output']}: {paths['output']} is the input model's own directory; write the output elsewhere")
        models.append(ModelJob(name, model_path, paths["output"], paths["imatrix"]))
    writers: dict[Path, Path] = {}
    for model in models:
        if model.output in writers:
            raise ConfigError(f"{origin['output']}: {writers[model.output]} and {model.input} would both write to {model.output}")
        writers[model.output] = model.input
    batch = len(models) > 1 or any(glob.has_magic(p) for p in patterns)
    return RunSpec(tuple(models), schema, Path(config_path) if config_path else None, batch)


__all__ = ["ModelJob", "RunConfig", "RunSpec", "load_run_config", "parse_set_option"]
