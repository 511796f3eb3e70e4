"""The safetensors format: a strict reader over memory maps and a streaming writer.

Layout: u64 little-endian header length N, N bytes of JSON (an object mapping tensor
names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional
``"__metadata__"`` object of strings), then the data section; offsets are relative to
it, and the tensors tile it without holes or overlaps.  Everything is little-endian.

numpy has no bfloat16, and the ``safetensors`` package cannot hand bf16 to numpy, so
this module maps files itself; tensors come back as memory-mapped arrays (bf16 as its
raw ``uint16`` bits), read lazily one at a time, or are read into a caller's buffer
(``read_tensor``) when every value is about to be used once.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qstrat.errors import FormatError, InputError
from qstrat.io.atomic import atomic_writer

HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit of the reference implementation
HEADER_ALIGNMENT = 8  # the JSON header is space-padded so that data starts 8-byte aligned
METADATA_KEY = "__metadata__"
INDEX_FILE = "model.safetensors.index.json"

#: safetensors dtype tag -> numpy dtype of its stored bytes (bf16 and fp8 as raw bits)
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "F8_E5M2": np.dtype("u1"),
    "F8_E4M3": np.dtype("u1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, absolute byte offset and layout.

    ``dtype`` and ``nbytes`` describe the values as read; a tensor of a GGUF input stored in a
    block type has ``encoding`` (the type, e.g. ``q4_1``) and ``stored_nbytes``, and reading
    decodes it to float32 values."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int
    encoding: str | None = None
    stored_nbytes: int = 0

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise FormatError(f"duplicate key {key!r} in the header")
        seen[key] = value
    return seen


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SafetensorsFile:
    """One .safetensors file, header validated on open; tensors mapped on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(HEADER_LENGTH_BYTES)
                if len(prefix) < HEADER_LENGTH_BYTES:
                    raise self._error(f"file is {self.size} bytes, shorter than the 8-byte header length")
                if prefix.startswith(b"GGUF"):  # an Ollama blob, a .bin: qstrat tells GGUF files by their suffix
                    raise InputError(f"{self.path}: a GGUF file (it starts with GGUF's magic) without the .gguf suffix "
                                     "qstrat reads GGUF files by: link or copy it to a name ending in .gguf")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(MAX_HEADER_BYTES, self.size - HEADER_LENGTH_BYTES):
                    raise self._error(
                        f"header length {header_len} exceeds the file ({self.size} bytes) or the "
                        f"{MAX_HEADER_BYTES}-byte limit"
                    )
                raw_header = f.read(header_len)
        except FileNotFoundError:
            raise InputError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{self.path}: is a directory, not a .safetensors file") from None
        except OSError as err:
            raise InputError(f"{self.path}: cannot read: {err.strerror or err}") from None
        self.data_start = HEADER_LENGTH_BYTES + header_len
        self.metadata, self.tensors = self._parse_header(raw_header)

    def _error(self, message: str) -> FormatError:
        return FormatError(f"{self.path}: not a valid safetensors file: {message}")

    def _parse_header(self, raw: bytes) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
        except FormatError as err:
            raise self._error(str(err)) from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise self._error(f"header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        metadata = header.pop(METADATA_KEY, {})
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._error(f"{METADATA_KEY} must be an object of strings")
        data_len = self.size - self.data_start
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # JSON's "\ud800": a name no file name, GGUF or terminal can hold
                raise self._error(f"tensor name {name!r} is not valid Unicode (a lone surrogate)") from None
            tensors[name] = self._parse_entry(name, entry, data_len)
        # The tensors must tile the data section exactly: sorted by offset, each begins where
        # the previous ended, the last ends at the end of the file.
        position = 0
        for info in sorted(tensors.values(), key=lambda t: (t.offset, t.offset + t.nbytes)):
            begin = info.offset - self.data_start
            if begin != position:
                what = "overlaps another tensor" if begin < position else "leaves a gap before it"
                raise self._error(f"tensor {info.name!r} {what} (data offset {begin}, expected {position})")
            position = begin + info.nbytes
        if position != data_len:
            raise self._error(
                f"the data section is {data_len} bytes but the tensors cover {position} "
                "(truncated file or trailing bytes)"
            )
        return metadata, tensors

    def _parse_entry(self, name: str, entry, data_len: int) -> TensorInfo:
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise self._error(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise self._error(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._error(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise self._error(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            # an end past the file's, beginning inside it, is most often a file cut short (a download)
            cut = 0 <= begin <= data_len < end
            raise self._error(
                f"tensor {name!r}: data_offsets [{begin}, {end}] outside the {data_len}-byte data section"
                + (" (truncated file?)" if cut else "")
            )
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise self._error(
                f"tensor {name!r}: {end - begin} data bytes, but {dtype} x {shape} needs {expected}"
            )
        return TensorInfo(name, dtype, tuple(shape), self.path, self.data_start + begin, end - begin)


def stacked_rows(shape: tuple[int, ...]) -> int:
    """The rows a tensor's blocks run along, over every axis but the last: a stack of matrices (a MoE
    model's experts, 3-D) is the rows of all its matrices, as GGUF stores and GGML quantizes it."""
    return int(np.prod(shape[:-1], dtype=np.int64))


def _decoded(info: TensorInfo, stored: np.ndarray) -> np.ndarray:
    """The float32 values of a tensor stored in a block type (``info.encoding``)."""
    from qstrat.formats import dequantize  # the registry loads the kernels: only for such tensors

    rows = stacked_rows(info.shape)
    return dequantize(stored.reshape(rows, -1), info.encoding).reshape(info.shape)


def _mapped_bytes(info: TensorInfo, nbytes: int) -> np.ndarray:
    """A read-only uint8 view of the tensor's ``nbytes`` bytes in its file (no copy)."""
    try:
        with open(info.path, "rb") as f:
            # mmap needs a page-aligned offset: map from the page start, then slice.
            page_start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(f.fileno(), info.offset + nbytes - page_start, access=mmap.ACCESS_READ, offset=page_start)
    except (OSError, ValueError) as err:
        raise InputError(f"{info.path}: cannot map tensor {info.name!r}: {err}") from None
    return np.frombuffer(mapped, dtype=np.uint8, count=nbytes, offset=info.offset - page_start)


def map_tensor(info: TensorInfo) -> np.ndarray:
    """A read-only array over the tensor's bytes in its file (no copy; bf16 as uint16 bits);
    a tensor stored in a block type comes decoded (a new float32 array)."""
    dtype = DTYPES[info.dtype]
    stored_nbytes = info.stored_nbytes if info.encoding else info.nbytes
    if stored_nbytes == 0:
        return np.zeros(info.shape, dtype=dtype)
    buffer = _mapped_bytes(info, stored_nbytes)
    if info.encoding:
        return _decoded(info, buffer)
    return buffer.view(dtype).reshape(info.shape)


def map_blocks(info: TensorInfo) -> np.ndarray:
    """A read-only view of a tensor stored in a block type as it is stored, not decoded:
    (rows, bytes of a row's blocks), rows over every axis but the last."""
    if not info.encoding:
        raise ValueError(f"tensor {info.name!r} is not stored in a block type")
    rows = stacked_rows(info.shape)
    if info.stored_nbytes == 0:
        return np.zeros((rows, 0), dtype=np.uint8)
    return _mapped_bytes(info, info.stored_nbytes).reshape(rows, -1)


_READ_CHUNK = 1 << 30  # bytes per read() call: some systems refuse single reads of 2 GiB or more


def read_tensor(info: TensorInfo, buffer: np.ndarray) -> np.ndarray:
    """The tensor read into ``buffer`` (a contiguous uint8 array of at least ``info.nbytes``), as
    ``map_tensor`` would show it: read-only, bf16 as its bits.

    For a pass that reads every value once, ``read()`` into a reused buffer costs a fraction of
    first touches of a fresh mapping (each faults its pages in) and of unmapping it after.
    """
    if buffer.nbytes < info.nbytes or buffer.dtype != np.uint8 or not buffer.flags.c_contiguous:
        raise ValueError("read_tensor needs a contiguous uint8 buffer of at least the tensor's size")
    if info.encoding:
        values = buffer[: info.nbytes].view(np.float32).reshape(info.shape)
        values[...] = map_tensor(info)
        values.flags.writeable = False
        return values
    target = memoryview(buffer[: info.nbytes])
    done = 0
    try:
        with open(info.path, "rb", buffering=0) as f:
            f.seek(info.offset)
            while done < info.nbytes:
                count = f.readinto(target[done : done + _READ_CHUNK])
                if not count:
                    raise InputError(f"{info.path}: the file ends inside tensor {info.name!r} (was it truncated?)")
                done += count
    except OSError as err:
        raise InputError(f"{info.path}: cannot read tensor {info.name!r}: {err.strerror or err}") from None
    array = buffer[: info.nbytes].view(DTYPES[info.dtype]).reshape(info.shape)
    array.flags.writeable = False  # as a mapping is: strategies must not change what gets quantized
    return array


def _fp8_values(exponent_bits: int, finite_only: bool) -> np.ndarray:
    """The float32 value of each of the 256 codes of an 8-bit float with 1 sign bit, ``exponent_bits``
    and the rest mantissa (OCP FP8: E4M3 is ``finite_only``, its one NaN at all ones; E5M2 is IEEE-like)."""
    mantissa_bits = 7 - exponent_bits
    bias = (1 << (exponent_bits - 1)) - 1
    codes = np.arange(256)
    exponent, mantissa = (codes >> mantissa_bits) & ((1 << exponent_bits) - 1), codes & ((1 << mantissa_bits) - 1)
    fraction = mantissa / (1 << mantissa_bits)
    magnitude = np.where(exponent == 0, fraction * 2.0 ** (1 - bias), (1 + fraction) * 2.0 ** (exponent - bias))
    top = (1 << exponent_bits) - 1
    if finite_only:
        magnitude[(exponent == top) & (mantissa == (1 << mantissa_bits) - 1)] = np.nan
    else:
        magnitude[exponent == top] = np.where(mantissa[exponent == top] == 0, np.inf, np.nan)
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.float32)


#: float32 values of the FP8 codes safetensors names (F8_E4M3 is OCP's E4M3FN, as torch.float8_e4m3fn)
FP8_VALUES = {"F8_E4M3": _fp8_values(4, finite_only=True), "F8_E5M2": _fp8_values(5, finite_only=False)}


def exact_in(dtype: str, values: np.ndarray) -> np.ndarray:
    """``to_float32``'s inverse for F16 and BF16: float32 ``values`` that are exactly that dtype's, as
    its array (BF16 as its uint16 bits); other dtypes unchanged."""
    if dtype == "BF16":
        return (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if dtype == "F16":
        return values.astype(np.float16)
    return values


def to_float32(dtype: str, array: np.ndarray) -> np.ndarray:
    """Exact float32 values of data of safetensors dtype tag ``dtype``: BF16 as its uint16 bits
    (widened), F16 as float16 or as its int16 bits (the kernels' view), FP8 as its uint8 codes;
    other dtypes unchanged."""
    if dtype == "BF16":
        return (array.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if dtype == "F16":
        return array.view(np.float16).astype(np.float32)
    if dtype in FP8_VALUES:
        return FP8_VALUES[dtype][array.view(np.uint8)]
    return array


def _resolve_inside(directory: Path, relative: str, what: str) -> Path:
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise InputError(f"{directory / INDEX_FILE}: {what} {relative!r} points outside the model directory")
    return directory / candidate


def _index_shards(directory: Path) -> tuple[list[Path], dict[str, str]] | None:
    index_path = directory / INDEX_FILE
    if not index_path.exists():
        return None
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{index_path}: not a valid index file: {err}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FormatError(f"{index_path}: 'weight_map' must be an object of tensor name -> shard file")
    shards = []
    for shard in sorted(set(weight_map.values())):
        path = _resolve_inside(directory, shard, "shard")
        if not path.is_file():
            raise InputError(f"{index_path}: shard {shard!r} named by the index is missing")
        shards.append(path)
    return shards, weight_map


class SafetensorsModel:
    """A model: one .safetensors file, or a directory of shards (honouring its index)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            is_dir = self.path.is_dir()
            exists = self.path.exists()
        except OSError as err:
            raise InputError(f"{self.path}: cannot read: {err.strerror or err}") from None
        if not exists:
            raise InputError(f"{self.path}: no such file or directory")
        weight_map = None
        if is_dir:
            indexed = _index_shards(self.path)
            if indexed is None:
                shard_paths = sorted(p for p in self.path.glob("*.safetensors") if p.is_file())
            else:
                shard_paths, weight_map = indexed
            if not shard_paths:
                raise InputError(f"{self.path}: no .safetensors files in this directory")
        else:
            shard_paths = [self.path]
        self.files = [SafetensorsFile(p) for p in shard_paths]
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for name, info in file.tensors.items():
                if name in self.tensors:
                    raise InputError(
                        f"tensor {name!r} appears in both {self.tensors[name].path.name} and {file.path.name}"
                    )
                self.tensors[name] = info
        if weight_map is not None:
            for name, shard in weight_map.items():
                info = self.tensors.get(name)
                if info is None or info.path.name != Path(shard).name:
                    raise InputError(f"{self.path / INDEX_FILE}: tensor {name!r} is not in shard {shard!r}")
        self.metadata = {k: v for f in self.files for k, v in f.metadata.items()}

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)


def write_safetensors(
    path: Path,
    tensors: Iterable[tuple[str, str, tuple[int, ...], np.ndarray | Callable[[], np.ndarray]]],
    metadata: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Write (name, dtype tag, shape, raw array or a function making it) tensors atomically.

    The header is built from dtypes and shapes alone; each array is produced and streamed
    only when its turn comes, so memory stays at the largest single tensor.  Returns
    (size, sha256).  Names are written in the given order (sort them for a deterministic file).
    """
    items = list(tensors)
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    position = 0
    for name, dtype, shape, _ in items:
        nbytes = DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        position += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
    with atomic_writer(path) as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name, dtype, shape, source in items:
            array = source() if callable(source) else source
            expected = header[name]["data_offsets"]
            if array.nbytes != expected[1] - expected[0]:
                raise InputError(f"{path}: tensor {name!r} has {array.nbytes} bytes, its {dtype} x {list(shape)} needs {expected[1] - expected[0]}")
            if array.nbytes:
                out.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return out.size, out.sha256


def read_model_config(model: SafetensorsModel) -> dict[str, object]:
    """The Hugging Face ``config.json`` beside the weights ({} when there is none); for a GGUF
    input, the same keys from its metadata."""
    if hasattr(model, "model_config"):
        return model.model_config()
    directory = model.path if model.path.is_dir() else model.path.parent
    path = directory / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{path}: not a readable JSON model config: {err}") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: a model config must be a JSON object")
    return config
