"""A seeded local search over column orders, judged by the target types' actual error.

Candidate orders (identity, by norm, ...) are a start; swaps of columns between blocks then
lower the error of every matrix that reads those columns, measured by quantizing a seeded
sample of their rows in their own block types (with their importance vectors, through the
registry's kernels) after each swap.  Swaps first take away any excess over identity's error of
a matrix the start makes worse, then lower the sum of the errors relative to identity's.  The excess
is taken away by one of two kinds of moves (``repair``): swaps with a neighbouring block only, which
in a sorted order re-deal blocks without moving magnitudes (right where a sort leaves a matrix a
little worse by chance), or the search's ordinary moves (right where the start is far worse for
some matrix, as importance-weighted orders can be).  From
identity, which no matrix finds worse, that rule kept almost no swap at Q4_K (nearly every swap
leaves some matrix a little worse), so there the first half of the budget lowers the sum alone,
and the second half then takes away any excess this left.  The result is judged on every row
afterwards, and kept only if no matrix is worse than under identity.  head_order's search
swaps whole heads instead (of one key/value group, or whole groups), so that heads stay whole,
then two value channels of one group, in every head of that group at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from qstrat.interrupts import raise_if_stop_requested


#: rows per matrix the search quantizes after each swap (a seeded sample; whole matrices are judged after)
DEFAULT_SAMPLE_ROWS = 256
#: the moves that take away a matrix's excess over identity's error (see search_order)
REPAIRS = ("neighbour", "mixed")
#: relative difference of two errors below which they count as the same: the same blocks in another
#: order measure up to ~1e-7 apart (Q8K's kernel sums float32 squares in vector lanes), and a
#: permutation for nothing must not be written
SAME_ERROR = 1e-6
#: values of the sampled rows measured at a time (64 MB of float32): bounds the temporaries
_CHUNK_VALUES = 16 << 20


def check_integer_option(strategy: str, key: str, value: object, least: int) -> None:
    """A ConfigError unless a strategy's option ``key`` is an integer (not a bool) >= ``least``."""
    from qstrat.errors import ConfigError

    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"strategy {strategy}: {key} must be an integer >= {least}, not {value!r}")


@dataclass(frozen=True)
class SearchSettings:
    """How long and on what a search runs: ``budget`` swaps tried (0: no search), ``seed``, rows sampled per matrix."""

    budget: int = 0
    seed: int = 0
    sample_rows: int = DEFAULT_SAMPLE_ROWS

    @classmethod
    def checked(cls, strategy: str, budget: object, seed: object, sample_rows: object) -> SearchSettings:
        for key, value, least in (("budget", budget, 0), ("seed", seed, 0), ("sample_rows", sample_rows, 1)):
            check_integer_option(strategy, key, value, least)
        return cls(budget, seed, sample_rows)

    def describe(self) -> dict[str, int]:
        return {"budget": self.budget, "seed": self.seed, "sample_rows": self.sample_rows}


def scale_group(type_names: Iterable[str]) -> int:
    """Columns that share a scale in every one of these block types: 32 (a legacy block; K-quants
    scale sub-blocks of 16 or 32 inside their 256), or 256 when all are Q8K (one scale per block).
    A swap inside such a group changes no error, so the search swaps between groups."""
    from qstrat.formats import block_type

    names = list(type_names)
    if names and all(n == "q8_k" for n in names):
        return block_type("q8_k").block_size
    return min(32, max((block_type(n).block_size for n in names), default=32))


def relative_total(errors: Mapping[str, float], identity: Mapping[str, float]) -> float:
    """Sum over matrices of error / identity's error (a matrix quantized exactly counts 1)."""
    return sum(1.0 if identity[n] == 0 else errors[n] / identity[n] for n in errors)


def excess(errors: Mapping[str, float], identity: Mapping[str, float]) -> float:
    """How far matrices are worse than under identity: the sum of their relative excess errors."""
    return sum(0.0 if identity[n] == 0 else max(0.0, errors[n] / identity[n] - 1.0) for n in errors)


def rank(errors: Mapping[str, float], identity: Mapping[str, float], free: bool) -> tuple[float, float]:
    """What a search lowers (compared as a tuple): the relative total alone while ``free``, else
    first the excess over identity, then the relative total."""
    return (0.0 if free else excess(errors, identity), relative_total(errors, identity))


