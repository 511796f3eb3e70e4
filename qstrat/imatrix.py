"""Importance matrices: the per-input-column mean of squared activations of each matrix product,
in llama.cpp's two file formats (tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp).

- **GGUF** (what ``llama-imatrix`` writes today): ``general.type = imatrix``, the string array
  ``imatrix.datasets``, ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32), and per matrix
  two F32 tensors: ``<name>.in_sum2`` (the raw sums of squares, one row per expert) and
  ``<name>.counts`` (the tokens summed, one per expert).
- **legacy .dat**: ``int32 n_entries``, then per entry ``int32 len, name, int32 ncall, int32 nval,
  float32[nval]`` holding ``sum / count * ncall``; then, optionally, ``int32 chunk_count,
  int32 len, dataset``.

:meth:`ImportanceMatrix.vector` gives a tensor's importance vector exactly as llama-quantize's
``load_imatrix`` makes it (float32 ``sum / count``; ``sum / ncall`` for legacy files; 1 for an
expert that saw no token): the vector ``ggml_quantize_chunk`` receives.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qstrat.errors import FormatError, InputError

GGUF_MAGIC = b"GGUF"
IN_SUM2, COUNTS = ".in_sum2", ".counts"
KEY_TYPE, KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"


@dataclass
class ImportanceEntry:
    """One matrix's statistics: sums of squared inputs per column (one row per expert) and the
    number of tokens summed per expert (legacy files: one ``ncall``)."""

    sums: np.ndarray  # float32 (n_mat, k)
    counts: np.ndarray  # int64 (n_mat,)


@dataclass
class ImportanceMatrix:
    """An importance matrix, as read from or written to a file."""

    entries: dict[str, ImportanceEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def vector(self, name: str) -> np.ndarray | None:
        """The importance vector of tensor ``name`` (float32, n_mat * k values), or None if the
        file has none for it."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        if self.legacy:
            ncall = int(entry.counts[0]) if entry.counts.size else 0
            values = entry.sums / np.float32(ncall) if ncall > 0 else entry.sums.copy()
        else:
            counts = entry.counts.astype(np.float32)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.where(counts > 0, entry.sums / np.where(counts > 0, counts, 1), np.float32(1))
        return np.ascontiguousarray(values, dtype=np.float32).reshape(-1)

    @property
    def tokens(self) -> int:
        """The most tokens any matrix saw (legacy files: 0, they do not say)."""
        if self.legacy:
            return 0
        return max((int(e.counts.max()) for e in self.entries.values() if e.counts.size), default=0)


def _check_entry(path: Path, name: str, sums: np.ndarray, counts: np.ndarray) -> None:
    if not np.all(np.isfinite(sums)) or np.any(sums < 0):
        raise FormatError(f"{path}: the importance data of {name!r} has negative or non-finite values")
    if counts.size == 0 or sums.size % counts.size:
        raise FormatError(f"{path}: {name!r} has {sums.size} values for {counts.size} matrices")


