"""The ``.q8k`` and ``.perm`` files of the original quantize-strategy tool, byte for byte.

``.q8k``: a 24-byte header of six little-endian u32 — magic 0x4B513838 (bytes "88QK"),
version 1, rows, k, blocks_per_row (= k / 256), dtype tag 0x18 — then rows * blocks_per_row
Q8K blocks of 292 bytes in row-major order, and nothing else.

``.perm``: u32 magic 0x4D524550 ("PERM"), u32 count (= k), then count u32 indices; a gather
map: stored column j holds original column perm[j], so a consumer computes W_q @ x[perm].
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qstrat.blocks import dequantize_blocks
from qstrat.errors import FormatError, InputError
from qstrat.io.atomic import atomic_writer
from qstrat.kernels import BLOCK_BYTES, QK_K

Q8K_MAGIC = 0x4B513838
Q8K_VERSION = 1
Q8K_DTYPE_TAG = 0x18
Q8K_HEADER = struct.Struct("<6I")

PERM_MAGIC = 0x4D524550
PERM_HEADER = struct.Struct("<2I")
PERM_INDEX_DTYPE = np.dtype("<u4")
U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class Q8KTensor:
    """A quantized matrix as stored: (rows * k/256, 292) uint8 blocks, row-major."""

    rows: int
    k: int
    blocks: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.k)

    def dequantize(self) -> np.ndarray:
        """float32 (rows, k), in the stored (possibly permuted) column order."""
        return dequantize_blocks(self.blocks).reshape(self.rows, self.k)


@dataclass(frozen=True)
class WrittenFile:
    """What the manifest records of one output file."""

    path: str
    size: int
    sha256: str


def q8k_file_size(rows: int, k: int) -> int:
    """Bytes of the .q8k file of a rows x k matrix."""
    return Q8K_HEADER.size + rows * (k // QK_K) * BLOCK_BYTES


def perm_file_size(k: int) -> int:
    """Bytes of the .perm file of a permutation of k columns."""
    return PERM_HEADER.size + k * PERM_INDEX_DTYPE.itemsize


def q8k_header(rows: int, k: int) -> bytes:
    if k % QK_K or k <= 0 or rows < 0 or rows > U32_MAX or k > U32_MAX:
        raise InputError(f"cannot store a {rows} x {k} matrix as Q8K (k must be a positive multiple of {QK_K})")
    return Q8K_HEADER.pack(Q8K_MAGIC, Q8K_VERSION, rows, k, k // QK_K, Q8K_DTYPE_TAG)


def write_q8k(path: str | os.PathLike, blocks: np.ndarray, rows: int, k: int, *, durable: bool = True) -> WrittenFile:
    """Write ``blocks`` of a rows x k matrix as a .q8k file, atomically (see ``atomic_writer`` for ``durable``)."""
    path = Path(path)
    header = q8k_header(rows, k)
    if blocks.shape != (rows * (k // QK_K), BLOCK_BYTES) or blocks.dtype != np.uint8:
        raise InputError(f"{path}: blocks of shape {blocks.shape} do not fit a {rows} x {k} matrix")
    with atomic_writer(path, durable) as out:
        out.write(header)
        out.write(np.ascontiguousarray(blocks))
    return WrittenFile(path.name, out.size, out.sha256)


def _read_exact(path: Path) -> tuple[bytes, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            return f.read(Q8K_HEADER.size), size
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None


def read_q8k_shape(path: str | os.PathLike) -> tuple[int, int]:
    """Validate a .q8k file's header and size; return its (rows, k)."""
    path = Path(path)
    head, size = _read_exact(path)
    if len(head) < Q8K_HEADER.size:
        raise FormatError(f"{path}: {size} bytes, shorter than the {Q8K_HEADER.size}-byte .q8k header")
    magic, version, rows, k, blocks_per_row, dtype_tag = Q8K_HEADER.unpack(head)
    if magic != Q8K_MAGIC:
        raise FormatError(f"{path}: not a .q8k file (magic 0x{magic:08X}, expected 0x{Q8K_MAGIC:08X})")
    if version != Q8K_VERSION:
        raise FormatError(f"{path}: unsupported .q8k version {version} (expected {Q8K_VERSION})")
    if dtype_tag != Q8K_DTYPE_TAG:
        raise FormatError(f"{path}: dtype tag 0x{dtype_tag:X} is not Q8K (0x{Q8K_DTYPE_TAG:X})")
    if k == 0 or k % QK_K or blocks_per_row != k // QK_K:
        raise FormatError(f"{path}: k = {k} and blocks_per_row = {blocks_per_row} do not agree (k/256)")
    expected = q8k_file_size(rows, k)
    if size != expected:
        raise FormatError(f"{path}: {size} bytes, but a {rows} x {k} Q8K matrix takes {expected}")
    return rows, k


