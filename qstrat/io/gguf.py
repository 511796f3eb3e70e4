"""GGUF v3 containers: a whole quantized model in one file, written with the ``gguf`` package.

Quantized tensors are stored in their block type with exactly the bytes of their ``.q8k``
(GGML type Q8_K) or ``.qblk`` files; other tensors keep their dtype (F32/F16/BF16/F64/I8..I64).  A run-time
gather map is a companion I32 tensor ``<name>.perm``; joint permutations (needed only to
restore the original layout) are companions ``<name>.joint_perm`` (I32).  GGML limits
names to 63 bytes: a longer name is cut and suffixed with ``~`` and 16 hex digits of its
SHA-256, and the metadata maps it back.  Written streaming (tensor infos first, then one
tensor at a time) to a temporary name, then renamed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from qstrat._version import __version__
from qstrat.errors import FormatError, InputError, OutputError
from qstrat.io.atomic import atomic_path, describe_os_error
from qstrat.io.manifest import (
    JOINT_PERMUTATIONS_NAME,
    PASSTHROUGH_NAME,
    FileEntry,
    Joint,
    PassthroughEntry,
    QuantizedEntry,
    Source,
    new_manifest,
    write_manifest,
)
from qstrat.io.names import assign_file_stems
from qstrat.io.q8k import read_perm, read_q8k, write_perm, write_q8k
from qstrat.io.qblock import SUFFIX as QBLK_SUFFIX, read_blocks, write_blocks
from qstrat.io.safetensors import map_tensor, write_safetensors
from qstrat.kernels import BLOCK_BYTES, QK_K

GGML_MAX_NAME_BYTES = 63
QUANTIZATION_VERSION = 2
PERM_SUFFIX = ".perm"
JOINT_SUFFIX = ".joint_perm"
KEY_PREFIX = "qstrat."


#: safetensors dtype tag of a passed-through tensor -> numpy dtype of its bytes; each tag is
#: also the name of its GGML type (BF16 goes as raw bits: numpy has no bfloat16)
PASSTHROUGH_TYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
    "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
}


@functools.cache
def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - a core dependency
        raise OutputError("GGUF output needs the package gguf") from None
    # the Q8_K layout is defined once, in kernels/layout.py; GGUF's must be the same
    q8_k = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
    if q8_k != (QK_K, BLOCK_BYTES):  # pragma: no cover - a gguf release that changed Q8_K
        raise FormatError(f"the gguf package's Q8_K block is {q8_k}, qstrat's ({QK_K}, {BLOCK_BYTES})")
    return gguf


def gguf_name(name: str) -> str:
    """The name a tensor gets in GGUF: itself, or cut with a hash suffix if too long."""
    if len(name.encode("utf-8")) <= GGML_MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
    head = name.encode("utf-8")[: GGML_MAX_NAME_BYTES - 17].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def passthrough_tag(ggml_type: int) -> str | None:
    """The safetensors dtype tag of a GGML type qstrat passes through (None for any other)."""
    try:
        name = _gguf().GGMLQuantizationType(ggml_type).name
    except ValueError:
        return None
    return name if name in PASSTHROUGH_TYPES else None


def write_gguf(model, target: str | os.PathLike, metadata: dict[str, object]) -> Path:
    """Write a :class:`qstrat.model.QuantizedModel` as one GGUF file (atomically)."""
    gguf = _gguf()
    target = Path(target)
    entries = []  # (name, producer of the numpy payload, numpy dtype, GGML raw type or None, shape, nbytes)
    perm_names, joint_names, joint_axes = [], [], []
    for name in model:
        entry = model.entries[name]
        if entry.quantized:
            files = entry.files
            if "q8k" in files:
                stored, ggml_type = read_q8k(model.directory / files["q8k"]), gguf.GGMLQuantizationType.Q8_K
            else:
                stored = read_blocks(model.directory / files["blocks"])
                ggml_type = gguf.GGMLQuantizationType[stored.type_name.upper()]
            payload = np.asarray(stored.blocks).reshape(stored.rows, -1)
            entries.append((name, lambda p=payload: p, np.uint8, ggml_type, payload.shape, payload.nbytes))
            if "perm" in files:
                perm = read_perm(model.directory / files["perm"], stored.k).astype(np.int32)
                entries.append((name + PERM_SUFFIX, lambda p=perm: p, np.int32, None, perm.shape, perm.nbytes))
                perm_names.append(name + PERM_SUFFIX)
        else:
            info = model.passthrough_info(name)
            if info.dtype not in PASSTHROUGH_TYPES:
                raise OutputError(f"GGUF has no type for {info.dtype} tensors")
            np_dtype = PASSTHROUGH_TYPES[info.dtype]
            # the writer derives the type from the numpy dtype, except for bfloat16's raw bits
            raw = gguf.GGMLQuantizationType.BF16 if info.dtype == "BF16" else None
            entries.append((name, lambda info=info, t=np_dtype: np.asarray(map_tensor(info)).view(t), np.dtype(np_dtype), raw, info.shape, info.nbytes))
        joint = model.joint_permutation(name)
        if joint is not None:
            perm = joint[0].astype(np.int32)
            entries.append((name + JOINT_SUFFIX, lambda p=perm: p, np.int32, None, perm.shape, perm.nbytes))
            joint_names.append(name + JOINT_SUFFIX)
            joint_axes.append(joint[1])
    renamed = {n: gguf_name(n) for n, *_ in entries if gguf_name(n) != n}
    if len({gguf_name(n) for n, *_ in entries}) != len(entries):
        raise OutputError(f"{target}: two tensor names collide in GGUF's 63-byte limit")
    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(tmp, str(metadata.get("architecture") or "qstrat"))
        writer.add_uint32("general.quantization_version", QUANTIZATION_VERSION)
        if metadata.get("name"):
            writer.add_name(str(metadata["name"]))
        if metadata.get("file_type") is not None:
            writer.add_file_type(int(metadata["file_type"]))  # llama.cpp's file type (a preset's)
        writer.add_string(KEY_PREFIX + "version", __version__)
        writer.add_string(KEY_PREFIX + "variant", str(metadata.get("variant") or "unknown"))
        writer.add_string(KEY_PREFIX + "config", json.dumps(metadata.get("config") or {}, sort_keys=True))
        for key, values in (("perm_tensors", perm_names), ("joint_perm_tensors", joint_names)):
            if values:
                writer.add_array(KEY_PREFIX + key, values)
        if joint_axes:
            writer.add_array(KEY_PREFIX + "joint_perm_axes", joint_axes)
        if renamed:
            writer.add_array(KEY_PREFIX + "renamed.gguf", list(renamed.values()))
            writer.add_array(KEY_PREFIX + "renamed.original", list(renamed))
        for name, _, dtype, raw, shape, nbytes in entries:
            writer.add_tensor_info(gguf_name(name), shape, np.dtype(dtype), nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, produce, *_ in entries:
            writer.write_tensor_data(produce())  # one tensor in memory at a time
        writer.close()
    return target


class GGUFModel:
    """A qstrat GGUF file read back: tensors by original name, with their roles."""

    def __init__(self, path: str | os.PathLike) -> None:
        gguf = _gguf()
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except FileNotFoundError:
            raise FormatError(f"{self.path}: no such file") from None
        except Exception as err:  # a third-party parser of untrusted bytes: any failure is a format error
            raise FormatError(f"{self.path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
        renamed = dict(zip(self._strings("renamed.gguf"), self._strings("renamed.original")))
        self.tensors = {renamed.get(t.name, t.name): t for t in self.reader.tensors}
        self.perm_names = set(self._strings("perm_tensors"))
        joint_names = self._strings("joint_perm_tensors")
        field = self.reader.get_field(KEY_PREFIX + "joint_perm_axes")
        axes = [int(v) for v in field.contents()] if field is not None else []
        if len(axes) != len(joint_names):
            raise FormatError(f"{self.path}: joint permutation metadata is inconsistent")
        self.joint_axes = dict(zip(joint_names, axes))
        self.variant = self._string("variant")
        config = self._string("config")
        try:
            self.config = json.loads(config) if config else {}
        except ValueError:
            raise FormatError(f"{self.path}: {KEY_PREFIX}config is not JSON") from None
        self.architecture = self._string("architecture", prefix="general.")
        self.name = self._string("name", prefix="general.")
        for companion in list(self.perm_names) + list(self.joint_axes):
            if companion not in self.tensors:
                raise FormatError(f"{self.path}: companion tensor {companion!r} is missing")

    def _string(self, key: str, prefix: str = KEY_PREFIX) -> str | None:
        field = self.reader.get_field(prefix + key)
        return None if field is None else str(field.contents())

    def _strings(self, key: str) -> list[str]:
        field = self.reader.get_field(KEY_PREFIX + key)
        return [] if field is None else [str(v) for v in field.contents()]

    def model_tensors(self) -> list[str]:
        """Names of the model's own tensors (companions excluded), sorted."""
        return sorted(n for n in self.tensors if n not in self.perm_names and n not in self.joint_axes)


