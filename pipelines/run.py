"""A whole run: plan -> quantize groups over joblib workers -> passthrough -> manifest.

Safe to interrupt and to rerun: the output directory is locked for the run, finished
groups are journaled, and a rerun with the same config and input skips what is intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
from qstrat.kernels import QK_K
from qstrat.pipelines.backends import execution_backend
from qstrat.pipelines.journal import Journal, group_key, run_fingerprint
from qstrat.pipelines.plan import GroupJob, Plan, in_its_type, make_plan, writes_q8k
from qstrat.pipelines.worker import GroupResult, error_measure, numbered, quantize_batch, quantize_stream

from qstrat.blocks import KERNEL_STORAGE, check_finite
from qstrat.convert import gguf_metadata
from qstrat.errors import InputError, OutputError, WorkerLost
from qstrat.formats import block_type
from qstrat.interrupts import deferred_stops, interruptible_wait, raise_if_stop_requested, workers_deaf_to_interrupts
from qstrat.io.atomic import describe_os_error, file_sha256, make_durable, output_lock, remove_stale_temporaries
from qstrat.io.gguf import write_gguf
from qstrat.io.gguf_input import GGUFInput, open_input
from qstrat.io.manifest import (
    JOINT_PERMUTATIONS_NAME,
    RESIDUAL_PERMUTATION_KEY,
    MANIFEST_NAME,
    PASSTHROUGH_NAME,
    Failure,
    FileEntry,
    Manifest,
    Source,
    new_manifest,
    read_manifest,
    write_manifest,
)
from qstrat.io.names import JOURNAL_NAME, storage_name, unlisted_tensor_files
from qstrat.io.q8k import WrittenFile, perm_file_size, q8k_file_size
from qstrat.io.safetensors import (
    SafetensorsModel,
    map_tensor,
    read_model_config,
    stacked_rows,
    write_safetensors,
)
from qstrat.model import QuantizedModel
from qstrat.report import REPORT_JSON, preload_plotting, write_reports
from qstrat.results import QuantizationResult, TensorRecord, ThresholdFailure
from qstrat.runconfig import THRESHOLDS, RunConfig, fill_template
from qstrat.strategies import Permutation
from qstrat.strategies.search import Reader, scale_group
from qstrat.verify import file_problems

#: records, bytes of input done; a callback with a ``stage(text)`` method is also told of work that
#: precedes the first records (the residual-stream search: minutes on a 7B model)
ProgressCallback = Callable[[list[TensorRecord], int], None]


def check_output_dir(output_dir: Path, model: SafetensorsModel) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"output {output_dir} exists and is not a directory")
    inputs = {f.path.resolve() for f in model.files}
    if output_dir.resolve() in inputs or model.path.resolve() == output_dir.resolve():
        raise InputError(f"output directory {output_dir} is the input; choose another")
    # a run writes <model>.gguf and passthrough.safetensors there: a GGUF input in it was overwritten
    inside = sorted(str(path) for path in inputs if path.parent == output_dir.resolve())
    if inside:
        raise InputError(f"output directory {output_dir} holds the input {inside[0]}; choose another")


def _remove_outdated_files(output_dir: Path, previous: Manifest | None, records: list[TensorRecord], earlier_run: bool) -> None:
    """Delete files an earlier run wrote that this run did not (a stale .perm would be read): those
    the previous manifest lists and, where a qstrat run was here before (``earlier_run``), every
    tensor file this run does not list, since a run stopped after it removed that manifest (a
    --force one, say) leaves the earlier files behind unlisted.  Anything else is left alone."""
    current = {f.path for r in records for f in r.files.values()}
    earlier = {file.path for entry in previous.tensors.values() for file in entry.files.values()} if previous else set()
    if earlier_run:
        earlier |= set(unlisted_tensor_files(output_dir, current))
    for path in sorted(earlier - current):
        with contextlib.suppress(OSError):
            (output_dir / path).unlink()


def write_passthrough(
    output_dir: Path, plan: Plan, metadata: dict[str, str], joint: dict[str, Permutation], groups: dict[str, str]
) -> list[TensorRecord]:
    """Copy every tensor that is not quantized into passthrough.safetensors, unchanged except
    for the joint permutations of its group (so the saved model stays consistent)."""

    residual = plan.residual

    def stored(info):
        array = map_tensor(info)
        for permutation in (joint.get(info.name), residual.permutation(info.name) if residual else None):
            if permutation is not None:
                array = np.take(array, permutation.perm, axis=permutation.axis)
        return array

    items = ((p.info.name, p.info.dtype, p.info.shape, lambda info=p.info: stored(info)) for p in plan.passthrough)
    size, sha256 = write_safetensors(output_dir / PASSTHROUGH_NAME, items, metadata)
    file = WrittenFile(PASSTHROUGH_NAME, size, sha256)
    records = []
    for p in plan.passthrough:
        permutation = joint.get(p.info.name)
        along_stream = residual.permutation(p.info.name) if residual else None
        records.append(
            TensorRecord(
                p.info.name,
                p.info.shape,
                p.info.dtype,
                "passthrough",
                permutation="joint" if permutation is not None or along_stream is not None else "none",
                joint_group=groups.get(p.info.name) if permutation is not None else None,
                joint_axis=permutation.axis if permutation is not None else None,
                residual_axis=along_stream.axis if along_stream is not None else None,
                files={"safetensors": file},
                reason=p.reason,
                source_type=p.info.encoding,
            )
        )
    return records


def write_joint_permutations(output_dir: Path, joint: dict[str, Permutation], residual: np.ndarray | None = None) -> WrittenFile | None:
    """Store every joint permutation (int64 gather map per tensor), and the residual stream's
    (once, for every tensor it permutes), so that they can be undone."""
    if not joint and residual is None:
        return None
    items = [(name, "I64", joint[name].perm.shape, joint[name].perm.astype("<i8")) for name in sorted(joint)]
    if residual is not None:
        items.append((RESIDUAL_PERMUTATION_KEY, "I64", residual.shape, residual.astype("<i8")))
    size, sha256 = write_safetensors(output_dir / JOINT_PERMUTATIONS_NAME, items)
    return WrittenFile(JOINT_PERMUTATIONS_NAME, size, sha256)


#: A task carries groups up to this many input bytes (at least one group), so that a worker
#: writes one group's files while it computes the next, ...
TASK_BYTES = 256 << 20
#: ... and at most this many groups, so that progress and the journal advance steadily.
TASK_GROUPS = 8


def task_batches(ordered: list[GroupJob], workers: int) -> list[list[GroupJob]]:
    """Consecutive groups cut into tasks, with at least two tasks per worker while groups last
    (so that dynamic dispatch still balances the workers)."""
    total = sum(job.nbytes for job in ordered)
    limit = max(1, min(TASK_BYTES, total // max(1, 2 * workers)))
    batches: list[list[GroupJob]] = []
    size = 0
    for job in ordered:
        if not batches or size + job.nbytes > limit or len(batches[-1]) >= TASK_GROUPS:
            batches.append([])
            size = 0
        batches[-1].append(job)
        size += job.nbytes
    return batches


def _joblib_results(
    batches: list[list[GroupJob]], n_jobs: int, task: Callable[[list[GroupJob]], list[GroupResult]], local: bool
) -> Iterator[tuple[GroupJob, GroupResult]]:
    """Every group with its result, from ``task`` run on each batch by joblib's workers, as the
    batches finish: one that fails (a full disk) or a kill loses no finished batch's journal line.

    Closing this generator closes joblib's, and joblib aborts: it dispatches nothing more
    and terminates the workers of the executor it uses (kill_workers).  Its warning that
    results went unused says nothing to a run that is stopping."""
    from joblib import Parallel, delayed

    # batch_size=1: the tasks are sized already (TASK_BYTES, TASK_GROUPS); joblib's automatic
    # batching, seeing fast tasks, would hand the workers most of a run at once, so that the journal
    # lags far behind them and a worker's death near the start could go unnoticed
    # joblib starts its local workers and their manager thread in this call (a cluster's are its own)
    with workers_deaf_to_interrupts() if local else contextlib.nullcontext():
        results = Parallel(n_jobs=n_jobs, return_as="generator_unordered", batch_size=1)(
            delayed(numbered)(task, index, batch, os.getpid() if local else None) for index, batch in enumerate(batches)
        )
    try:
        while True:
            with interruptible_wait():
                finished = next(results, None)
            if finished is None:
                return
            index, batch_results = finished
            yield from zip(batches[index], batch_results, strict=True)
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.close()


def _run_groups(
    jobs: list[GroupJob],
    config: RunConfig,
    out: Path | None,
    on_done: Callable[[GroupJob, list[TensorRecord], dict[str, Permutation]], None],
) -> None:
    """Quantize ``jobs`` and call ``on_done`` with each one's result, in the main process.

    A stop request (see qstrat.interrupts) is acted on between results.  However this ends,
    no local worker is left with a task and no write of this process is under way."""
    if not jobs:
        return
    # Largest groups first: with dynamic dispatch this balances work by bytes, not count.
    ordered = sorted(jobs, key=lambda g: (-g.nbytes, g.members[0].info.name))
    settings = config.validation_settings()
    with execution_backend(config, ordered, out) as (n_jobs, threads), deferred_stops():
        results: Iterator[GroupResult] | Iterator[tuple[GroupJob, GroupResult]]
        if n_jobs == 1 and config.parallel.backend == "loky":
            # in this process, one stream over every group: writes overlap the computing throughout
            results = quantize_stream(ordered, config.variant, settings, out, threads)
            # strict: after the last job, the stream ends too
            finished = zip(ordered, results, strict=True)
        else:
            durable = config.parallel.backend == "dask"
            task = partial(quantize_batch, variant=config.variant, validation=settings, output_dir=out,
                           numba_threads=threads, durable=durable)
            # to its end, so that joblib's generator finishes and its idle workers are kept for the
            # next run of this process
            finished = results = _joblib_results(task_batches(ordered, n_jobs), n_jobs, task, local=config.parallel.backend == "loky")
        try:
            for job, result in finished:
                on_done(job, result.records, result.joint)
                raise_if_stop_requested()
        except BrokenProcessPool as err:
            # whenever it is noticed, also while the first batches are dispatched
            raise_if_stop_requested()  # a signal to the whole process group (SIGTERM) reaches the workers too
            raise WorkerLost(f"a worker process died ({err.__class__.__name__}); rerun the same command to resume") from None
        finally:
            # early: the stream's writes under way finish; joblib kills the workers that have tasks
            results.close()


def choose_residual(plan: Plan, variant: str, progress: ProgressCallback | None = None) -> Plan:
    """The plan with residual_stream's permutation chosen (if the chain has it): measured on
    every quantized tensor whose columns are the stream, in its target type."""
    if plan.residual is None:
        return plan
    readers = plan.residual_readers()
    if hasattr(progress, "stage"):
        progress.stage(f"choosing the residual-stream order over {len(readers)} matrices")
    arrays = {}
    for name, job in readers.items():
        array = map_tensor(job.info).view(KERNEL_STORAGE[job.info.dtype])
        check_finite(array, name)
        # a GGUF input's block type is decoded again at each use rather than held: one reader's
        # float32 copy at a time (every reader's, for a 7B model, is some 19 GB)
        source = partial(map_tensor, job.info) if job.info.encoding else array
        arrays[name] = Reader(source, job.choice.type_name, job.importance)
        del array
    block = max((block_type(reader.type_name).block_size for reader in arrays.values()), default=QK_K)
    group = scale_group(reader.type_name for reader in arrays.values())
    choice = plan.residual.strategy.choose(arrays, error_measure(readers.values(), variant), block, group)
    return plan.with_residual(choice)


def with_permutation_gains(records: list[TensorRecord], plan: Plan) -> list[TensorRecord]:
    """Records of residual_stream's readers with the gain its order measured on them."""
    choice = plan.residual.choice if plan.residual is not None else None
    if choice is None:
        return records
    return [r if r.name not in choice.identity_errors else replace(r, permutation_gain_db=choice.gain_db(r.name)) for r in records]