def read_imatrix(path: str | os.PathLike) -> ImportanceMatrix:
    """Read an importance matrix in llama.cpp's GGUF format or its legacy ``.dat`` format (told
    apart by the GGUF magic, as llama.cpp does)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such importance matrix file")
    with open(path, "rb") as stream:
        magic = stream.read(4)
    return _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)


def _read_gguf(path: Path) -> ImportanceMatrix:
    import gguf

    from qstrat.io.gguf_read import open_gguf

    reader = open_gguf(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    missing = [key for key in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if key not in fields]
    if missing:
        kind = fields.get(KEY_TYPE) or fields.get("general.architecture") or "?"
        raise FormatError(f"{path}: not an importance matrix (general.type {kind!r}; no {', '.join(missing)})")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        for suffix in (IN_SUM2, COUNTS):
            if tensor.name.endswith(suffix):
                if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise FormatError(f"{path}: {tensor.name} is {tensor.tensor_type.name}; importance data must be F32")
                pairs.setdefault(tensor.name[: -len(suffix)], {})[suffix] = np.asarray(tensor.data, dtype=np.float32)
    if not pairs:
        raise FormatError(f"{path}: an importance matrix without entries")
    entries = {}
    for name, pair in sorted(pairs.items()):
        if len(pair) != 2:
            raise FormatError(f"{path}: {name!r} has {'sums' if IN_SUM2 in pair else 'counts'} but not the other")
        counts = np.rint(pair[COUNTS].reshape(-1)).astype(np.int64)  # std::lround
        sums = pair[IN_SUM2].reshape(counts.size, -1) if counts.size and pair[IN_SUM2].size % counts.size == 0 else pair[IN_SUM2]
        _check_entry(path, name, sums, counts)
        entries[name] = ImportanceEntry(np.ascontiguousarray(sums), counts)
    datasets = fields[KEY_DATASETS]
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise FormatError(f"{path}: {KEY_DATASETS} is {datasets!r}, not an array of strings")
    counts = {}
    for key in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        value = fields[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FormatError(f"{path}: {key} is {value!r}, not a count")
        counts[key] = value
    return ImportanceMatrix(entries, datasets, counts[KEY_CHUNK_COUNT], counts[KEY_CHUNK_SIZE])


def _read_legacy(path: Path) -> ImportanceMatrix:
    data = path.read_bytes()
    position = 0

    def take(fmt: str, what: str) -> tuple:
        nonlocal position
        size = struct.calcsize(fmt)
        if position + size > len(data):
            raise FormatError(f"{path}: ends inside {what} (neither a GGUF nor a legacy .dat importance matrix)")
        values = struct.unpack_from(fmt, data, position)
        position += size
        return values

    (n_entries,) = take("<i", "the entry count")
    if n_entries < 1 or n_entries > len(data) // 12:
        raise FormatError(f"{path}: not an importance matrix (neither GGUF nor legacy .dat: {n_entries} entries)")
    entries = {}
    for index in range(n_entries):
        (length,) = take("<i", f"entry {index}")
        if length < 0 or length > 4096:
            raise FormatError(f"{path}: entry {index} has a name of {length} bytes")
        name = take(f"<{length}s", f"the name of entry {index}")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii", f"entry {name!r}")
        if nval < 1:
            raise FormatError(f"{path}: entry {name!r} has {nval} values")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=position).astype(np.float32) if position + 4 * nval <= len(data) else None
        if sums is None:
            raise FormatError(f"{path}: ends inside the values of {name!r}")
        position += 4 * nval
        counts = np.array([ncall], dtype=np.int64)
        _check_entry(path, name, sums, counts)
        entries[name] = ImportanceEntry(sums.reshape(1, -1), counts)
    chunk_count, datasets = 0, []
    if position < len(data):  # the trailer is optional
        (chunk_count,) = take("<i", "the chunk count")
        if position + 4 <= len(data):
            (length,) = take("<i", "the dataset name")
            if 0 < length <= len(data) - position:
                datasets.append(data[position : position + length].decode("utf-8", "replace"))
    return ImportanceMatrix(entries, datasets, chunk_count, 0, legacy=True)


def write_imatrix(path: str | os.PathLike, imatrix: ImportanceMatrix) -> None:
    """Write ``imatrix`` in llama.cpp's GGUF format (entries in name order, as llama-imatrix)."""
    import gguf

    from qstrat.io.atomic import atomic_path

    if imatrix.legacy:
        raise ValueError("a legacy importance matrix holds averages, not sums: it is not written as GGUF")
    with atomic_path(Path(path)) as temporary:
        writer = gguf.GGUFWriter(temporary, arch="")
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
        writer.add_string(KEY_TYPE, "imatrix")
        writer.add_array(KEY_DATASETS, list(imatrix.datasets))
        writer.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
        writer.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
        for name in sorted(imatrix.entries):
            entry = imatrix.entries[name]
            writer.add_tensor(name + IN_SUM2, np.ascontiguousarray(entry.sums, dtype=np.float32))
            writer.add_tensor(name + COUNTS, entry.counts.astype(np.float32).reshape(-1, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def accumulate(entries: dict[str, ImportanceEntry], name: str, inputs: np.ndarray) -> None:
    """Add the squared inputs of one matrix product (tokens x k) to ``entries[name]``, as
    llama-imatrix's ``collect_imatrix`` does for a dense matrix (one expert)."""
    x = np.asarray(inputs, dtype=np.float32)
    squares = np.einsum("ij,ij->j", x, x, dtype=np.float64)
    entry = entries.get(name)
    if entry is None:
        entry = entries[name] = ImportanceEntry(np.zeros((1, x.shape[1]), dtype=np.float64), np.zeros(1, dtype=np.int64))
    entry.sums[0] += squares
    entry.counts[0] += x.shape[0]


def finished(entries: dict[str, ImportanceEntry], datasets: Iterable[str], chunk_count: int, chunk_size: int) -> ImportanceMatrix:
    """An :class:`ImportanceMatrix` of accumulated entries (sums rounded to float32 once)."""
    return ImportanceMatrix(
        {name: ImportanceEntry(e.sums.astype(np.float32), e.counts.copy()) for name, e in entries.items()},
        list(datasets), chunk_count, chunk_size,
    )


#: llama-imatrix leaves out matrix products of fewer tokens ("why are small batches ignored")
MIN_BATCH_TOKENS = 16


def compute_imatrix(
    engine,
    text: bytes,
    ctx: int = 512,
    chunks: int | None = None,
    dataset: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> ImportanceMatrix:
    """The importance matrix of a model over ``text``, as ``llama-imatrix`` collects it: the text
    tokenized once (BOS only if the vocabulary adds it), ``min(chunks, tokens // ctx)`` chunks of
    ``ctx`` tokens, each evaluated from an empty context with its first token replaced by BOS when
    the vocabulary adds one, and every token's input to each ``blk.*`` matrix product summed.
    ``engine`` is a :class:`qstrat.llama_engine.NumpyModel` or a :class:`qstrat.bert.BertEngine`;
    ``dataset`` names the text."""
    from qstrat.evaluate import chunk_count, chunk_input

    if ctx < MIN_BATCH_TOKENS:
        raise InputError(f"--ctx {ctx}: at least {MIN_BATCH_TOKENS} (llama-imatrix ignores matrix products of fewer tokens)")
    tokens = engine.tokenize(text)
    n_chunks = chunk_count(len(tokens), ctx, chunks, dataset or "the text", tool="llama-imatrix")
    bos = engine.bos if engine.add_bos else None
    entries: dict[str, ImportanceEntry] = {}

    def collect(name: str, inputs: np.ndarray) -> None:
        accumulate(entries, name, inputs)

    if progress is not None:
        progress(0, n_chunks)
    for index in range(n_chunks):
        engine.collect(chunk_input(tokens, index, ctx, bos), collect)
        if progress is not None:
            progress(index + 1, n_chunks)
    return finished(entries, [dataset] if dataset else [], n_chunks, ctx)


__all__ = ["ImportanceEntry", "ImportanceMatrix", "accumulate", "compute_imatrix", "finished", "read_imatrix", "write_imatrix"]
