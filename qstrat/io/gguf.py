"""GGUF v3 containers: a whole quantized model in one file, written with the ``gguf`` package.

Quantized tensors are stored in their block type with exactly the bytes of their ``.q8k``
(GGML type Q8_K) or ``.qblk`` files; other tensors keep their dtype (F32/F16/BF16/F64/I8..I64).  A run-time
gather map is a companion I32 tensor ``<name>.perm``; joint permutations (needed only to
restore the original layout) are companions ``<name>.joint_perm`` (I32) in the generic
container and ``qstrat.joint_perm.<i>`` arrays in a file an engine loads.  GGML limits
names to 63 bytes: a longer name is cut and suffixed with ``~`` and 16 hex digits of its
SHA-256, and the metadata maps it back.  Written streaming (tensor infos first, then one
tensor at a time) to a temporary name, then renamed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qstrat._version import __version__
from qstrat.errors import FormatError, InputError, OutputError
from qstrat.io.atomic import atomic_path, describe_os_error, remove_stale_temporaries, require_sha256
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
from qstrat.io.gguf_read import PASSTHROUGH_TYPES, open_gguf, unreadable_type
from qstrat.io.names import RESIDUAL_PERMUTATION_KEY, assign_file_stems, storage_name
from qstrat.io.q8k import Q8KTensor, check_permutation, read_perm, read_q8k, read_q8k_shape, write_perm, write_q8k
from qstrat.io.qblock import SUFFIX as QBLK_SUFFIX, BlockTensor, read_blocks, read_blocks_header, write_blocks
from qstrat.io.safetensors import exact_in, stacked_rows, to_float32, write_safetensors
from qstrat.kernels import BLOCK_BYTES, QK_K

if TYPE_CHECKING:
    import gguf  # imported on first use (_gguf)

GGML_MAX_NAME_BYTES = 63
PERM_SUFFIX = ".perm"
JOINT_SUFFIX = ".joint_perm"
KEY_PREFIX = "qstrat."
#: qstrat.layout of a file written in llama.cpp's layout (absent from the generic container)
LLAMA_LAYOUT = "llama.cpp"
GGUF_INPUT_LAYOUT = "gguf-input"  # names and metadata carried over from a GGUF input
#: sha256 of the file's header (this key's own value read as the placeholder) then every tensor's bytes in
#: file order (padding excluded), for ``qstrat verify`` of a lone file; written as a placeholder of the
#: same length and filled in once the data is written
SHA256_KEY = KEY_PREFIX + "sha256"
_PENDING_SHA256 = "qstrat-sha256-pending-" + "0" * 42
#: what qstrat 0.x wrote before the header was covered: the tensor bytes alone (still checked)
DATA_SHA256_KEY = KEY_PREFIX + "data_sha256"
#: sha256 of the tensor table (stored name, GGML type, bytes of each tensor, in file order): a tool that
#: rewrites the file in other types (llama.cpp's quantizer, which copies every key) changes it, damage
#: to the data does not, so that verify can tell a rewritten file from a corrupted one
TABLE_SHA256_KEY = KEY_PREFIX + "tensor_table_sha256"
#: sha256 of the tensors' stored names, sorted: a rewrite in other types keeps them, so a table that no
#: longer matches under the same names is a rewrite, and one whose names changed is damage (a flipped
#: bit in a name had passed for a rewrite, which turned the checksum off)
NAMES_SHA256_KEY = KEY_PREFIX + "tensor_names_sha256"


def tensor_table_sha256(rows: Iterable[tuple[str, int, int]]) -> str:
    """The value of ``qstrat.tensor_table_sha256`` for these (stored name, GGML type id, bytes) rows."""
    return hashlib.sha256(json.dumps([[str(n), int(t), int(b)] for n, t, b in rows]).encode()).hexdigest()


def read_tensor_table_sha256(reader: gguf.GGUFReader) -> str:
    """``tensor_table_sha256`` of the tensors a GGUF file holds now."""
    return tensor_table_sha256((t.name, int(t.tensor_type), int(t.n_bytes)) for t in reader.tensors)


def tensor_names_sha256(names: Iterable[str]) -> str:
    """The value of ``qstrat.tensor_names_sha256`` for these stored names."""
    return hashlib.sha256(json.dumps(sorted(str(n) for n in names)).encode()).hexdigest()


def _recorded_string(reader: gguf.GGUFReader, key: str) -> str | None:
    field = reader.fields.get(key)
    return None if field is None else str(field.contents())


def rewritten(reader: gguf.GGUFReader) -> bool:
    """Whether another tool rewrote this qstrat file in other types, copying qstrat's keys (llama.cpp's
    quantizer does): its tensor table is not the one qstrat recorded, under the same names (a file
    of an earlier qstrat records no names: its table alone tells)."""
    table, names = _recorded_string(reader, TABLE_SHA256_KEY), _recorded_string(reader, NAMES_SHA256_KEY)
    return (table is not None and table != read_tensor_table_sha256(reader)
            and (names is None or names == tensor_names_sha256(t.name for t in reader.tensors)))


def checksum_problem(reader: gguf.GGUFReader, path: Path) -> tuple[str | None, bool]:
    """A sentence if a GGUF file's bytes differ from the checksum qstrat recorded in it (None if they
    match), and whether they could be checked: another tool's file records none, and one another
    tool rewrote in other types records that of a file that is gone."""
    recorded = recorded_sha256(reader)
    if recorded is None:
        return None, False
    if recorded[1] == gguf_sha256(reader, recorded[0]):
        return None, True
    if rewritten(reader):
        return None, False
    what = "header and tensor data" if recorded[0] == SHA256_KEY else "tensor data"
    return f"{path}: the sha256 of its {what} differs from the one it records (the file was changed or corrupted)", True


def require_recorded_sha256(reader: gguf.GGUFReader, path: Path) -> None:
    """Stop with a :class:`FormatError` if qstrat wrote this GGUF file and its bytes are not those it
    recorded (:func:`checksum_problem`); another tool's file records no checksum and passes."""
    problem, _ = checksum_problem(reader, path)
    if problem is not None:
        raise FormatError(f"{problem}; qstrat verify {path} checks it")