def describe_residual(plan: Plan) -> dict[str, object] | None:
    """What the report says of residual_stream's choice."""
    choice = plan.residual.choice if plan.residual is not None else None
    if choice is None:
        return None
    gains = [g for name in choice.identity_errors if (g := choice.gain_db(name)) is not None and np.isfinite(g)]
    return {
        "order": choice.candidate,
        "tensors": len(plan.residual.axes),
        "readers": len(choice.identity_errors),
        "mean_gain_db": float(np.mean(gains)) if gains else None,
        "rejected": dict(choice.rejected),
    }


def evaluate_model(
    input_path: str | os.PathLike, config: RunConfig, progress: ProgressCallback | None = None, outputs: tuple[str, ...] = ()
) -> QuantizationResult:
    """Quantize and measure every tensor in memory, writing nothing (for comparisons).  ``outputs``:
    plan as a run writing them would, so that what such a run refuses is refused here too."""
    started = time.perf_counter()
    config = config.evaluated()
    model = open_input(input_path)
    check_input_intact(model)
    plan = choose_residual(make_plan(model, config, outputs=outputs), config.variant, progress)  # nothing is written
    records: list[TensorRecord] = []

    def done(job, group_records, joint):
        records.extend(group_records)
        if progress is not None:
            progress(group_records, job.nbytes)

    _run_groups(list(plan.groups), config, None, done)
    passthrough = [TensorRecord(p.info.name, p.info.shape, p.info.dtype, "passthrough", reason=p.reason, source_type=p.info.encoding)
                   for p in plan.passthrough]
    tensors = with_permutation_gains(sorted(records + passthrough, key=lambda r: r.name), plan)
    return QuantizationResult(None, tensors, time.perf_counter() - started, residual=describe_residual(plan))