def block_type_of(tensor) -> str | None:
    """The registry's name of a GGUF tensor's block type, None for a type kept as a passthrough
    tensor (F32/F16/BF16 and integers: what a run passes through comes back as it was)."""
    ggml_type = _gguf().GGMLQuantizationType(int(tensor.tensor_type))
    if ggml_type.name in PASSTHROUGH_TYPES:
        return None
    from qstrat.formats import block_type  # the registry loads the kernels: only when a file has quantized tensors

    return block_type(ggml_type).name


def gguf_to_directory(source: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """An output directory (.q8k, .perm, passthrough, manifest) from a qstrat GGUF file."""
    model = GGUFModel(source)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(describe_os_error(out, err)) from None
    names = model.model_tensors()
    types = {}
    for name in names:
        try:
            types[name] = block_type_of(model.tensors[name])
        except (InputError, ValueError):
            raise InputError(f"{model.path}: tensor {name!r} has GGML type {int(model.tensors[name].tensor_type)}, not one qstrat reads") from None
    quantized = [n for n in names if types[n] is not None]
    stems = assign_file_stems(quantized)
    entries: dict[str, QuantizedEntry | PassthroughEntry] = {}
    passthrough, joint = [], []
    for name in names:
        tensor = model.tensors[name]
        shape = [int(d) for d in reversed(tensor.shape.tolist())]
        companion = name + JOINT_SUFFIX
        axis = model.joint_axes.get(companion)
        common = {"shape": shape, "permutation": "none" if axis is None else "joint",
                  "joint": None if axis is None else Joint(group=None, axis=axis)}
        if name in stems:
            type_name = types[name]
            if len(shape) != 2:
                raise InputError(f"{model.path}: {type_name} tensor {name!r} has shape {shape}; qstrat reads 2-D ones")
            rows, k = shape
            if type_name == "q8_k":
                if k % QK_K:
                    raise InputError(f"{model.path}: Q8_K tensor {name!r} has row length {k}")
                blocks = np.asarray(tensor.data).reshape(rows * (k // QK_K), BLOCK_BYTES)
                files = {"q8k": write_q8k(out / f"{stems[name]}.q8k", blocks, rows, k)}
            else:
                blocks = np.asarray(tensor.data).view(np.uint8).reshape(rows, -1)
                files = {"blocks": write_blocks(out / f"{stems[name]}{QBLK_SUFFIX}", blocks, type_name, k)}
            if name + PERM_SUFFIX in model.perm_names:
                files["perm"] = write_perm(out / f"{stems[name]}.perm", np.asarray(model.tensors[name + PERM_SUFFIX].data))
                if axis is None:
                    common["permutation"] = "runtime"
            files = {role: FileEntry(**vars(f)) for role, f in files.items()}
            storage = "q8k" if type_name == "q8_k" else type_name
            entries[name] = QuantizedEntry(storage=storage, dtype="unknown", strategy=None, metrics=None, files=files, **common)
        else:
            tag = passthrough_tag(int(tensor.tensor_type))
            if tag is None:
                raise InputError(f"{model.path}: tensor {name!r} has GGML type {int(tensor.tensor_type)}, not one qstrat writes")
            raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
            passthrough.append((name, tag, tuple(shape), raw))
            entries[name] = PassthroughEntry(storage="passthrough", dtype=tag, reason="from GGUF", files={}, **common)
        if axis is not None:
            joint.append((name, "I64", (len(model.tensors[companion].data),), np.asarray(model.tensors[companion].data).astype("<i8")))
    size, sha = write_safetensors(out / PASSTHROUGH_NAME, passthrough)
    for name, *_ in passthrough:
        entries[name].files = {"safetensors": FileEntry(path=PASSTHROUGH_NAME, size=size, sha256=sha)}
    if joint:
        jsize, jsha = write_safetensors(out / JOINT_PERMUTATIONS_NAME, joint)
        for name, *_ in joint:
            entries[name].files["joint_perm"] = FileEntry(path=JOINT_PERMUTATIONS_NAME, size=jsize, sha256=jsha)
    source = Source(path=str(model.path), architecture=model.architecture, name=model.name, files=[model.path.name])
    write_manifest(out, new_manifest(source=source, config=model.config, variant=model.variant, tensors=entries, failed=[]))
    return out


__all__ = ["GGUFModel", "gguf_name", "gguf_to_directory", "write_gguf"]
