"""The work of groups in a worker process: read, permute, quantize, measure, write.

Workers receive only file paths and offsets (a plan entry), never tensor data: each reads
the input itself, into a buffer it reuses from group to group, and writes its own output
files.  What comes back is small: records, and the permutations of tensors that the main
process stores permuted (passthrough).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numba
import numpy as np
from qstrat.pipelines.plan import GroupJob, TensorChoice, TensorJob, in_its_type, writes_q8k

from qstrat.blocks import KERNEL_STORAGE, check_finite
from qstrat.errors import QstratError
from qstrat.io.names import storage_name
from qstrat.io.q8k import check_permutation, write_perm, write_q8k
from qstrat.io.qblock import SUFFIX as QBLK_SUFFIX, write_blocks
from qstrat.io.safetensors import TensorInfo, map_blocks, read_tensor, stacked_rows
from qstrat.matrix import QuantizedMatrix, TensorMetrics, quantize_matrix, quantize_matrix_as
from qstrat.results import TensorRecord
from qstrat.strategies import Permutation
from qstrat.strategies.search import Reader
from qstrat.validation import (
    ValidationSettings,
    check_roundtrip,
    matvec_mse,
    probe_vector,
)


@dataclass
class GroupResult:
    records: list[TensorRecord]
    #: joint permutations of every member (quantized or not), to record and to apply to passthrough
    joint: dict[str, Permutation] = field(default_factory=dict)


def _strategy_reads_values(job: GroupJob) -> bool:
    """Whether the group's strategy looks at the values (anything but identity does)."""
    return job.strategy.permutation_kind != "none"