def threshold_failures(records: list[TensorRecord], thresholds) -> list[ThresholdFailure]:
    failures = []
    if thresholds is None:
        return failures
    for record in records:
        m = record.metrics
        if not record.quantized or m is None:
            continue
        for key, (_, metric, bound) in THRESHOLDS.items():
            limit, value = getattr(thresholds, key), getattr(m, metric)
            if limit is not None and value is not None and (value < limit if bound == "min" else value > limit):
                failures.append(ThresholdFailure(record.name, metric, value, limit))
    return failures


def check_input_intact(model: SafetensorsModel | GGUFInput) -> None:
    """A GGUF input that qstrat wrote records its checksum: a changed one must not be quantized into an
    output whose checksums are fresh (another tool's records none and costs nothing)."""
    if isinstance(model, GGUFInput):
        model.check_intact()


def quantize_model(
    input_path: str | os.PathLike,
    config: RunConfig,
    output_dir: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
    *,
    force: bool | None = None,
    thresholds=None,
    settings: dict[str, object] | None = None,
    outputs: tuple[str, ...] | None = None,
    warn: Callable[[str], None] | None = None,
) -> QuantizationResult:
    """Quantize a .safetensors file or model directory into an output directory.

    Reruns resume: groups whose files are intact are kept.  Output of a different config
    or input is refused unless ``force`` (default: ``config.force``).  ``outputs`` defaults
    to the config's.  ``warn`` is given the plan's notes (:attr:`Plan.notes`) before any work.
    """
    started = time.perf_counter()
    outputs = config.output_kinds if outputs is None else tuple(outputs)
    force = config.force if force is None else force
    model = open_input(input_path)
    check_input_intact(model)
    plan = make_plan(model, config, outputs)
    # a config's output may be a template, as in a file: {model} is the model's name
    out = Path(output_dir) if output_dir is not None else Path(fill_template(str(config.output_dir), model.name, f"output {config.output!r}"))
    check_output_dir(out, model)
    for note in plan.notes if warn is not None else ():
        warn(note)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(describe_os_error(out, err)) from None
    settings = dict(settings or {}, **config.describe(), outputs=list(outputs))
    if plan.importance is not None:
        settings["imatrix"] = plan.importance.describe()
    fingerprint = run_fingerprint(settings, model)
    older = run_fingerprint(settings, model, with_times=False)
    with output_lock(out):
        previous = read_manifest_lenient(out)
        if previous is not None and previous.fingerprint == fingerprint and not file_problems(out, previous):
            # the same run finished here and its files are intact: nothing to redo (a GGUF-only output
            # keeps no tensor files for a rerun to reuse, and every night's cron run redid it whole)
            return _up_to_date(out, previous, started)
        plan = choose_residual(plan, config.variant, progress)  # the search, only when something is to be done
        earlier_run = previous is not None or (out / JOURNAL_NAME).exists()  # the directory is a qstrat output
        journal = _open_journal(out, (fingerprint, older), force, previous, settings, model.path)
        try:
            records, joint = _reuse_or_quantize_groups(plan, config, out, journal, progress)
        finally:
            journal.close()
        records = _write_passthrough_and_permutations(out, plan, model, records, joint, previous, earlier_run, progress)
        records = with_permutation_gains(records, plan)
        failures = threshold_failures(records, thresholds)
        manifest = _manifest(model, config.variant, settings, fingerprint, records, failures)
        container = None
        if "gguf" in outputs:
            container = _write_container(out, model.name, manifest, records, keep_tensor_files="q8k" in outputs, source=model.path)
        return _publish(out, model.name, manifest, records, failures, settings, started, container, describe_residual(plan), plan.notes)