#: the float types a run also quantizes "to" (format f32, f16 or bf16, or a fallback type)
FLOAT_TYPES = ("F32", "F16", "BF16")
#: safetensors dtypes GGUF has no type for: their bytes go unchanged into the signed integer type of
#: their width, the dtype recorded (``qstrat.retyped``) so that reading them back restores it
RETYPED = {"BOOL": "I8", "U8": "I8", "F8_E4M3": "I8", "F8_E5M2": "I8", "U16": "I16", "U32": "I32", "U64": "I64"}


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


def _passthrough_entry(model, name: str, layout, gguf):
    """(producer, numpy dtype, raw type, shape, nbytes, source tag or None) of a passed-through tensor;
    the source tag is the dtype of a tensor stored in another type (widened to F32, or retyped)."""
    info = model.passthrough_info(name)
    stored_tag = RETYPED.get(info.dtype, info.dtype)
    if stored_tag not in PASSTHROUGH_TYPES:  # pragma: no cover - every safetensors dtype has a GGUF type or a RETYPED one
        raise OutputError(f"{name}: GGUF has no type for {info.dtype} tensors")
    np_dtype = PASSTHROUGH_TYPES[stored_tag]
    order = _row_order(layout, name, info.shape)
    llama_name = layout.names[name] if layout is not None else name
    if layout is not None and info.dtype in ("BF16", "F16") and (len(info.shape) <= 1 or llama_name.endswith("_norm.weight")):
        # convert_hf_to_gguf writes 1-D tensors and norms as F32 (exactly the same values)
        def widened(info=info, order=order):
            array = np.asarray(to_float32(info.dtype, np.asarray(model.stored_passthrough(name)[1])), dtype=np.float32)
            return array if order is None else array[order]

        return widened, np.dtype(np.float32), None, info.shape, info.numel * 4, info.dtype

    def produce(info=info, t=np_dtype, order=order):
        array = np.asarray(model.stored_passthrough(name)[1]).view(t)
        return array if order is None else array[order]

    # the writer derives the type from the numpy dtype, except for bfloat16's raw bits
    raw = gguf.GGMLQuantizationType.BF16 if info.dtype == "BF16" else None
    return produce, np.dtype(np_dtype), raw, info.shape, info.nbytes, info.dtype if info.dtype in RETYPED else None


def _row_order(layout, name: str, shape) -> np.ndarray | None:
    """The gather map of llama.cpp's q/k row layout for this tensor, if it takes one."""
    if layout is None or name not in layout.row_heads:
        return None
    from qstrat.llama_gguf import rope_row_order

    return rope_row_order(int(shape[0]), layout.row_heads[name])


