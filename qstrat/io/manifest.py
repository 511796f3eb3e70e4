"""``manifest.json``: the index of an output directory, written last and atomically.

Its presence means the directory is complete.  It records, per tensor, the files that
hold it (name, size, sha256), its shape, source dtype, strategy and permutation kind,
and its metrics; see ``docs/formats.md``.  :class:`Manifest` is the format: the run, ``convert``
and the readers all go through it, and a key it does not know, or a missing one, is an
error naming the file.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from qstrat._version import __version__
from qstrat.errors import FormatError, describe_validation_error
from qstrat.io.atomic import atomic_writer
from qstrat.io.names import JOINT_PERMUTATIONS_NAME, MANIFEST_NAME, PASSTHROUGH_NAME, RESIDUAL_PERMUTATION_KEY  # noqa: F401 - the format's names

MANIFEST_FORMAT = "qstrat-output"
MANIFEST_VERSION = 1


class _Record(BaseModel):
    """Exactly the keys declared; those in ``_OMITTED_WHEN_NONE`` are written only when set."""

    model_config = ConfigDict(extra="forbid", strict=True)
    _OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler):
        data = handler(self)
        for key in self._OMITTED_WHEN_NONE:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class FileEntry(_Record):
    """One file of the directory, by name (never a path leading elsewhere)."""

    path: str
    size: int
    sha256: str

    @field_validator("path")
    @classmethod
    def _inside(cls, path: str) -> str:
        relative = Path(path)
        if relative.is_absolute() or len(relative.parts) != 1 or relative.name in (".", ".."):
            raise ValueError(f"file {path!r} is outside the output directory")
        if "\0" in path:
            raise ValueError(f"file {path!r} holds a NUL byte, which no file name holds")
        return path


FileRole = Literal["q8k", "blocks", "perm", "safetensors", "joint_perm", "gguf"]
Metric = Union[float, Literal["inf"], None]  # JSON has no infinity: an exact result is "inf"


class Metrics(_Record):
    _OMITTED_WHEN_NONE = ("weighted_sqnr_db",)
    mse: Metric
    relative_error: Metric
    sqnr_db: Metric
    max_abs_error: Metric
    cosine: Metric
    sum_test_mse: Metric
    gradient_test_mse: Metric
    weighted_sqnr_db: Metric = None  # with an importance matrix


class Joint(_Record):
    group: str | None  # None when read back from GGUF, which does not keep it
    axis: int


class _Entry(_Record):
    _OMITTED_WHEN_NONE = ("joint", "residual_axis", "source_type")
    shape: list[Annotated[int, Field(ge=0, lt=2**63)]]
    dtype: str
    permutation: Literal["none", "runtime", "joint"]
    files: dict[FileRole, FileEntry]
    joint: Joint | None = None
    #: the axis that carries the residual stream, in a run with residual_stream (its permutation
    #: is the model's one, stored once)
    residual_axis: int | None = None
    #: the block type a GGUF input stored the tensor in (``q4_1``, ...); ``dtype`` is then F32, as read
    source_type: str | None = None

    @field_validator("source_type")
    @classmethod
    def _a_ggml_type(cls, source_type: str | None) -> str | None:
        import gguf

        if source_type is not None and source_type.upper() not in gguf.GGMLQuantizationType.__members__:
            raise ValueError(f"source_type {source_type!r} is not a GGML type")
        return source_type


class QuantizedEntry(_Entry):
    """A quantized tensor: ``storage`` is ``q8k`` (the original tool's .q8k file) or the GGUF
    block type it is stored in (``q4_k``, ...; a .qblk file or the GGUF container)."""

    _OMITTED_WHEN_NONE = ("joint", "residual_axis", "source_type", "fallback_from", "imatrix", "permutation_gain_db", "copied")
    storage: str
    strategy: str | None
    metrics: Metrics | None
    fallback_from: str | None = None  # the type asked for, when it could not take the rows (llama.cpp's fallback)
    imatrix: bool | None = None  # in a run with an importance matrix: whether it had this tensor's vector
    #: what the function-preserving permutation of its columns gained over none, measured (dB)
    permutation_gain_db: Metric = None
    #: true for a GGUF input's blocks already in ``storage``'s type, written as they were (llama.cpp copies them)
    copied: Literal[True] | None = None

    @model_validator(mode="after")
    def _stored_somewhere(self) -> QuantizedEntry:
        if not {"q8k", "blocks", "gguf"} & set(self.files):
            raise ValueError("a quantized tensor lists no file holding its blocks (q8k, blocks or gguf)")
        if self.copied and self.source_type != self.storage:
            raise ValueError(f"a tensor copied from its input is stored in its input's type, not {self.storage} from {self.source_type}")
        return self

    @field_validator("storage")
    @classmethod
    def _known(cls, storage: str) -> str:
        from qstrat.formats import DECODED_ONLY, FORMATS  # the registry loads the kernels: only when a manifest is read

        # a type qstrat only decodes comes from a GGUF that `qstrat convert` unpacked
        if storage != "q8k" and (storage not in FORMATS or storage == "q8_k") and storage not in DECODED_ONLY:
            raise ValueError(f"storage {storage!r} is not 'q8k', 'passthrough' or a block type qstrat reads")
        return storage


class PassthroughEntry(_Entry):
    storage: Literal["passthrough"]
    reason: str | None


def _storage(entry: Any) -> str | None:
    storage = entry.get("storage") if isinstance(entry, dict) else getattr(entry, "storage", None)
    if not isinstance(storage, str):
        return None
    return "PassthroughEntry" if storage == "passthrough" else "QuantizedEntry"


TensorEntry = Annotated[
    Union[Annotated[QuantizedEntry, Tag("QuantizedEntry")], Annotated[PassthroughEntry, Tag("PassthroughEntry")]],
    Discriminator(_storage, custom_error_type="storage", custom_error_message="'storage' must be a block type or 'passthrough'"),
]


class Tool(_Record):
    name: str
    version: str


class Source(_Record):
    path: str
    name: str | None
    architecture: str | None
    files: list[str]


class Failure(_Record):
    tensor: str
    metric: str
    value: float | None
    limit: float


class Validation(_Record):
    failed: list[Failure]


class Manifest(_Record):
    _OMITTED_WHEN_NONE = ("fingerprint", "reports", "containers")
    format: Literal["qstrat-output"]
    format_version: Literal[1]
    tool: Tool
    created_utc: str
    fingerprint: str | None = None  # absent when made by ``convert`` (no run)
    source: Source
    config: dict[str, Any]  # the run's settings, as recorded for its fingerprint
    variant: str | None
    tensors: dict[str, TensorEntry]
    validation: Validation
    reports: dict[str, FileEntry] | None = None
    containers: dict[str, FileEntry] | None = None  # with outputs [.., gguf]

    @property
    def gguf_only(self) -> bool:
        """Whether the tensors are in the GGUF container only (``outputs: [gguf]``)."""
        outputs = self.config.get("outputs", ["q8k"])
        return bool(self.containers) and (not isinstance(outputs, list) or "q8k" not in outputs)

    def files(self) -> list[FileEntry]:
        """Every file the manifest lists (a file shared by tensors once per tensor)."""
        listed = [file for entry in self.tensors.values() for file in entry.files.values()]
        return listed + list((self.reports or {}).values()) + list((self.containers or {}).values())


def new_manifest(
    *,
    source: Source,
    config: dict[str, Any],
    variant: str | None,
    tensors: dict[str, QuantizedEntry | PassthroughEntry],
    failed: list[Failure],
    fingerprint: str | None = None,
) -> Manifest:
    """A manifest made now, by this version of qstrat."""
    return Manifest(
        format=MANIFEST_FORMAT,
        format_version=MANIFEST_VERSION,
        tool=Tool(name="qstrat", version=__version__),
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        fingerprint=fingerprint,
        source=source,
        config=config,
        variant=variant,
        tensors=tensors,
        validation=Validation(failed=failed),
    )


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST_NAME
    encoded = json.dumps(manifest.model_dump(), indent=1, sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"
    with atomic_writer(path) as out:
        out.write(encoded)
    return path


def read_manifest(directory: Path) -> Manifest | None:
    """The manifest of an output directory, validated; None when the directory has none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise FormatError(f"{path}: not a readable manifest: {err}") from None
    # the format's identity first: a file of another kind or version says so, not which keys differ
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise FormatError(f"{path}: not a qstrat manifest (format must be {MANIFEST_FORMAT!r})")
    if data.get("format_version") != MANIFEST_VERSION:
        raise FormatError(f"{path}: unsupported manifest version {data.get('format_version')!r}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        raise FormatError(describe_validation_error(err, str(path))) from None


_TENSOR_ENTRY: TypeAdapter = TypeAdapter(TensorEntry)


def tensor_entry(data: Any) -> QuantizedEntry | PassthroughEntry:
    """A tensor's entry from its JSON form (a journal line); ValidationError if it is not one."""
    return _TENSOR_ENTRY.validate_python(data)