def _settings_changes(before: Mapping[str, object], after: Mapping[str, object], prefix: str = "") -> list[str]:
    """``key: old -> new`` for each setting that differs, nested keys dotted."""
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changes += _settings_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {json.dumps(old)} -> {json.dumps(new)}")
    return changes


def _open_journal(
    out: Path, fingerprints: tuple[str, str], force: bool, previous: Manifest | None, settings: Mapping[str, object],
    source: Path,
) -> Journal:
    """The journal of this run, keeping the finished groups of an earlier run of the same
    fingerprint (``fingerprints``: today's, and the one an earlier qstrat wrote for the same run, without
    the files' modification times);
    the directory no longer looks complete, and holds no temporaries."""
    journal = Journal(out, fingerprints[0])
    earlier = journal.previous_fingerprint() or (previous.fingerprint if previous else None)
    mixed = earlier is not None and earlier not in fingerprints  # the older one's groups are kept, journaled under today's
    if mixed and not force:
        # what differs, when the finished run's manifest says (a run stopped early left only its journal)
        changes = _settings_changes(previous.config, json.loads(json.dumps(settings))) if previous is not None else []
        other_model = previous is not None and Path(previous.source.path).resolve() != source.resolve()
        if other_model:
            changes.insert(0, f"input: {previous.source.path} -> {source.resolve()}")
        what = (f"a different {'input' if other_model else 'config'} ({'; '.join(changes[:3])}{'; ...' if len(changes) > 3 else ''})" if changes
                else "a different config or input" if previous is None
                else "the same config on its input's files, changed since")
        raise OutputError(f"output {out} holds results of {what}; rerun with --force (force=True in Python) to replace them")
    if not mixed:
        journal.load(out)
    try:
        # Until the new manifest lands, the directory must not look complete.
        with contextlib.suppress(FileNotFoundError):
            (out / MANIFEST_NAME).unlink()
        remove_stale_temporaries(out)
    except OSError as err:
        raise OutputError(describe_os_error(out, err)) from None
    journal.open(keep_loaded=not mixed)
    return journal