def _gather_maps(
    job: GroupJob, name: str, permutation: Permutation | None, residual: Permutation | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A member's row and column gather maps: its group's permutation on one axis, the model's
    residual-stream permutation on the other."""
    maps: list[np.ndarray | None] = [None, None]
    for source in (permutation, residual):
        if source is None:
            continue
        if maps[source.axis] is not None:
            raise QstratError(f"strategy {job.strategy.name} permutes axis {source.axis} of tensor {name!r}, which residual_stream permutes")
        maps[source.axis] = source.perm
    return maps[0], maps[1]


def _checked(job: GroupJob, name: str, permutation: Permutation | None, shape: tuple[int, ...]) -> Permutation | None:
    if permutation is None:
        return None
    kind = job.strategy.permutation_kind
    if permutation.axis not in (0, 1) or permutation.axis >= len(shape) or (kind == "runtime" and permutation.axis != 1):
        raise QstratError(f"strategy {job.strategy.name} gave tensor {name!r} a permutation on an invalid axis")
    check_permutation(permutation.perm, shape[permutation.axis], f"strategy {job.strategy.name}, tensor {name!r}")
    return permutation


def _quantized(
    storage: np.ndarray,
    choice: TensorChoice,
    variant: str,
    row_perm: np.ndarray | None = None,
    col_perm: np.ndarray | None = None,
    **measuring,
) -> QuantizedMatrix:
    """A member in its block type: the original tool's Q8K in the run's variant, or a GGUF type."""
    if writes_q8k(choice):
        return quantize_matrix(storage, variant, row_perm, col_perm, **measuring)
    return quantize_matrix_as(storage, choice.type_name, row_perm, col_perm, **measuring)


def _copied_blocks(info: TensorInfo, choice: TensorChoice, row_perm: np.ndarray | None, col_perm: np.ndarray | None) -> np.ndarray | None:
    """The input's own blocks of a tensor in its type (``plan.in_its_type``), its rows in the order
    asked (each row's blocks stand alone); None when its columns move, which changes the blocks."""
    if col_perm is not None or not in_its_type(info, choice):
        return None
    blocks = map_blocks(info)
    return blocks if row_perm is None else np.take(blocks, row_perm, axis=0)


class ErrorMeasure:
    """How a strategy measures a member's error (a :data:`SquaredError`): in the type the member is
    written in, weighted by its importance vector when the run has an imatrix; ``reader`` gives
    what a search needs to measure it itself."""

    def __init__(self, jobs: Iterable[TensorJob], variant: str) -> None:
        self.members = {m.info.name: m for m in jobs}
        self.variant = variant

    def _choice(self, name: str) -> TensorChoice:
        member = self.members.get(name)
        return (member.choice if member else None) or TensorChoice("q8_k", None)  # not quantized: as the original tool

    def __call__(self, name: str, storage: np.ndarray, col_perm: np.ndarray | None) -> float:
        member = self.members.get(name)
        if col_perm is None and member is not None and member.choice is not None and in_its_type(member.info, member.choice) \
                and (member.residual is None or member.residual.axis == 0):
            return 0.0  # its columns in place, it is copied as the input stores it: no order can beat that
        importance = member.importance if member else None
        choice = self._choice(name)
        measure = True if writes_q8k(choice) else "error"  # Q8K's kernel measures in its single pass
        return _quantized(storage, choice, self.variant, col_perm=col_perm, tensor_name=name, importance=importance, measure=measure).chosen_error

    def reader(self, name: str, storage: np.ndarray) -> Reader:
        member = self.members.get(name)
        choice = self._choice(name)
        return Reader(storage, choice.type_name, member.importance if member else None)


def error_measure(jobs: Iterable[TensorJob], variant: str) -> ErrorMeasure:
    return ErrorMeasure(jobs, variant)


@dataclass
class _QuantizedMember:
    """A member computed in memory, waiting for its files."""

    stem: str
    record: TensorRecord  # files filled in by _write_member
    blocks: np.ndarray
    runtime_perm: np.ndarray | None


_ALIGNMENT = 64  # each member starts on a cache line of the group's buffer


def _read_members(job: GroupJob, buffer: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The members the group's work reads, in kernel storage, read into one buffer
    (``buffer[0]``, grown to the largest group so far; the caller keeps it for the next group)."""
    needed = [m for m in job.members if m.quantize or _strategy_reads_values(job)]
    offsets, total = [], 0
    for member in needed:
        offsets.append(total)
        total += -(-member.info.nbytes // _ALIGNMENT) * _ALIGNMENT
    if not buffer or buffer[0].nbytes < total:
        buffer[:] = [np.empty(total, dtype=np.uint8)]
    return {
        member.info.name: read_tensor(member.info, buffer[0][start:]).view(KERNEL_STORAGE[member.info.dtype])
        for member, start in zip(needed, offsets)
    }


def _quantize_members(
    job: GroupJob, variant: str, validation: ValidationSettings | None, buffer: list[np.ndarray]
) -> tuple[list[_QuantizedMember], dict[str, Permutation]]:
    """The arithmetic of one group: read, permutations, quantize and measure each quantized member."""
    started = time.perf_counter()
    arrays = _read_members(job, buffer)
    if _strategy_reads_values(job) and job.strategy.needs_finite_values:
        # otherwise the quantize kernel refuses a non-finite value itself, naming it
        for member in job.members:
            if member.quantize:
                check_finite(arrays[member.info.name], member.info.name)
    proposed = job.strategy.permutations(arrays, error_measure(job.members, variant))
    permutations = {m.info.name: _checked(job, m.info.name, proposed.get(m.info.name), m.info.shape) for m in job.members}
    quantized = [m for m in job.members if m.quantize]
    shared_seconds = (time.perf_counter() - started) / max(1, len(quantized))
    kind = job.strategy.permutation_kind
    stages = validation.stages if validation is not None else ()
    computed = []
    for member in quantized:
        begin = time.perf_counter()
        info = member.info
        permutation = permutations[info.name]
        row_perm, col_perm = _gather_maps(job, info.name, permutation, member.residual)
        probes = {stage: probe_vector(stage, info.shape[-1]) for stage in ("sum_test", "gradient_test") if stage in stages}
        copied = _copied_blocks(info, member.choice, row_perm, col_perm)
        outcome = _quantized(
            # a stack of matrices (MoE experts) as the rows of all of them, as GGUF stores it
            arrays[info.name].reshape(stacked_rows(info.shape), info.shape[-1]), member.choice, variant, row_perm, col_perm, tensor_name=info.name,
            measure="weight_error" in stages, probes=probes,
            # a copy uses no importance vector: no importance-weighted figure beside its imatrix field's None
            **({"given": copied} if copied is not None else {"importance": member.importance}),
        )
        metrics = outcome.metrics
        if probes:
            probe_mse = {
                f"{stage}_mse": matvec_mse(outcome.probe_products[stage], outcome.blocks, probe, validation.product, variant)
                for stage, probe in probes.items()
            }
            metrics = replace(metrics or TensorMetrics.empty(), **probe_mse)
        record = TensorRecord(
            name=info.name,
            shape=info.shape,
            dtype=info.dtype,
            source_type=info.encoding,
            storage=storage_name(member.choice.type_name),
            fallback_from=member.choice.fallback_from,
            imatrix=member.importance is not None if job.with_imatrix and copied is None else None,
            copied=copied is not None,
            strategy=job.strategy.name,
            permutation=kind if permutation is not None else ("joint" if member.residual is not None else "none"),
            joint_group=job.group_id if kind == "joint" and permutation is not None else None,
            joint_axis=permutation.axis if kind == "joint" and permutation is not None else None,
            residual_axis=member.residual.axis if member.residual is not None else None,
            permutation_gain_db=permutation.gain_db if permutation is not None and permutation.axis == 1 else None,
            files={},
            metrics=metrics,
            seconds=time.perf_counter() - begin + shared_seconds,
        )
        computed.append(_QuantizedMember(member.stem, record, outcome.blocks, col_perm if kind == "runtime" else None))
    joint = {name: p for name, p in permutations.items() if p is not None} if kind == "joint" else {}
    return computed, joint


def _write_member(member: _QuantizedMember, output_dir: Path, roundtrip: bool, durable: bool) -> TensorRecord:
    """Write one member's files; unless ``durable``, the run makes them durable all at once before
    its manifest (see qstrat.io.atomic)."""
    begin = time.perf_counter()
    rows, k = stacked_rows(member.record.shape), member.record.shape[-1]
    if member.record.storage == "q8k":
        files = {"q8k": write_q8k(output_dir / f"{member.stem}.q8k", member.blocks, rows, k, durable=durable)}
    else:
        files = {"blocks": write_blocks(output_dir / f"{member.stem}{QBLK_SUFFIX}", member.blocks, member.record.storage, k, durable=durable)}
    if member.runtime_perm is not None:
        files["perm"] = write_perm(output_dir / f"{member.stem}.perm", member.runtime_perm, durable=durable)
    if roundtrip:
        perm_path = output_dir / files["perm"].path if "perm" in files else None
        tensor_file = files.get("q8k") or files["blocks"]
        check_roundtrip(output_dir / tensor_file.path, member.blocks, perm_path, member.runtime_perm)
    return replace(member.record, files=files, seconds=member.record.seconds + time.perf_counter() - begin)


#: Files of at most this many members are being written (each on its own thread) while the
#: next ones are computed.  One writer thread was the bottleneck: its write, sha256 and
#: read-back ran one member after another while the kernels waited.
_WRITES_IN_FLIGHT = 2


def quantize_stream(
    jobs: Iterable[GroupJob],
    variant: str,
    validation: ValidationSettings | None,
    output_dir: Path | None,
    numba_threads: int,
    durable: bool = False,
) -> Iterator[GroupResult]:
    """Quantize the quantized members of each of ``jobs`` and write their files (unless
    ``output_dir`` is None: an in-memory evaluation); yield one result per job, in order, as
    soon as its files are written.

    Members' files are written on other threads while the next members are computed
    (kernels release the GIL), at most ``_WRITES_IN_FLIGHT`` at a time so that memory stays
    bounded; a job's result comes once every write of it has finished (a failed write raises
    here).  ``durable`` fsyncs each file here: for workers on other hosts, whose writes the main
    process cannot flush.  Closing the generator early waits for the writes under way.
    """
    # numba's thread count is per calling thread: a one-worker run computes in its caller's thread,
    # whose own setting comes back when the generator ends
    previous = numba.get_num_threads()
    numba.set_num_threads(numba_threads)
    try:
        roundtrip = validation is not None and "roundtrip" in validation.stages
        buffer: list[np.ndarray] = []  # the input of the group at hand; reused by the next
        pending: deque[tuple[list[TensorRecord | Future], dict[str, Permutation]]] = deque()

        def finished(records: list[TensorRecord | Future], joint: dict[str, Permutation]) -> GroupResult:
            return GroupResult([r.result() if isinstance(r, Future) else r for r in records], joint)

        with ThreadPoolExecutor(_WRITES_IN_FLIGHT, thread_name_prefix="qstrat-write") as writer:
            in_flight: deque[Future] = deque()
            for job in jobs:
                computed, joint = _quantize_members(job, variant, validation, buffer)
                records: list[TensorRecord | Future] = []
                while computed:
                    # handed over one by one, so that only the writer keeps a member's blocks alive
                    member = computed.pop(0)
                    if output_dir is None:
                        records.append(member.record)
                        continue
                    while len(in_flight) >= _WRITES_IN_FLIGHT:
                        in_flight.popleft().result()
                    in_flight.append(writer.submit(_write_member, member, output_dir, roundtrip, durable))
                    records.append(in_flight[-1])
                member = None  # the last one too: only the writer holds it now
                pending.append((records, joint))
                while pending and all(r.done() for r in pending[0][0] if isinstance(r, Future)):
                    yield finished(*pending.popleft())
            while pending:
                yield finished(*pending.popleft())
    finally:
        numba.set_num_threads(previous)


def numbered(
    task: Callable[[list[GroupJob]], list[GroupResult]], index: int, jobs: list[GroupJob], parent: int | None = None
) -> tuple[int, list[GroupResult]]:
    """``(index, task(jobs))``: a task's results, with which batch they are (they arrive as they finish).
    ``parent``: in a local worker, the pid of the run that started it, which it does not outlive."""
    if parent is not None:
        exit_with_parent(parent)
    return index, task(jobs)


_PARENT_WATCH = "qstrat-parent-watch"


def exit_with_parent(parent: int) -> None:
    """End this worker process within a second of ``parent``'s death (once per process).

    A run killed with SIGKILL cannot stop its workers: they would go on writing into an output
    directory whose lock is free again, and then sit idle, holding their buffers, until joblib's
    idle timeout (minutes). Orphaned, a worker is adopted by another process: its parent pid changes."""
    if any(thread.name == _PARENT_WATCH for thread in threading.enumerate()):
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name=_PARENT_WATCH, daemon=True).start()


def quantize_batch(
    jobs: list[GroupJob],
    variant: str,
    validation: ValidationSettings | None,
    output_dir: Path | None,
    numba_threads: int,
    durable: bool = False,
) -> list[GroupResult]:
    """:func:`quantize_stream` as one task of a worker process: every result at once."""
    return list(quantize_stream(jobs, variant, validation, output_dir, numba_threads, durable))
