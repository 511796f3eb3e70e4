"""``.qblk`` files: one tensor of any GGUF block type qstrat reads other than Q8K, as rows of blocks.

A 24-byte header of six little-endian u32 — magic 0x4B4C4251 (bytes "QBLK"), version 1, the
GGML type (``gguf.GGMLQuantizationType`` value), rows, k (values per row), bytes per row — then
rows x bytes-per-row bytes, each row exactly as GGUF stores it, and nothing else.  A run writes
them as it quantizes (so that a rerun can keep them) and assembles its GGUF container from them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qstrat.errors import FormatError, InputError
from qstrat.io.atomic import atomic_writer
from qstrat.io.q8k import U32_MAX, WrittenFile, payload_equals

QBLK_MAGIC = 0x4B4C4251
QBLK_VERSION = 1
QBLK_HEADER = struct.Struct("<6I")
SUFFIX = ".qblk"


@dataclass(frozen=True)
class BlockTensor:
    """A matrix of one block type as stored: (rows, row bytes) uint8."""

    type_name: str  # the registry's name, e.g. "q4_k"
    rows: int
    k: int
    blocks: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.k)

    def dequantize(self) -> np.ndarray:
        """float32 (rows, k), in the stored (possibly permuted) column order."""
        from qstrat.formats import dequantize

        return dequantize(self.blocks, self.type_name)


def _type(type_name: str):
    # a type qstrat only decodes (IQ2_XXS, ...) comes from a GGUF that `qstrat convert` unpacked
    from qstrat.formats import readable_type  # the registry loads the kernels: only when a file is used

    return readable_type(type_name)


def write_blocks(path: str | os.PathLike, blocks: np.ndarray, type_name: str, k: int, *, durable: bool = True) -> WrittenFile:
    """Write ``blocks`` (rows, row bytes) of type ``type_name`` as a .qblk file, atomically."""
    path = Path(path)
    entry = _type(type_name)
    rows = blocks.shape[0]
    if k <= 0 or k % entry.block_size or k > U32_MAX or rows > U32_MAX or blocks.dtype != np.uint8 or blocks.shape != (rows, entry.row_bytes(k)):
        raise InputError(f"{path}: blocks of shape {blocks.shape} do not hold {entry.name} rows of {k} values")
    with atomic_writer(path, durable) as out:
        out.write(QBLK_HEADER.pack(QBLK_MAGIC, QBLK_VERSION, int(entry.ggml_type), rows, k, entry.row_bytes(k)))
        out.write(np.ascontiguousarray(blocks))
    return WrittenFile(path.name, out.size, out.sha256)


def read_blocks_header(path: str | os.PathLike) -> tuple[str, int, int]:
    """Validate a .qblk file's header and size; return its (type name, rows, k)."""
    import gguf

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(QBLK_HEADER.size)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None
    if len(head) < QBLK_HEADER.size:
        raise FormatError(f"{path}: {size} bytes, shorter than the {QBLK_HEADER.size}-byte .qblk header")
    magic, version, ggml_type, rows, k, row_bytes = QBLK_HEADER.unpack(head)
    if magic != QBLK_MAGIC:
        raise FormatError(f"{path}: not a .qblk file (magic 0x{magic:08X}, expected 0x{QBLK_MAGIC:08X})")
    if version != QBLK_VERSION:
        raise FormatError(f"{path}: unsupported .qblk version {version} (expected {QBLK_VERSION})")
    try:
        entry = _type(gguf.GGMLQuantizationType(ggml_type))
    except (ValueError, InputError):
        raise FormatError(f"{path}: GGML type {ggml_type} is not one qstrat reads") from None
    if k == 0 or k % entry.block_size or row_bytes != entry.row_bytes(k):
        raise FormatError(f"{path}: k = {k} and {row_bytes} bytes per row do not agree for {entry.name}")
    if size != QBLK_HEADER.size + rows * row_bytes:
        raise FormatError(f"{path}: {size} bytes, but a {rows} x {k} {entry.name} matrix takes {QBLK_HEADER.size + rows * row_bytes}")
    return entry.name, rows, k


def read_blocks(path: str | os.PathLike) -> BlockTensor:
    """Read and validate a .qblk file; the blocks are memory-mapped, not copied."""
    type_name, rows, k = read_blocks_header(path)
    row_bytes = _type(type_name).row_bytes(k)
    blocks = np.memmap(path, dtype=np.uint8, mode="r", offset=QBLK_HEADER.size, shape=(rows, row_bytes)) if rows else np.zeros((0, row_bytes), np.uint8)
    return BlockTensor(type_name, rows, k, blocks)


def blocks_file_holds(path: str | os.PathLike, blocks: np.ndarray) -> bool:
    """Whether the .qblk file at ``path`` (header validated) stores exactly ``blocks``."""
    type_name, rows, k = read_blocks_header(path)
    return blocks.shape == (rows, _type(type_name).row_bytes(k)) and payload_equals(path, QBLK_HEADER.size, blocks)