def _journal_key(job: GroupJob) -> str:
    """A group's key in the journal; with residual_stream it names the permutation its members
    were quantized under, so that a group quantized under another one is never reused."""
    key = group_key(job.strategy.name, [m.info.name for m in job.members])
    residual = next((m.residual.perm for m in job.members if m.residual is not None), None)
    if residual is None:
        return key
    return key + " residual " + hashlib.sha256(np.ascontiguousarray(residual, dtype="<i8").tobytes()).hexdigest()[:16]


def _reuse_or_quantize_groups(
    plan: Plan, config: RunConfig, out: Path, journal: Journal, progress: ProgressCallback | None
) -> tuple[list[TensorRecord], dict[str, Permutation]]:
    """Every group's records and joint permutations: the journal's where its files are
    intact, the others quantized now and journaled one by one."""
    records: list[TensorRecord] = []
    joint: dict[str, Permutation] = {}
    pending = []
    for job in plan.groups:
        reused = journal.reusable(_journal_key(job))
        if reused is None:
            pending.append(job)
            continue
        records.extend(reused[0])
        joint.update(reused[1])
        if progress is not None:
            progress(reused[0], job.nbytes)

    plotting_preloaded = False

    def done(job, group_records, group_joint):
        nonlocal plotting_preloaded
        if not plotting_preloaded:
            # after the first group: until then numba's own start-up in this process wants the GIL
            preload_plotting()
            plotting_preloaded = True
        journal.record(_journal_key(job), group_records, group_joint)
        records.extend(group_records)
        joint.update(group_joint)
        if progress is not None:
            progress(group_records, job.nbytes)

    try:
        _run_groups(pending, config, out, done)
    except (KeyboardInterrupt, WorkerLost):
        remove_stale_temporaries(out)  # no worker is left to write one after this
        raise
    return records, joint