@dataclass(frozen=True)
class Reader:
    """A matrix whose columns a search orders: its kernel storage, block type and importance vector.

    ``source`` is the storage (mapped: the page cache holds it), or a function that makes it afresh
    on each use: a GGUF input's block types decode to new float32 arrays, and holding every reader's
    at once would take four bytes per weight of the whole model."""

    source: np.ndarray | Callable[[], np.ndarray]
    type_name: str
    importance: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        return self.source() if callable(self.source) else self.source


@dataclass
class _Batch:
    """Sampled rows (float32, source column order) of the matrices that one quantizer call serves,
    and each row's error per block under the order committed last."""

    entry: object  # qstrat.formats.BlockType
    importance: np.ndarray | None
    spans: list[tuple[str, int, int]]  # (matrix, first row, rows)
    rows: np.ndarray
    block_errors: np.ndarray | None = None

    def errors_of(self, order: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """(rows, len(blocks)) squared errors of those blocks of ``order``, a chunk of rows at a
        time: a whole order's temporaries (the gathered rows, their quantized and dequantized
        values, the squares) were four times the rows held, gigabytes once readers are measured
        on all their rows.  Each row is quantized on its own, so the chunks change no value."""
        size = self.entry.block_size
        columns = order.reshape(-1, size)[blocks].reshape(-1)
        weights = None if self.importance is None else np.take(self.importance, columns)
        errors = np.empty((self.rows.shape[0], blocks.size), dtype=np.float64)
        step = max(1, _CHUNK_VALUES // max(columns.size, 1))
        for first in range(0, self.rows.shape[0], step):
            x = np.take(self.rows[first : first + step], columns, axis=1)  # 7x faster than rows[:, columns] here
            stored = self.entry.quantize_rows(x, weights if self.entry.uses_imatrix else None)
            squares = self.entry.dequantize_rows(stored, x.shape[1])
            squares -= x
            squares *= squares
            if weights is not None:
                squares *= weights
            errors[first : first + x.shape[0]] = squares.reshape(x.shape[0], blocks.size, size).sum(axis=2, dtype=np.float64)
        return errors

    def totals(self, block_errors: np.ndarray) -> dict[str, float]:
        per_row = block_errors.sum(axis=1)
        return {name: float(per_row[first : first + count].sum()) for name, first, count in self.spans}


class SampledErrors:
    """Squared errors of seeded row samples (every row of the matrices in ``whole``) under a
    column order.  One quantizer call serves
    all the matrices of a block type without importance vectors (calls cost more than these
    small samples), and a swap re-quantizes only the blocks it touches in each."""

    def __init__(self, readers: Mapping[str, Reader], sample_rows: int, rng: np.random.Generator, whole: frozenset[str] = frozenset()) -> None:
        from qstrat.blocks import storage_to_float32
        from qstrat.formats import block_type

        self.batches: list[_Batch] = []
        grouped: dict[tuple[str, int], list[str]] = {}
        for name in sorted(readers):
            reader = readers[name]
            key = (reader.type_name, -1) if reader.importance is None else (reader.type_name, len(grouped))
            grouped.setdefault(key, []).append(name)
        for (type_name, _), names in sorted(grouped.items()):
            pieces, spans, first = [], [], 0
            for name in names:
                array = readers[name].array  # a GGUF input's decodes afresh: once
                count = array.shape[0] if name in whole else min(sample_rows, array.shape[0])
                picked = np.sort(rng.choice(array.shape[0], count, replace=False))
                spans.append((name, first, picked.size))
                first += picked.size
                pieces.append(storage_to_float32(np.ascontiguousarray(array[picked])))
                del array
            # each piece let go once copied (np.concatenate held every row twice at its end): pages
            # of the joined rows are only taken as they are written
            rows = np.empty((first, pieces[0].shape[1]), dtype=np.float32)
            for index, (_, start, count) in enumerate(spans):
                rows[start : start + count] = pieces[index]
                pieces[index] = None
            self.batches.append(_Batch(block_type(type_name), readers[names[0]].importance, spans, rows))
        self._pending: list[np.ndarray] = []

    def reset(self, order: np.ndarray) -> dict[str, float]:
        """Every matrix's error under ``order``, which becomes the committed one."""
        errors = {}
        for batch in self.batches:
            batch.block_errors = batch.errors_of(order, np.arange(order.size // batch.entry.block_size))
            errors.update(batch.totals(batch.block_errors))
        return errors

    def swapped(self, order: np.ndarray, positions: np.ndarray) -> dict[str, float]:
        """Every matrix's error under ``order``: the committed order with the columns at
        ``positions`` exchanged among themselves."""
        errors = {}
        self._pending = []
        for batch in self.batches:
            # every block touched is quantized again, even one holding both columns: a K-quant's
            # 256 columns have a scale per 16 or 32, so a swap inside it changes its error
            blocks = np.unique(np.asarray(positions) // batch.entry.block_size)
            trial = batch.block_errors.copy()
            trial[:, blocks] = batch.errors_of(order, blocks)
            self._pending.append(trial)
            errors.update(batch.totals(trial))
        return errors

    def commit(self) -> None:
        """Make the order of the last ``swapped`` call the committed one."""
        for batch, trial in zip(self.batches, self._pending):
            batch.block_errors = trial


def search_order(
    readers: Mapping[str, Reader],
    start: np.ndarray,
    scores: np.ndarray,
    block: int,
    settings: SearchSettings,
    sampled: SampledErrors | None = None,
    repair: str = "neighbour",
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """From the column order ``start``, ``settings.budget`` proposed swaps between blocks of
    ``block`` columns, half of them moving one of the highest-``scores`` columns into the
    block of the highest one (in place of one of its other columns), half between random
    positions, measured on ``sampled`` (made here if not given).  A swap is kept when it lowers
    ``rank``: the excess over identity's error of the matrices worse than under identity, or, with
    no more excess, the error relative to identity's summed over the matrices; from identity, in
    the first half of the budget, that sum alone.  ``repair`` "neighbour" makes a fourth of the
    moves swaps with a neighbouring block instead of random ones, and only those while there is
    excess; "mixed" makes only the moves above.
    Returns the order reached and the swaps kept (position pairs, in order)."""
    if repair not in REPAIRS:
        raise ValueError(f"repair must be one of {REPAIRS}, not {repair!r}")
    width = start.size
    if settings.budget == 0 or width // block < 2:
        return start, []
    rng = np.random.default_rng(settings.seed)
    sampled = sampled or SampledErrors(readers, settings.sample_rows, rng)
    identity = sampled.reset(np.arange(width))
    order = np.array(start, dtype=np.int64)
    position = np.empty(width, dtype=np.int64)
    position[order] = np.arange(width)
    committed = sampled.reset(order)
    free_swaps = settings.budget // 2 if np.array_equal(order, np.arange(width)) else 0
    current = rank(committed, identity, free_swaps > 0)
    scores = np.asarray(scores, dtype=np.float64)
    ranked = np.argsort(-scores, kind="stable")
    top = ranked[: min(width, block)]
    leading = np.zeros(width, dtype=bool)
    leading[top] = True
    kept: list[tuple[int, int]] = []
    for step in range(settings.budget):
        raise_if_stop_requested()  # a run in one process acts on SIGTERM only where it checks
        if step == free_swaps:
            current = rank(committed, identity, False)
        move = rng.random()
        if current[0] > 0 and repair == "neighbour":
            move = 1.0  # some matrix is worse than under identity: re-deal blocks (below) until none is
        if move < 0.5:
            # gather: one of the leading columns into the block of the leading column (or of the
            # second, for the leading one itself), in place of one of its ordinary columns
            column = top[rng.integers(top.size)]
            a = position[column]
            target = position[ranked[1] if column == ranked[0] else ranked[0]] // block
            ordinary = np.flatnonzero(~leading[order[target * block : (target + 1) * block]])
            if a // block == target or not ordinary.size:
                continue
            b = target * block + int(ordinary[rng.integers(ordinary.size)])
        elif move < (0.75 if repair == "neighbour" else 1.0):
            a, b = int(rng.integers(width)), int(rng.integers(width))
        else:
            # with a neighbouring block: in an order by magnitude it holds columns of about the
            # same scale, so the matrices that share the stream's scales stay almost as they are,
            # while those that do not (which a sort leaves a little worse or better, by chance)
            # get their blocks re-dealt (from a sorted start, these alone took the excess of
            # 7B-shaped embeddings away in about 200 swaps; the mixed moves needed 400 to 800)
            a = int(rng.integers(width))
            b = a + block if a + block < width and (a < block or rng.random() < 0.5) else a - block
        if not 0 <= b < width or a // block == b // block:
            continue
        order[[a, b]] = order[[b, a]]
        errors = sampled.swapped(order, np.array([a, b]))
        value = rank(errors, identity, step < free_swaps)
        if value < current:
            current, committed = value, errors
            sampled.commit()
            position[order[a]], position[order[b]] = a, b
            kept.append((a, b))
        else:
            order[[a, b]] = order[[b, a]]
    return order, kept


def expand_heads(head_order: np.ndarray, head_dim: int, channels: np.ndarray | None = None, per_group: int = 1) -> np.ndarray:
    """The column order that puts whole heads (``head_dim`` columns each) in ``head_order``, the
    columns inside each head in its key/value group's order (``channels[head // per_group]``: one
    row of ``head_dim`` positions per group; None keeps every head's own order)."""
    heads = np.asarray(head_order, dtype=np.int64)
    inside = np.arange(head_dim)[None, :] if channels is None else np.asarray(channels, dtype=np.int64)[heads // per_group]
    return (heads[:, None] * head_dim + inside).reshape(-1)


def split_heads(order: np.ndarray, head_dim: int, per_group: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of ``expand_heads``: the query-head order and each key/value group's channel order."""
    grid = np.asarray(order, dtype=np.int64).reshape(-1, head_dim)
    heads = grid[:, 0] // head_dim
    channels = np.empty((heads.size // per_group, head_dim), dtype=np.int64)
    channels[heads // per_group] = grid - heads[:, None] * head_dim
    if not np.array_equal(expand_heads(heads, head_dim, channels, per_group), order):
        raise ValueError("not an order of whole heads whose groups share one channel order")
    return heads, channels


def _one_reader_start(reader: Reader, settings: SearchSettings, start_columns: np.ndarray):
    """Where a search of one matrix's column order starts: its seeded generator (the row sample
    drawn from it first), that sample, identity's and the start's errors on it, and the swaps of
    the budget that lower the error alone (half of it from identity, else none; see search_order)."""
    width = start_columns.size
    rng = np.random.default_rng(settings.seed)
    sampled = SampledErrors({"reader": reader}, settings.sample_rows, rng)
    identity = sampled.reset(np.arange(width))
    committed = sampled.reset(start_columns)
    free_swaps = settings.budget // 2 if np.array_equal(start_columns, np.arange(width)) else 0
    return rng, sampled, identity, committed, free_swaps


def search_head_order(
    reader: Reader,
    start: np.ndarray,
    kv_heads: int,
    head_dim: int,
    settings: SearchSettings,
    channels: np.ndarray | None = None,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """From the query-head order ``start`` (the heads of each key/value group side by side, as
    head_order builds every order; inside each head its group's ``channels``, as ``expand_heads``
    takes them), ``settings.budget`` proposed swaps that keep it so: of two
    heads of one group, or of two whole groups, measured on a seeded sample of ``reader``'s rows
    in its block type.  A swap is kept under the rule of search_order (less excess over
    identity's error, then less error; from identity, first half: less error).  Only a swap that moves values between blocks can
    change the error (a K-quant's 256 columns hold several heads of 64, Q8_0's 32 never hold
    two: then nothing is searched); swaps that cannot (inside one block, or of whole blocks,
    as groups that each fill whole blocks) are skipped.
    Returns the head order reached and the swaps kept (head positions)."""
    from qstrat.formats import block_type

    heads = start.size
    per_group = heads // kv_heads
    width = heads * head_dim
    block = block_type(reader.type_name).block_size
    order = np.array(start, dtype=np.int64)
    if settings.budget == 0 or head_dim % block == 0 or width // block < 2:
        return order, []
    rng, sampled, identity, committed, free_swaps = _one_reader_start(reader, settings, expand_heads(order, head_dim, channels, per_group))
    current = rank(committed, identity, free_swaps > 0)
    kept: list[tuple[int, int]] = []
    for step in range(settings.budget):
        raise_if_stop_requested()  # a run in one process acts on SIGTERM only where it checks
        if step == free_swaps:
            current = rank(committed, identity, False)
        if per_group > 1 and (kv_heads == 1 or rng.random() < 0.5):
            group = int(rng.integers(kv_heads))
            a, b = (group * per_group + rng.choice(per_group, 2, replace=False)).tolist()
            moved_a, moved_b = np.array([a]), np.array([b])
        elif kv_heads > 1:
            g, h = rng.choice(kv_heads, 2, replace=False).tolist()
            a, b = g * per_group, h * per_group
            moved_a, moved_b = np.arange(a, a + per_group), np.arange(b, b + per_group)
        else:
            break  # one head: nothing to move
        span = moved_a.size * head_dim
        if span % block == 0 and (a * head_dim) % block == 0 and (b * head_dim) % block == 0:
            continue  # whole blocks change places: the same error
        slots = np.concatenate([moved_a, moved_b])
        positions = expand_heads(slots, head_dim)
        if np.unique(positions // block).size == 1:
            continue  # both inside one block: the same error
        trial = order.copy()
        trial[moved_a], trial[moved_b] = order[moved_b], order[moved_a]
        errors = sampled.swapped(expand_heads(trial, head_dim, channels, per_group), positions)
        value = rank(errors, identity, step < free_swaps)
        if value < current:
            current, order, committed = value, trial, errors
            sampled.commit()
            kept.append((a, b))
    return order, kept


def channels_matter(heads: int, head_dim: int, type_name: str) -> bool:
    """Whether moving value channels inside heads can change a matrix's error in ``type_name``: only
    when some head spans more than one run of values that share a scale (a head of 32 fills one Q8_0
    block, and any order inside it has the same error; Q2_K, Q3_K and Q6_K scale runs of 16)."""
    from qstrat.formats import block_type

    starts = np.arange(heads) * head_dim
    group_size = scale_group([type_name])
    if block_type(type_name).block_size == 256 and type_name != "q8_k":
        group_size = 16  # the K-quants' shortest scale run
    return bool(np.any(starts // group_size != (starts + head_dim - 1) // group_size))


def search_value_channels(
    reader: Reader,
    heads: np.ndarray,
    channels: np.ndarray,
    head_dim: int,
    scores: np.ndarray,
    settings: SearchSettings,
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """From the channel orders ``channels`` (a row of ``head_dim`` positions per key/value group),
    with the query heads in the order ``heads``, ``settings.budget`` proposed swaps of two channels
    of one group, in every head of that group at once (the value projection's rows move once for
    all of them), measured on a seeded sample of ``reader``'s rows in its block type: half of them
    move one of the group's highest-``scores`` channels (``scores``: per group and channel) into
    the block of its highest one, half are random.  Kept under the rule of search_order.  A swap
    whose two channels share a scale group in every head changes no error and is skipped (a head
    that fits in one such group, as Q8_0's 32 columns hold a head of 32, has nothing to search).
    Returns the channel orders reached and the swaps kept (group, position, position)."""
    kv_heads = channels.shape[0]
    per_group = heads.size // kv_heads
    group_size = scale_group([reader.type_name])
    channels = np.array(channels, dtype=np.int64)
    if settings.budget == 0 or not channels_matter(heads.size, head_dim, reader.type_name):
        return channels, []
    starts = np.arange(heads.size) * head_dim
    slots_of = [np.flatnonzero(heads // per_group == g) for g in range(kv_heads)]
    rng, sampled, identity, committed, free_swaps = _one_reader_start(reader, settings, expand_heads(heads, head_dim, channels, per_group))
    current = rank(committed, identity, free_swaps > 0)
    ranked = np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")
    leading = min(head_dim, group_size)
    kept: list[tuple[int, int, int]] = []
    for step in range(settings.budget):
        raise_if_stop_requested()  # a run in one process acts on SIGTERM only where it checks
        if step == free_swaps:
            current = rank(committed, identity, False)
        group = int(rng.integers(kv_heads))
        where = np.empty(head_dim, dtype=np.int64)
        where[channels[group]] = np.arange(head_dim)  # position of each channel in the group's order
        if rng.random() < 0.5:
            # gather: one of the group's leading channels next to its highest one, in place of an ordinary one
            top = ranked[group, :leading]
            a = int(where[top[rng.integers(top.size)]])
            target = where[ranked[group, 1] if channels[group, a] == ranked[group, 0] else ranked[group, 0]] // group_size
            span = np.arange(target * group_size, min(head_dim, (target + 1) * group_size))
            ordinary = span[~np.isin(channels[group, span], top)]
            if not ordinary.size:
                continue
            b = int(ordinary[rng.integers(ordinary.size)])
        else:
            a, b = (int(v) for v in rng.choice(head_dim, 2, replace=False))
        positions = np.concatenate([starts[slots_of[group]] + a, starts[slots_of[group]] + b])
        half = positions.size // 2
        if np.array_equal(positions[:half] // group_size, positions[half:] // group_size):
            continue  # in every head both channels share a scale group: the same error
        trial = channels.copy()
        trial[group, [a, b]] = channels[group, [b, a]]
        errors = sampled.swapped(expand_heads(heads, head_dim, trial, per_group), positions)
        value = rank(errors, identity, step < free_swaps)
        if value < current:
            current, channels, committed = value, trial, errors
            sampled.commit()
            kept.append((group, a, b))
    return channels, kept