def write_gguf(model, target: str | os.PathLike, metadata: dict[str, object]) -> Path:
    """Write a :class:`qstrat.model.QuantizedModel` as one GGUF file (atomically).

    With ``metadata["layout"]`` (a :class:`qstrat.llama_gguf.LlamaLayout`) the file is the
    model as llama.cpp's converter writes it: llama.cpp tensor names and hyperparameters,
    q/k rows in GGML's rotary layout, 1-D tensors as F32, the vocabulary; what qstrat needs
    to read it back (the Hugging Face names, which rows were reordered, joint permutations)
    is kept under ``qstrat.*`` keys, since llama.cpp refuses tensors it does not expect.
    A GGUF input's requantization (``metadata["carried"]``) keeps its joint permutations there
    too.  Otherwise it is qstrat's generic container (every tensor under its own name)."""
    gguf = _gguf()
    target = Path(target)
    layout = metadata.get("layout")
    entries = []  # (name, producer of the numpy payload, numpy dtype, GGML raw type or None, shape, nbytes)
    perm_names, joint_names, joint_axes, joint_arrays = [], [], [], []
    residual_names, residual_axes, residual_perm = [], [], None
    widened: dict[str, str] = {}
    retyped: dict[str, str] = {}
    # a file an engine loads (llama.cpp's layout, or a GGUF input's carried over) keeps joint
    # permutations in metadata: llama.cpp refuses tensors it does not expect
    for_engine = layout is not None or metadata.get("carried") is not None
    for name in model:
        if layout is not None and name in layout.dropped:
            continue
        entry = model.entries[name]
        if entry.quantized:
            files = entry.files
            # the headers now, the blocks when the tensor is written: a map (and a file descriptor) per
            # tensor held at once ran out of descriptors past `ulimit -n` tensors, and reordered q/k
            # rows held in memory grew with the layers
            if "q8k" in files:
                path, ggml_type = model.directory / files["q8k"], gguf.GGMLQuantizationType.Q8_K
                (rows, k), read = read_q8k_shape(path), read_q8k
                row_bytes = k // QK_K * BLOCK_BYTES
            else:
                path, read = model.directory / files["blocks"], read_blocks
                type_name, rows, k = read_blocks_header(path)
                ggml_type = gguf.GGMLQuantizationType[type_name.upper()]
                block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
                row_bytes = k // block_size * type_size
            order = _row_order(layout, name, (rows, k))

            def blocks(path=path, read=read, rows=rows, order=order):
                stored = np.asarray(read(model.intact(path.name)).blocks).reshape(rows, -1)
                # blocks run along a row: reordering rows of blocks gives exactly the blocks of the reordered matrix
                return stored if order is None else stored[order]

            # a stack of matrices (MoE experts): its file holds the rows of all of them
            stack = model.quantized_shape(name)[:-1] if entry.stack_shape is not None else (rows,)
            entries.append((name, blocks, np.uint8, ggml_type, (*stack, row_bytes), rows * row_bytes))
            if "perm" in files:
                if layout is not None:
                    raise OutputError(f"{name}: a run-time permutation cannot be written for llama.cpp")
                perm = read_perm(model.intact(files["perm"]), k).astype(np.int32)
                entries.append((name + PERM_SUFFIX, lambda p=perm: p, np.int32, None, perm.shape, perm.nbytes))
                perm_names.append(name + PERM_SUFFIX)
        else:
            produce, dtype, raw, shape, nbytes, source_tag = _passthrough_entry(model, name, layout, gguf)
            entries.append((name, produce, dtype, raw, shape, nbytes))
            if source_tag in RETYPED:
                retyped[name] = source_tag
            elif source_tag is not None:
                widened[name] = source_tag
        joint = model.joint_permutation(name)
        if joint is not None:
            perm = joint[0].astype(np.int32)
            if not for_engine:
                entries.append((name + JOINT_SUFFIX, lambda p=perm: p, np.int32, None, perm.shape, perm.nbytes))
                joint_names.append(name + JOINT_SUFFIX)
            else:
                joint_names.append(name)
                joint_arrays.append(perm)
            joint_axes.append(joint[1])
        residual = model.residual_permutation(name)
        if residual is not None:
            residual_perm = residual[0]
            residual_names.append(name)
            residual_axes.append(residual[1])
    if layout is not None:
        stored_names = {n: layout.names[n] for n, *_ in entries}
        extra = layout.extra_tensors()
        for name, array in extra:
            entries.append((name, lambda a=array: a, array.dtype, None, array.shape, array.nbytes))
            stored_names[name] = name
        renamed = {n: g for n, g in stored_names.items() if g != n}
    else:
        extra = []
        stored_names = {n: gguf_name(n) for n, *_ in entries}
        renamed = {n: g for n, g in stored_names.items() if g != n}
    empty = next((name for name, *_, shape, nbytes in entries if 0 in tuple(shape)), None)
    if empty is not None:  # GGUF readers (gguf-py's, qstrat's) take no tensor without values
        raise InputError(f"{model.directory}: tensor {empty!r} has no values, which a GGUF file cannot hold for qstrat's readers")
    if len(set(stored_names.values())) != len(entries):
        raise OutputError(f"{target}: two tensor names collide in GGUF's 63-byte limit")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(describe_os_error(target.parent, err)) from None
    with contextlib.suppress(OSError):
        remove_stale_temporaries(target.parent, keep_live_writers=True)  # a convert killed with SIGKILL left a model's worth
    with atomic_path(target) as tmp:
        architecture = layout.arch if layout is not None else str(metadata.get("architecture") or "qstrat")
        writer = gguf.GGUFWriter(tmp, architecture)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if metadata.get("carried") is not None:
            writer.add_string(KEY_PREFIX + "layout", GGUF_INPUT_LAYOUT)
            for key, value, value_type, element_type in metadata["carried"]:
                writer.add_key_value(key, value, value_type, sub_type=element_type)  # a GGUF input's own
        if metadata.get("name"):
            writer.add_name(str(metadata["name"]))
        if layout is not None:
            layout.write_parameters(writer, metadata.get("file_type"))
            layout.write_vocabulary(writer)
        elif metadata.get("file_type") is not None:
            writer.add_file_type(int(metadata["file_type"]))  # llama.cpp's file type (a preset's, a GGUF input's)
        writer.add_string(KEY_PREFIX + "version", __version__)
        writer.add_string(SHA256_KEY, _PENDING_SHA256)
        writer.add_string(TABLE_SHA256_KEY, tensor_table_sha256(
            (stored_names[name], int(raw) if raw is not None else int(gguf.GGMLQuantizationType[_TAGS[np.dtype(dtype)]]), nbytes)
            for name, _, dtype, raw, _, nbytes in entries))
        writer.add_string(NAMES_SHA256_KEY, tensor_names_sha256(stored_names[name] for name, *_ in entries))
        writer.add_string(KEY_PREFIX + "variant", str(metadata.get("variant") or "unknown"))
        writer.add_string(KEY_PREFIX + "config", json.dumps(metadata.get("config") or {}, sort_keys=True))
        if layout is not None:
            writer.add_string(KEY_PREFIX + "layout", LLAMA_LAYOUT)
            writer.add_string(KEY_PREFIX + "source_architecture", str(metadata.get("architecture") or ""))
        for key, values in (("perm_tensors", perm_names), ("joint_perm_tensors", joint_names)):
            if values:
                writer.add_array(KEY_PREFIX + key, values)
        if joint_axes:
            writer.add_array(KEY_PREFIX + "joint_perm_axes", joint_axes)
        for i, perm in enumerate(joint_arrays):
            writer.add_array(f"{KEY_PREFIX}joint_perm.{i}", perm.tolist())
        if residual_perm is not None:
            # one permutation of the hidden dimension for every tensor listed (metadata, since
            # llama.cpp refuses tensors it does not expect)
            writer.add_array(KEY_PREFIX + "residual_perm", residual_perm.astype(np.int32).tolist())
            writer.add_array(KEY_PREFIX + "residual_tensors", residual_names)
            writer.add_array(KEY_PREFIX + "residual_axes", residual_axes)
        if retyped:
            writer.add_array(KEY_PREFIX + "retyped", list(retyped))
            writer.add_array(KEY_PREFIX + "retyped_from", list(retyped.values()))
        if renamed:
            writer.add_array(KEY_PREFIX + "renamed.gguf", list(renamed.values()))
            writer.add_array(KEY_PREFIX + "renamed.original", list(renamed))
        if layout is not None:
            if layout.row_heads:
                permuted = sorted(n for n in layout.row_heads if n in stored_names)
                writer.add_array(KEY_PREFIX + "rope_rows", permuted)
                writer.add_array(KEY_PREFIX + "rope_rows_heads", [layout.row_heads[n] for n in permuted])
            if widened:
                writer.add_array(KEY_PREFIX + "widened", list(widened))
                writer.add_array(KEY_PREFIX + "widened_from", list(widened.values()))
            if extra:
                writer.add_array(KEY_PREFIX + "generated", [n for n, _ in extra])
        for name, _, dtype, raw, shape, nbytes in entries:
            writer.add_tensor_info(stored_names[name], shape, np.dtype(dtype), nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.fout[0].flush()
        data_start = writer.fout[0].tell()
        with open(tmp, "rb") as written:
            digest = hashlib.sha256(written.read(data_start))  # the header, the placeholder in it
        for _, produce, *_ in entries:
            payload = np.ascontiguousarray(produce())  # one tensor in memory at a time
            digest.update(memoryview(payload).cast("B"))
            writer.write_tensor_data(payload)
        writer.close()
        _fill_in_sha256(tmp, data_start, digest.hexdigest(), target)
    return target


#: numpy dtype -> the GGML type name gguf-py's writer gives a tensor of it (bfloat16 goes as a raw type)
_TAGS = {np.dtype(t): tag for tag, t in PASSTHROUGH_TYPES.items() if tag != "BF16"}


def _fill_in_sha256(path: Path, header_end: int, hexdigest: str, target: Path) -> None:
    """Overwrite the placeholder value of ``qstrat.sha256`` (same length) in the header of ``path``,
    the temporary file of ``target``.  gguf-py's writer does not say where it put a value, so the
    placeholder, unique in the header, is found by its bytes."""
    with open(path, "r+b") as file:
        header = file.read(header_end)
        at = header.find(_PENDING_SHA256.encode())
        if at < 0 or header.find(_PENDING_SHA256.encode(), at + 1) >= 0:
            raise OutputError(f"{target}: the checksum's place in the header was not found once")
        file.seek(at)
        file.write(hexdigest.encode())


def recorded_sha256(reader: gguf.GGUFReader) -> tuple[str, str] | None:
    """(key, value) of the checksum a GGUF file records: ``qstrat.sha256`` (header and tensor data),
    or an older qstrat's ``qstrat.data_sha256`` (tensor data); None for another tool's file."""
    for key in (SHA256_KEY, DATA_SHA256_KEY):
        field = reader.fields.get(key)
        if field is not None:
            return key, str(field.contents())
    return None


def gguf_sha256(reader: gguf.GGUFReader, key: str) -> str:
    """The checksum ``key`` of a GGUF file as ``write_gguf`` computes it: for ``qstrat.sha256``, its
    header with that key's value read as the placeholder, then its tensors' bytes in tensor order;
    for ``qstrat.data_sha256``, the tensors' bytes alone."""
    digest = hashlib.sha256()
    if key == SHA256_KEY:
        field = reader.fields[key]
        value_at = field.offset + sum(part.nbytes for part in field.parts[:-1])  # the string's bytes come last
        # the header as written: its key-values and tensor infos, not the alignment padding after them
        parsed = list(reader.fields.values()) + [tensor.field for tensor in reader.tensors]
        header_end = max(f.offset + sum(part.nbytes for part in f.parts) for f in parsed)
        header = bytearray(reader.data[:header_end])
        header[value_at : value_at + len(_PENDING_SHA256)] = _PENDING_SHA256.encode()
        digest.update(header)
    for tensor in reader.tensors:
        digest.update(memoryview(np.ascontiguousarray(tensor.data)).cast("B"))
    return digest.hexdigest()


class GGUFModel:
    """A qstrat GGUF file read back: tensors by original name, with their roles.

    A file in llama.cpp's layout (``qstrat.layout``) has its tensors mapped back to their
    Hugging Face names, q/k rows back in the source order, widened 1-D tensors back in their
    source dtype, and the tensors llama.cpp's converter generates (``rope_freqs``) left out."""

    def __init__(self, path: str | os.PathLike) -> None:
        _gguf()  # checks gguf-py's Q8_K layout against qstrat's
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        stored_names, original_names = self._strings("renamed.gguf"), self._strings("renamed.original")
        if len(stored_names) != len(original_names) or not set(stored_names) <= {t.name for t in self.reader.tensors}:
            raise FormatError(f"{self.path}: {KEY_PREFIX}renamed metadata is inconsistent")
        renamed = dict(zip(stored_names, original_names))
        self.tensors = {renamed.get(t.name, t.name): t for t in self.reader.tensors}
        self.llama_cpp = self._string("layout") == LLAMA_LAYOUT
        self.generated = set(self._strings("generated"))
        self.perm_names = set(self._strings("perm_tensors"))
        joint_names = self._strings("joint_perm_tensors")
        axes = self._ints("joint_perm_axes")
        if len(axes) != len(joint_names):
            raise FormatError(f"{self.path}: joint permutation metadata is inconsistent")
        # joint permutations as metadata arrays (files engines load) or companion tensors
        in_metadata = bool(joint_names) and KEY_PREFIX + "joint_perm.0" in self.reader.fields
        self.joint_companions = set() if in_metadata else set(joint_names)
        for companion, suffix in [(c, PERM_SUFFIX) for c in self.perm_names] + [(c, JOINT_SUFFIX) for c in self.joint_companions]:
            self._check_companion(companion, suffix)
        if self._string("version") is not None:  # qstrat wrote it: every gather map is listed
            unlisted = sorted(n for n in self.tensors if n.endswith(PERM_SUFFIX) and n[: -len(PERM_SUFFIX)] in self.tensors
                              and n not in self.perm_names)
            if unlisted:
                raise FormatError(f"{self.path}: tensor {unlisted[0]!r} is a gather map {KEY_PREFIX}perm_tensors does not list")
        # the one tensor llama.cpp's converter generates (llama3's rope scaling): anything else is the model's
        generated = {_gguf().TENSOR_NAMES[_gguf().MODEL_TENSOR.ROPE_FREQS] + ".weight"}
        if self.generated - generated:
            raise FormatError(f"{self.path}: {KEY_PREFIX}generated names {sorted(self.generated - generated)[0]!r}, "
                              "not a tensor llama.cpp's converter generates")
        self.joint: dict[str, tuple[np.ndarray, int]] = {}
        for i, (name, axis) in enumerate(zip(joint_names, axes)):
            if in_metadata:
                self.joint[name] = (np.asarray(self._ints(f"joint_perm.{i}"), dtype=np.int64), axis)
            else:
                self.joint[name[: -len(JOINT_SUFFIX)]] = (np.asarray(self.tensors[name].data).astype(np.int64), axis)
        residual_names, residual_axes = self._strings("residual_tensors"), self._ints("residual_axes")
        residual_perm = np.asarray(self._ints("residual_perm"), dtype=np.int64)
        if len(residual_names) != len(residual_axes) or (residual_names and not residual_perm.size):
            raise FormatError(f"{self.path}: residual-stream permutation metadata is inconsistent")
        #: the residual stream's permutation and the axis it permutes, per tensor it permutes
        self.residual: dict[str, tuple[np.ndarray, int]] = {n: (residual_perm, a) for n, a in zip(residual_names, residual_axes)}
        for kind, permutations in (("joint", self.joint), ("residual-stream", self.residual)):  # each tensor held, each map whole
            for name, (perm, axis) in permutations.items():
                self._check_permutation(kind, name, perm, axis)
        self.row_heads = self._pairs("rope_rows", self._ints("rope_rows_heads"))
        self.widened = self._pairs("widened", self._strings("widened_from"))
        for name, heads in self.row_heads.items():
            rows = int(self.tensors[name].shape[-1])  # ne: the row length first, the rows last
            if heads < 1 or rows % (2 * heads):
                raise FormatError(f"{self.path}: {KEY_PREFIX}rope_rows: {rows} rows of {name!r} do not split into {heads} heads")
        if set(self.widened.values()) - {"BF16", "F16"}:
            raise FormatError(f"{self.path}: {KEY_PREFIX}widened_from holds a dtype other than BF16 / F16")
        self.retyped = self._pairs("retyped", self._strings("retyped_from"))
        for name, tag in self.retyped.items():
            if tag not in RETYPED:
                raise FormatError(f"{self.path}: {KEY_PREFIX}retyped_from: {tag!r} is not a dtype stored in another type")
            if passthrough_tag(int(self.tensors[name].tensor_type)) != RETYPED[tag]:
                raise FormatError(f"{self.path}: {KEY_PREFIX}retyped: {name!r} ({tag}) is not stored as {RETYPED[tag]}")
        self.variant = self._string("variant")
        config = self._string("config")
        try:
            self.config = json.loads(config) if config else {}
        except ValueError:
            raise FormatError(f"{self.path}: {KEY_PREFIX}config is not JSON") from None
        if not isinstance(self.config, dict):
            raise FormatError(f"{self.path}: {KEY_PREFIX}config is not a JSON object")
        self.architecture = self._string("architecture", prefix="general.")
        if self.llama_cpp:
            self.architecture = self._string("source_architecture") or self.architecture
        self.name = self._string("name", prefix="general.")

    def _check_companion(self, companion: str, suffix: str) -> None:
        """A format error unless ``companion`` is a 1-D I32 tensor of the file named after one of its tensors."""
        tensor = self.tensors.get(companion)
        if tensor is None:
            raise FormatError(f"{self.path}: companion tensor {companion!r} is missing")
        if not companion.endswith(suffix) or companion[: -len(suffix)] not in self.tensors:
            raise FormatError(f"{self.path}: companion tensor {companion!r} does not name a tensor of the file (<name>{suffix})")
        if passthrough_tag(int(tensor.tensor_type)) != "I32" or len(tensor.shape) != 1:
            raise FormatError(f"{self.path}: companion tensor {companion!r} is not a 1-D I32 tensor")

    def _check_permutation(self, kind: str, name: str, perm: np.ndarray, axis: int) -> None:
        """A format error unless ``perm`` permutes axis ``axis`` of tensor ``name`` (as numpy orders axes)."""
        if name not in self.tensors:
            raise FormatError(f"{self.path}: {kind} permutation of a tensor {name!r} the file does not hold")
        shape = self.shape(name)
        if not 0 <= axis < len(shape):
            raise FormatError(f"{self.path}: {kind} permutation of {name!r} along axis {axis}; the tensor has {len(shape)}")
        check_permutation(perm, shape[axis], f"{self.path}: {kind} permutation of {name!r}")

    def _field(self, key: str, kinds: tuple[str, ...]):
        """The field ``key`` (None if absent), when its type is one of ``kinds`` (``STRING``, ``ARRAY
        of STRING``, ``ARRAY of INT``): a file whose metadata says otherwise is a format error."""
        gguf = _gguf()
        field = self.reader.get_field(key)
        if field is None:
            return None
        types = list(field.types)
        if types == [gguf.GGUFValueType.ARRAY] and any(k.startswith("ARRAY of ") for k in kinds):
            return field  # an empty array: of any element type
        kind = types[0].name if types[0] != gguf.GGUFValueType.ARRAY else "ARRAY of " + types[1].name
        if "ARRAY of INT" in kinds and kind.startswith("ARRAY of ") and ("INT" in kind[9:]):
            return field
        if kind not in kinds:
            raise FormatError(f"{self.path}: {key} is {kind}, expected {' or '.join(kinds)}")
        return field

    def _string(self, key: str, prefix: str = KEY_PREFIX) -> str | None:
        field = self._field(prefix + key, ("STRING",))
        return None if field is None else str(field.contents())

    def _strings(self, key: str) -> list[str]:
        field = self._field(KEY_PREFIX + key, ("ARRAY of STRING",))
        return [] if field is None else [str(v) for v in field.contents()]

    def _pairs(self, key: str, values: list) -> dict:
        """{tensor name in ``qstrat.<key>``: its value in ``values``}; every name a tensor of the file."""
        names = self._strings(key)
        if len(names) != len(values) or not set(names) <= set(self.tensors):
            raise FormatError(f"{self.path}: {KEY_PREFIX}{key} metadata is inconsistent")
        return dict(zip(names, values))

    def _ints(self, key: str) -> list[int]:
        field = self._field(KEY_PREFIX + key, ("ARRAY of INT",))
        values = [] if field is None else [int(v) for v in field.contents()]
        if any(not -(2**63) <= v < 2**63 for v in values):
            raise FormatError(f"{self.path}: {KEY_PREFIX}{key} holds a value out of range")
        return values

    def model_tensors(self) -> list[str]:
        """Names of the model's own tensors (companions and generated tensors excluded), sorted."""
        others = self.perm_names | self.joint_companions | self.generated
        return sorted(n for n in self.tensors if n not in others)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape as numpy orders it (GGUF lists the row length first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def block_types(self, float_quantized: Collection[str] = ()) -> dict[str, str | None]:
        """The registry's block type of each of the model's tensors, None for a passed-through one.

        An F32/F16/BF16 tensor is one of those types (not passed through) when it has a run-time
        permutation, which reading must undo, or when ``float_quantized`` (the run's manifest) names it."""
        types = {}
        for name in self.model_tensors():
            tag = passthrough_tag(int(self.tensors[name].tensor_type))
            try:
                if tag in FLOAT_TYPES and (name + PERM_SUFFIX in self.perm_names or name in float_quantized):
                    from qstrat.formats import block_type  # the registry loads the kernels: only when needed

                    types[name] = block_type(tag).name
                else:
                    types[name] = block_type_of(self.tensors[name])
            except (InputError, ValueError):
                raise unreadable_type(self.path, name, int(self.tensors[name].tensor_type)) from None
        return types

    def stored_type_names(self) -> dict[str, str]:
        """The GGML type name (lower case) of each of the model's tensors not passed through, readable by
        qstrat or not: what a listing shows of a file another tool wrote in types qstrat does not read."""
        names = {}
        for name in self.model_tensors():
            type_id = int(self.tensors[name].tensor_type)
            if passthrough_tag(type_id) is None:
                try:
                    names[name] = _gguf().GGMLQuantizationType(type_id).name.lower()
                except ValueError:
                    names[name] = f"ggml type {type_id}"
        return names

    def unreadable_types(self) -> list[str]:
        """The GGML types (lower case) of the model's tensors that qstrat does not read (NVFP4, types newer than gguf-py, ...)."""
        from qstrat.formats import DECODED_ONLY, FORMATS  # the registry loads the kernels: only when asked

        return sorted(set(self.stored_type_names().values()) - FORMATS.keys() - DECODED_ONLY.keys())

    def stored_tensor(self, name: str, type_name: str) -> Q8KTensor | BlockTensor:
        """A quantized tensor's blocks (mapped, not copied), its rows in the source's order.  A tensor of
        more than two dimensions (a MoE model's stacked experts) comes as the rows of all its matrices,
        one after another, as GGML stores them (each row is quantized on its own)."""
        shape = self.shape(name)
        rows, k = stacked_rows(shape), shape[-1]
        data = np.asarray(self.tensors[name].data)
        if type_name == "q8_k":
            if k % QK_K:
                raise InputError(f"{self.path}: Q8_K tensor {name!r} has row length {k}")
            return Q8KTensor(rows, k, data.reshape(rows * (k // QK_K), BLOCK_BYTES))
        return BlockTensor(type_name, rows, k, self.source_rows(name, data.view(np.uint8).reshape(rows, -1)))

    def runtime_perm(self, name: str, k: int) -> np.ndarray | None:
        """A quantized tensor's run-time gather map (its ``.perm`` companion), if it has one, checked
        to permute its ``k`` columns."""
        if name + PERM_SUFFIX not in self.perm_names:
            return None
        perm = np.asarray(self.tensors[name + PERM_SUFFIX].data).astype(np.int64)
        check_permutation(perm, k, f"{self.path}: {name}{PERM_SUFFIX}")
        return perm

    def permutation_kind(self, name: str) -> str:
        """A manifest's ``permutation`` of a tensor: ``runtime`` (a ``.perm`` companion; no joint
        permutation), else ``joint`` (function-preserving: a joint or the residual stream's), else ``none``."""
        if name + PERM_SUFFIX in self.perm_names and name not in self.joint:
            return "runtime"
        return "joint" if name in self.joint or name in self.residual else "none"

    def checked_types(self, float_quantized: Collection[str] = ()) -> dict[str, str | None]:
        """:meth:`block_types`, once every tensor has passed the checks reading it makes (its type, shape
        and run-time permutation): for writers that must refuse a bad file before touching anything."""
        types = self.block_types(float_quantized)
        for name, type_name in types.items():
            if type_name is None:
                self.passthrough_dtype(name)
            else:
                self.runtime_perm(name, self.stored_tensor(name, type_name).k)
        return types

    def source_rows(self, name: str, array: np.ndarray) -> np.ndarray:
        """``array`` (a tensor's stored rows) in the source's row order."""
        heads = self.row_heads.get(name)
        if heads is None:
            return array
        from qstrat.llama_gguf import rope_row_order

        source = np.empty_like(array)
        source[rope_row_order(array.shape[0], heads)] = array
        return source

    def passthrough_dtype(self, name: str) -> str:
        """The safetensors dtype tag of a passed-through tensor as the source held it."""
        tensor = self.tensors[name]
        tag = passthrough_tag(int(tensor.tensor_type))
        if tag is None:
            raise unreadable_type(self.path, name, int(tensor.tensor_type))
        if tag == "F32" and name in self.widened:
            return self.widened[name]
        return self.retyped.get(name, tag)  # the same bytes

    def passthrough_bytes(self, name: str, shape: list[int]) -> tuple[str, np.ndarray]:
        """(dtype tag, raw bytes) of a passed-through tensor, as the source held it."""
        tag, stored = self.passthrough_dtype(name), passthrough_tag(int(self.tensors[name].tensor_type))
        array = np.asarray(self.tensors[name].data).reshape(-1)
        if stored == "BF16":
            array = array.view(np.uint16)  # the reader gives bfloat16 as raw bytes
        array = self.source_rows(name, array.reshape(shape) if shape else array)
        if stored == "F32" and name in self.widened:
            array = exact_in(tag, array)  # exact: widened from that dtype
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if tag == "BOOL" and raw.size and raw.max() > 1:  # stored as I8: any byte fits, a bool is 0 or 1
            raise FormatError(f"{self.path}: tensor {name!r} ({KEY_PREFIX}retyped BOOL) holds bytes other than 0 and 1")
        return tag, raw

    def rewritten(self) -> bool:
        """:func:`rewritten` of this file: its recorded checksum is stale."""
        return rewritten(self.reader)

    def checksum_problem(self) -> tuple[str | None, bool]:
        """:func:`checksum_problem` of this file."""
        return checksum_problem(self.reader, self.path)

    def check_intact(self, expected_sha256: str | None = None) -> None:
        """Stop with a :class:`FormatError` naming the file if its bytes are not those written: the
        whole file's sha256 against ``expected_sha256`` (an output directory's manifest records its
        container's), else the checksum qstrat recorded in the file, if it still applies."""
        if expected_sha256 is not None:
            require_sha256(self.path, expected_sha256, self.path.parent)
        else:
            require_recorded_sha256(self.reader, self.path)

    def describe_layout(self) -> str:
        """One line: whether llama.cpp runs this file (and whether another tool rewrote it)."""
        line = self._describe_layout()
        return line + "; rewritten by another tool since qstrat wrote it (its tensors are not those qstrat recorded)" if self.rewritten() else line

    def _describe_layout(self) -> str:
        if self.llama_cpp:
            return f"a llama.cpp model (architecture {self._string('architecture', prefix='general.')})"
        if self._string("layout") == GGUF_INPUT_LAYOUT:
            return (f"a llama.cpp model (architecture {self._string('architecture', prefix='general.')}; "
                    "names, metadata and vocabulary of the GGUF it was quantized from)")
        if self._string("version") is None:  # not written by qstrat: what llama.cpp makes of it is its own affair
            unread = self.unreadable_types()
            what = f"qstrat cannot read its {', '.join(unread)} tensors" if unread else "qstrat reads its tensors"
            return f"a GGUF file another tool wrote (architecture {self._string('architecture', prefix='general.')}); {what}"
        if any(int(t.tensor_type) == int(_gguf().GGMLQuantizationType.Q8_K) for t in self.tensors.values()):
            return "not a llama.cpp model: qstrat's container of Q8_K weights, which llama.cpp cannot run (Candle loads it)"
        return "not a llama.cpp model: qstrat's generic container (tensors under their own names, no hyperparameters or vocabulary)"


def block_type_of(tensor) -> str | None:
    """The registry's name of a GGUF tensor's block type, None for a type kept as a passthrough
    tensor (F32/F16/BF16 and integers: what a run passes through comes back as it was)."""
    ggml_type = _gguf().GGMLQuantizationType(int(tensor.tensor_type))
    if ggml_type.name in PASSTHROUGH_TYPES:
        return None
    from qstrat.formats import readable_type  # the registry loads the kernels: only when a file has quantized tensors

    return readable_type(ggml_type).name


def check_unpackable(model: GGUFModel, types: dict[str, str | None]) -> None:
    """Refuse a file whose quantized tensors an output directory cannot hold: a ``.qblk`` file holds a
    matrix or the rows of a stack of them (a MoE model's experts, 3-D), a ``.q8k`` file a matrix."""
    for name, type_name in types.items():
        shape = model.shape(name)
        if type_name is not None and (len(shape) > 3 or (len(shape) == 3 and type_name == "q8_k")):
            held = "2-D quantized tensors and 3-D stacks of GGUF block types" if len(shape) > 3 else "Q8_K matrices, not stacks of them"
            raise InputError(f"{model.path}: {type_name} tensor {name!r} has shape {list(shape)}; an output directory holds "
                             f"{held}: read the GGUF itself (inspect, dequantize, load_model)")


def unpack_gguf(model: GGUFModel, out: Path, types: dict[str, str | None] | None = None) -> None:
    """Write the tensor files, passthrough and permutation files of a GGUF file read back into the
    directory ``out``, then its manifest (last).  What the directory held before is the caller's affair.
    ``types``: the model's :meth:`GGUFModel.checked_types`, when the caller has them already (and has
    passed them to :func:`check_unpackable`)."""
    names = model.model_tensors()
    if types is None:  # a caller with them (convert) has made both checks before touching its directory
        types = model.checked_types()  # its errors name the GGUF file, not the files written from it
        check_unpackable(model, types)
    quantized = [n for n in names if types[n] is not None]
    stems = assign_file_stems(quantized)
    entries: dict[str, QuantizedEntry | PassthroughEntry] = {}
    passthrough, joint = [], []
    for name in names:
        shape = model.shape(name)
        joint_perm = model.joint.get(name)
        axis = None if joint_perm is None else joint_perm[1]
        residual_axis = model.residual[name][1] if name in model.residual else None
        common = {"shape": list(shape), "permutation": model.permutation_kind(name),
                  "joint": None if axis is None else Joint(group=None, axis=axis), "residual_axis": residual_axis}
        if name in stems:
            stored = model.stored_tensor(name, types[name])
            if types[name] == "q8_k":
                files = {"q8k": write_q8k(out / f"{stems[name]}.q8k", stored.blocks, stored.rows, stored.k)}
            else:
                files = {"blocks": write_blocks(out / f"{stems[name]}{QBLK_SUFFIX}", stored.blocks, types[name], stored.k)}
            perm = model.runtime_perm(name, stored.k)
            if perm is not None:
                files["perm"] = write_perm(out / f"{stems[name]}.perm", perm)
            files = {role: FileEntry(**vars(f)) for role, f in files.items()}
            storage = storage_name(types[name])
            entries[name] = QuantizedEntry(storage=storage, dtype="unknown", strategy=None, metrics=None, files=files, **common)
        else:
            tag, raw = model.passthrough_bytes(name, list(shape))
            passthrough.append((name, tag, shape, raw))
            entries[name] = PassthroughEntry(storage="passthrough", dtype=tag, reason="from GGUF", files={}, **common)
        if axis is not None:
            joint.append((name, "I64", (len(joint_perm[0]),), joint_perm[0].astype("<i8")))
    if model.residual:
        perm = next(iter(model.residual.values()))[0]
        joint.append((RESIDUAL_PERMUTATION_KEY, "I64", perm.shape, perm.astype("<i8")))
    size, sha = write_safetensors(out / PASSTHROUGH_NAME, passthrough)
    for name, *_ in passthrough:
        entries[name].files = {"safetensors": FileEntry(path=PASSTHROUGH_NAME, size=size, sha256=sha)}
    if joint:
        jsize, jsha = write_safetensors(out / JOINT_PERMUTATIONS_NAME, joint)
        for name in entries:
            if entries[name].joint is not None or entries[name].residual_axis is not None:
                entries[name].files["joint_perm"] = FileEntry(path=JOINT_PERMUTATIONS_NAME, size=jsize, sha256=jsha)
    source = Source(path=str(model.path.resolve()), architecture=model.architecture, name=model.name, files=[model.path.name])
    write_manifest(out, new_manifest(source=source, config=model.config, variant=model.variant, tensors=entries, failed=[]))


__all__ = ["GGUFModel", "gguf_name", "unpack_gguf", "write_gguf"]