def _write_passthrough_and_permutations(
    out: Path,
    plan: Plan,
    model: SafetensorsModel,
    records: list[TensorRecord],
    joint: dict[str, Permutation],
    previous: Manifest | None,
    earlier_run: bool,
    progress: ProgressCallback | None,
) -> list[TensorRecord]:
    """Passthrough tensors and joint permutations written beside the quantized ones, files of
    earlier runs that this one did not write removed; every tensor's record, by name."""
    group_of = {m.info.name: g.group_id for g in plan.groups for m in g.members}
    passthrough = write_passthrough(out, plan, model.metadata, joint, group_of)
    if progress is not None and passthrough:
        progress(passthrough, sum(p.info.nbytes for p in plan.passthrough))
    residual = plan.residual.choice.perm if plan.residual is not None and plan.residual.choice is not None else None
    joint_file = write_joint_permutations(out, joint, residual)
    records = sorted(records + passthrough, key=lambda r: r.name)
    if joint_file is not None:
        records = [
            r if r.joint_group is None and r.residual_axis is None else replace(r, files={**r.files, "joint_perm": joint_file})
            for r in records
        ]
    _remove_outdated_files(out, previous, records, earlier_run)
    return records


def _manifest(
    model: SafetensorsModel,
    variant: str,
    settings: dict[str, object],
    fingerprint: str,
    records: list[TensorRecord],
    failures: list[ThresholdFailure],
) -> Manifest:
    return new_manifest(
        fingerprint=fingerprint,
        source=Source(
            path=str(model.path),
            name=model.name,
            architecture=read_model_config(model).get("model_type"),
            files=sorted(f.path.name for f in model.files),
        ),
        config=settings,
        variant=variant,
        tensors={r.name: r.manifest_entry() for r in records},
        failed=[Failure(**f.as_dict()) for f in failures],
    )


def _write_container(
    out: Path, name: str, manifest: Manifest, records: list[TensorRecord], keep_tensor_files: bool, source: Path
) -> dict[str, object]:
    """The GGUF file, assembled from the files just written (so its Q8_K bytes are the .q8k
    files' bytes), entered in ``manifest``; what it is, for the report: a llama.cpp model (a
    Llama-family model whose weights llama.cpp runs) or qstrat's generic container, and why."""
    written = QuantizedModel(out, manifest, check_files=False)  # hashed as they were written, read back by roundtrip
    metadata = gguf_metadata(written, source)
    container = write_gguf(written, out / f"{name}.gguf", metadata)
    layout = metadata["layout"]
    if layout is not None:
        described = {"file": container.name, "llama_cpp": True, "architecture": layout.arch,
                     "vocabulary": layout.vocabulary.description, "notes": list(layout.notes)}
    elif metadata.get("carried") is not None:
        described = {"file": container.name, "llama_cpp": True, "architecture": metadata["architecture"],
                     "vocabulary": "the input GGUF's, with its other metadata", "notes": []}
    else:
        described = {"file": container.name, "llama_cpp": False, "reason": metadata["not_llama_cpp"], "notes": []}
    entry = FileEntry(path=container.name, size=container.stat().st_size, sha256=file_sha256(container))
    manifest.containers = {container.name: entry}
    if not keep_tensor_files:
        # GGUF instead of per-tensor files: the container now holds every tensor; the files it was
        # assembled from go (a rerun redoes them, so a killed run still ends complete)
        for record in records:
            for file in record.files.values():
                with contextlib.suppress(FileNotFoundError):
                    (out / file.path).unlink()
        for tensor in manifest.tensors.values():
            tensor.files = {"gguf": entry}
    return described