def read_q8k(path: str | os.PathLike) -> Q8KTensor:
    """Read and validate a .q8k file; the blocks are memory-mapped, not copied."""
    rows, k = read_q8k_shape(path)
    blocks_per_row = k // QK_K
    blocks = np.memmap(path, dtype=np.uint8, mode="r", offset=Q8K_HEADER.size, shape=(rows * blocks_per_row, BLOCK_BYTES)) if rows else np.zeros((0, BLOCK_BYTES), np.uint8)
    return Q8KTensor(rows, k, blocks)


_COMPARE_CHUNK = 1 << 20


def payload_equals(path: str | os.PathLike, offset: int, expected: np.ndarray) -> bool:
    """Whether the bytes of ``path`` from ``offset`` to its end are exactly ``expected``.

    Read in small chunks into one buffer and compared chunk by chunk: mapping a file that was
    just written costs more than reading it.
    """
    expected = np.ascontiguousarray(expected).reshape(-1).view(np.uint8)
    path = Path(path)
    # both buffers are reused for every chunk: fresh temporaries would cost a page fault per page
    chunk = np.empty(max(1, min(_COMPARE_CHUNK, expected.size)), dtype=np.uint8)
    differs = np.empty(chunk.size, dtype=bool)
    try:
        if path.stat().st_size != offset + expected.size:
            return False
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            for start in range(0, expected.size, chunk.size):
                wanted = min(chunk.size, expected.size - start)
                if f.readinto(memoryview(chunk)[:wanted]) != wanted:
                    return False
                if np.not_equal(chunk[:wanted], expected[start : start + wanted], out=differs[:wanted]).any():
                    return False
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None
    return True


def q8k_file_holds(path: str | os.PathLike, blocks: np.ndarray) -> bool:
    """Whether the .q8k file at ``path`` (header validated) stores exactly ``blocks``."""
    rows, k = read_q8k_shape(path)
    if (rows * (k // QK_K), BLOCK_BYTES) != blocks.shape:
        return False
    return payload_equals(path, Q8K_HEADER.size, blocks)


def check_permutation(perm: np.ndarray, k: int, where: str) -> None:
    """Raise FormatError unless ``perm`` holds each of 0..k-1 exactly once."""
    if perm.shape != (k,):
        held = f"{perm.shape[0]} entries" if perm.ndim == 1 else f"shape {list(perm.shape)}"
        raise FormatError(f"{where}: permutation has {held}, expected {k} entries")
    if k and (perm.min() < 0 or perm.max() >= k or np.bincount(perm.astype(np.int64), minlength=k).max() != 1):
        raise FormatError(f"{where}: not a permutation of 0..{k - 1} (an index is repeated or out of range)")


def write_perm(path: str | os.PathLike, perm: np.ndarray, *, durable: bool = True) -> WrittenFile:
    """Write a gather map as a .perm file, atomically (validated first)."""
    path = Path(path)
    indices = np.asarray(perm)
    if indices.ndim != 1 or indices.size > U32_MAX:
        raise InputError(f"{path}: a permutation must be 1-D with at most 2**32-1 entries")
    if indices.size and indices.min() < 0:
        raise InputError(f"{path}: not a permutation (negative index)")
    indices = indices.astype(PERM_INDEX_DTYPE)
    check_permutation(indices, indices.size, str(path))
    with atomic_writer(path, durable) as out:
        out.write(PERM_HEADER.pack(PERM_MAGIC, indices.size))
        out.write(indices)
    return WrittenFile(path.name, out.size, out.sha256)


def read_perm(path: str | os.PathLike, k: int | None = None) -> np.ndarray:
    """Read and validate a .perm file; returns the gather map as int64 (k,)."""
    path = Path(path)
    head, size = _read_exact(path)
    if len(head) < PERM_HEADER.size:
        raise FormatError(f"{path}: {size} bytes, shorter than the {PERM_HEADER.size}-byte .perm header")
    magic, count = PERM_HEADER.unpack(head[: PERM_HEADER.size])
    if magic != PERM_MAGIC:
        raise FormatError(f"{path}: not a .perm file (magic 0x{magic:08X}, expected 0x{PERM_MAGIC:08X})")
    expected = perm_file_size(count)
    if size != expected:
        raise FormatError(f"{path}: {size} bytes, but {count} indices take {expected}")
    if k is not None and count != k:
        raise FormatError(f"{path}: permutation of {count} columns for a matrix with k = {k}")
    perm = np.fromfile(path, dtype=PERM_INDEX_DTYPE, offset=PERM_HEADER.size, count=count)
    check_permutation(perm, count, str(path))
    return perm.astype(np.int64)
