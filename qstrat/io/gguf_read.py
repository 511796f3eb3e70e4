"""Opening any GGUF file (a model, an importance matrix) with gguf-py's reader, with one error for bad bytes."""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qstrat.errors import FormatError, InputError

if TYPE_CHECKING:
    import gguf

#: safetensors dtype tag of a tensor GGUF and safetensors both hold as plain values -> numpy dtype of its
#: bytes; each tag is also the name of its GGML type (BF16 goes as raw bits: numpy has no bfloat16)
PASSTHROUGH_TYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
    "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
}


def unreadable_type(path: str | os.PathLike, tensor: str, type_id: int) -> InputError:
    """The error for a tensor stored in a GGML type qstrat does not read: the type by name (its number
    when gguf-py does not know it) and the types qstrat reads."""
    import gguf

    from qstrat.formats import DECODED_ONLY, FORMATS  # the registry loads the kernels: only on this error's path

    try:
        name = f"{gguf.GGMLQuantizationType(type_id).name},"
    except ValueError:
        name = f"GGML type {type_id}, unknown to gguf-py,"
    readable = sorted(set(PASSTHROUGH_TYPES) | {t.upper() for t in [*FORMATS, *DECODED_ONLY]})
    return InputError(f"{path}: tensor {tensor!r} is {name} a type qstrat cannot read (it reads {', '.join(readable)})")


def is_gguf_name(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as a GGUF file is (``.gguf``, in any case: llama.cpp does not mind)."""
    return Path(path).suffix.lower() == ".gguf"


_U64 = struct.Struct("<Q")


class _Truncated(Exception):
    def __init__(self, needed: int) -> None:
        self.needed = needed


@functools.cache
def _checked_reader() -> type:
    import gguf

    class CheckedReader(gguf.GGUFReader):
        # every read of the header and of the tensors goes through _get: a read past the end is a
        # truncated file (the parser itself would fail later, on a reshape or an index, saying neither)
        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + int(count) * np.dtype(dtype).itemsize
            if end > len(self.data):
                raise _Truncated(end)
            return super()._get(offset, dtype, count, override_order)

        def _get_field_parts(self, orig_offs, raw_type):
            # gguf-py parses an array element by element, each through _get (a numpy view and a byte-order
            # view): a Llama 3 vocabulary (128 k tokens, 280 k merges) took 6-12 s, on every open.  The same
            # parts, for arrays of scalars or strings in the host's byte order, from one pass over the bytes.
            if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype, length = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            item_type, count, offs = int(raw_itype[0]), int(length[0]), orig_offs + 12
            scalar = self.gguf_scalar_to_np.get(item_type) if item_type in _SCALAR_TYPES else None
            if scalar is None and item_type != gguf.GGUFValueType.STRING:
                return super()._get_field_parts(orig_offs, raw_type)  # arrays of arrays: rare and short
            parts = [raw_itype, length]
            if scalar is not None:
                values = np.asarray(self._get(offs, scalar, count))  # views of a plain array: numpy's memmap
                parts += [values[i : i + 1] for i in range(count)]  # slices cost microseconds in Python
                offs += values.nbytes
            else:
                data, raw, size = np.asarray(self.data), memoryview(self.data), len(self.data)
                for _ in range(count):
                    if offs + 8 > size:
                        raise _Truncated(offs + 8)
                    end = offs + 8 + _U64.unpack_from(raw, offs)[0]
                    if end > size:
                        raise _Truncated(end)
                    parts += [data[offs : offs + 8].view(np.uint64), data[offs + 8 : end]]
                    offs = end
            step = 1 if scalar is not None else 2
            types = [gguf.GGUFValueType.ARRAY] + ([gguf.GGUFValueType(item_type)] if count else [])
            return offs - orig_offs, parts, list(range(1 + step, len(parts), step)), types

    _SCALAR_TYPES = {int(t) for t in gguf.GGUFValueType if t not in (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)}
    return CheckedReader


def open_gguf(path: str | os.PathLike, what: str = "file") -> gguf.GGUFReader:
    """A parsed GGUF file. A missing file is an InputError ("no such <what>"); bytes gguf-py cannot
    parse are a FormatError naming the file, which says so when the file ends before its contents do."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what}")
    size = path.stat().st_size
    if size == 0:
        raise FormatError(f"{path}: empty file, not a GGUF file")
    try:
        reader = _checked_reader()(path)
    except _Truncated as err:
        raise FormatError(f"{path}: truncated GGUF file ({size} bytes; its contents need at least {err.needed})") from None
    except Exception as err:  # a third-party parser of untrusted bytes: any failure is a format error
        raise FormatError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
    _check_contents(reader, path)
    _refuse_split(reader, path)
    return reader


def _refuse_split(reader: gguf.GGUFReader, path: Path) -> None:
    """A part of a split GGUF (``model-00001-of-00003.gguf``) holds only some of the model's tensors:
    read alone it gave a model short of the others, without a word."""
    import gguf

    field = reader.fields.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT)
    count = field.contents() if field is not None and len(field.types) == 1 else None
    if isinstance(count, int) and count > 1:
        raise InputError(f"{path}: one part of a GGUF split into {count} files ({gguf.Keys.Split.LLM_KV_SPLIT_COUNT}); "
                         f"qstrat reads whole files: merge the parts first (llama.cpp's llama-gguf-split --merge {path} merged.gguf)")


def _check_contents(reader: gguf.GGUFReader, path: Path) -> None:
    """What gguf-py parses without a word and its users then trip over: strings that are not UTF-8
    (gguf-py decodes them only when asked), tensors with a dimension of 0."""
    import gguf

    for key, field in reader.fields.items():
        if gguf.GGUFValueType.STRING not in field.types:
            continue
        for index in field.data:
            try:
                bytes(field.parts[index]).decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"{path}: metadata {key!r} holds a string that is not UTF-8") from None
    for tensor in reader.tensors:
        if not all(int(d) > 0 for d in tensor.shape):
            raise FormatError(f"{path}: tensor {tensor.name!r} has shape {tensor.shape.tolist()} (a dimension of 0)")
    _check_layout(reader, path)


def _check_layout(reader: gguf.GGUFReader, path: Path) -> None:
    """Every tensor's data aligned, inside the file and apart from the others' (as ggml's loader requires):
    gguf-py maps whatever offsets a file gives, wrapping past 2**64, so a bad one read other bytes silently."""
    size = path.stat().st_size
    spans = []
    for tensor in reader.tensors:
        offset = int(tensor.field.parts[-1][0])  # relative to the data section, as written (not wrapped)
        start = int(reader.data_offset) + offset
        if offset % reader.alignment:
            raise FormatError(f"{path}: tensor {tensor.name!r} starts at offset {offset}, not a multiple of the alignment {reader.alignment}")
        if start + int(tensor.n_bytes) > size:
            raise FormatError(f"{path}: tensor {tensor.name!r} ends past the end of the file (truncated GGUF file?)")
        spans.append((start, start + int(tensor.n_bytes), tensor.name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise FormatError(f"{path}: the data of tensors {name!r} and {other!r} overlap")