def _publish(
    out: Path,
    name: str,
    manifest: Manifest,
    records: list[TensorRecord],
    failures: list[ThresholdFailure],
    settings: dict[str, object],
    started: float,
    container: dict[str, object] | None = None,
    residual: dict[str, object] | None = None,
    notes: tuple[str, ...] = (),
) -> QuantizationResult:
    """Every file made durable, then the reports, then the manifest: the directory is complete."""
    written = {out / f.path for r in records for f in r.files.values()} | {out / c for c in manifest.containers or {}}
    make_durable(sorted(p for p in written if p.exists()), out)
    result = QuantizationResult(out, records, time.perf_counter() - started, None, failures, container, residual, notes=notes)
    manifest.reports = {f.path: FileEntry(**vars(f)) for f in write_reports(result, name, settings, out)}
    result.manifest_path = write_manifest(out, manifest)
    return result


def _up_to_date(out: Path, manifest: Manifest, started: float) -> QuantizationResult:
    """The result of a finished run whose output is intact: its manifest's records and failures,
    and its report's description of the GGUF container and of the residual order."""
    records = [TensorRecord.from_manifest_entry(name, entry) for name, entry in sorted(manifest.tensors.items())]
    failures = [ThresholdFailure(f.tensor, f.metric, math.nan if f.value is None else f.value, f.limit) for f in manifest.validation.failed]
    summary = json.loads((out / REPORT_JSON).read_text(encoding="utf-8")).get("summary", {}) if REPORT_JSON in (manifest.reports or {}) else {}
    return QuantizationResult(out, records, time.perf_counter() - started, out / MANIFEST_NAME, failures,
                              summary.get("gguf"), summary.get("residual_stream"), up_to_date=True, notes=tuple(summary.get("notes", ())))


def read_manifest_lenient(directory: Path) -> Manifest | None:
    """The previous manifest, or None if it is missing or unreadable (it is rewritten anyway)."""
    try:
        return read_manifest(directory)
    except (InputError, OSError):
        return None


def describe_plan(plan: Plan) -> dict[str, object]:
    """What a run would do, for --dry-run: tensors, strategies, skips, estimated output size."""
    quantized, size = [], 0
    for group in plan.groups:
        permutation = group.strategy.planned_permutation([m.info.name for m in group.members])
        for member in group.members:
            if member.quantize:
                rows, k = stacked_rows(member.info.shape), member.info.shape[-1]
                choice = member.choice
                size += q8k_file_size(rows, k) if writes_q8k(choice) else rows * block_type(choice.type_name).row_bytes(k)
                size += perm_file_size(k) if permutation == "runtime" else 0
                quantized.append(
                    {"name": member.info.name, "shape": list(member.info.shape), "dtype": member.info.dtype,
                     "format": storage_name(choice.type_name),
                     **({"fallback_from": choice.fallback_from} if choice.fallback_from else {}),
                     **({"source_type": member.info.encoding} if member.info.encoding else {}),
                     # copied unless a permutation moves its columns, which only the run's measures decide
                     **({"copied": True} if in_its_type(member.info, choice) and permutation == "none"
                        and (plan.residual is None or member.info.name not in plan.residual.axes) else {}),
                     "strategy": group.strategy.name, "permutation": permutation}
                )
    passthrough = [{"name": p.info.name, "shape": list(p.info.shape), "dtype": p.info.dtype, "reason": p.reason} for p in plan.passthrough]
    size += sum(p.info.nbytes for p in plan.passthrough)
    return {"quantized": sorted(quantized, key=lambda q: q["name"]), "passthrough": passthrough, "estimated_output_bytes": size}


__all__ = ["describe_plan", "evaluate_model", "quantize_model"]
