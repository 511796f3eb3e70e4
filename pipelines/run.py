"""A whole run: plan -> quantize groups over joblib workers -> passthrough -> manifest."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed

from qstrat._version import __version__
from qstrat.config import QuantizationConfig
from qstrat.errors import InputError, OutputError
from qstrat.io.atomic import describe_os_error, remove_stale_temporaries
from qstrat.io.manifest import (
    JOINT_PERMUTATIONS_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    PASSTHROUGH_NAME,
    read_manifest,
    write_manifest,
)
from qstrat.io.q8k import WrittenFile
from qstrat.io.safetensors import SafetensorsModel, map_tensor, write_safetensors
from qstrat.results import QuantizationResult, TensorRecord
from qstrat.strategies import Permutation
from qstrat.pipelines.plan import Plan, make_plan
from qstrat.pipelines.worker import quantize_group

ProgressCallback = Callable[[list[TensorRecord]], None]


def numba_threads_per_worker(workers: int) -> int:
    """Threads per worker so that workers x threads never exceeds the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def prepare_output_dir(output_dir: Path, model: SafetensorsModel) -> dict | None:
    """Create the output directory and retire the previous run's manifest; returns it."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"output {output_dir} exists and is not a directory")
    inputs = {f.path.resolve() for f in model.files}
    if output_dir.resolve() in inputs or model.path.resolve() == output_dir.resolve():
        raise InputError(f"output directory {output_dir} is the input; choose another")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        previous = read_manifest(output_dir)
        # Until the new manifest lands, the directory must not look complete.
        with contextlib.suppress(FileNotFoundError):
            (output_dir / MANIFEST_NAME).unlink()
        remove_stale_temporaries(output_dir)
    except OSError as err:
        raise OutputError(describe_os_error(output_dir, err)) from None
    return previous


def _remove_outdated_files(output_dir: Path, previous: dict | None, records: list[TensorRecord]) -> None:
    """Delete files the previous run wrote that this run did not (a stale .perm would be read)."""
    if previous is None:
        return
    current = {f.path for r in records for f in r.files.values()}
    for entry in previous.get("tensors", {}).values():
        for file in entry.get("files", {}).values():
            if file["path"] not in current:
                with contextlib.suppress(OSError):
                    (output_dir / file["path"]).unlink()


def write_passthrough(
    output_dir: Path, plan: Plan, metadata: dict[str, str], joint: dict[str, Permutation], groups: dict[str, str]
) -> list[TensorRecord]:
    """Copy every tensor that is not quantized into passthrough.safetensors, unchanged except
    for the joint permutations of its group (so the saved model stays consistent)."""

    def stored(info):
        array = map_tensor(info)
        permutation = joint.get(info.name)
        return array if permutation is None else np.take(array, permutation.perm, axis=permutation.axis)

    items = ((p.info.name, p.info.dtype, p.info.shape, stored(p.info)) for p in plan.passthrough)
    size, sha256 = write_safetensors(output_dir / PASSTHROUGH_NAME, items, metadata)
    file = WrittenFile(PASSTHROUGH_NAME, size, sha256)
    records = []
    for p in plan.passthrough:
        permutation = joint.get(p.info.name)
        records.append(
            TensorRecord(
                p.info.name,
                p.info.shape,
                p.info.dtype,
                "passthrough",
                permutation="joint" if permutation is not None else "none",
                joint_group=groups.get(p.info.name) if permutation is not None else None,
                joint_axis=permutation.axis if permutation is not None else None,
                files={"safetensors": file},
                reason=p.reason,
            )
        )
    return records


def write_joint_permutations(output_dir: Path, joint: dict[str, Permutation]) -> WrittenFile | None:
    """Store every joint permutation (int64 gather map per tensor) so that they can be undone."""
    if not joint:
        return None
    items = [(name, "I64", joint[name].perm.shape, joint[name].perm.astype("<i8")) for name in sorted(joint)]
    size, sha256 = write_safetensors(output_dir / JOINT_PERMUTATIONS_NAME, items)
    return WrittenFile(JOINT_PERMUTATIONS_NAME, size, sha256)


def _run_groups(
    plan: Plan, config: QuantizationConfig, out: Path | None, progress: ProgressCallback | None
) -> tuple[list[TensorRecord], dict[str, Permutation]]:
    threads = numba_threads_per_worker(config.workers)
    # Largest groups first: with dynamic dispatch this balances work by bytes, not count.
    jobs = sorted(plan.groups, key=lambda g: (-g.nbytes, g.members[0].info.name))
    tasks = (delayed(quantize_group)(job, config.variant, config.validation, out, threads) for job in jobs)
    records: list[TensorRecord] = []
    joint: dict[str, Permutation] = {}
    parallel = Parallel(n_jobs=config.workers, backend="loky", return_as="generator_unordered")
    for group_result in parallel(tasks):
        records.extend(group_result.records)
        joint.update(group_result.joint)
        if progress is not None:
            progress(group_result.records)
    return records, joint


def evaluate_model(
    input_path: str | os.PathLike, config: QuantizationConfig, progress: ProgressCallback | None = None
) -> QuantizationResult:
    """Quantize and measure every tensor in memory, writing nothing (for comparisons)."""
    started = time.perf_counter()
    model = SafetensorsModel(input_path)
    plan = make_plan(model, replace(config, validation=True))
    records, _ = _run_groups(plan, replace(config, validation=True), None, progress)
    passthrough = [TensorRecord(p.info.name, p.info.shape, p.info.dtype, "passthrough", reason=p.reason) for p in plan.passthrough]
    return QuantizationResult(None, sorted(records + passthrough, key=lambda r: r.name), time.perf_counter() - started)


def quantize_model(
    input_path: str | os.PathLike,
    config: QuantizationConfig,
    output_dir: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
) -> QuantizationResult:
    """Quantize a .safetensors file or model directory into an output directory."""
    started = time.perf_counter()
    model = SafetensorsModel(input_path)
    plan = make_plan(model, config)
    out = Path(output_dir) if output_dir is not None else config.output_dir
    previous = prepare_output_dir(out, model)

    records, joint = _run_groups(plan, config, out, progress)
    group_of = {m.info.name: g.group_id for g in plan.groups for m in g.members}
    passthrough = write_passthrough(out, plan, model.metadata, joint, group_of)
    if progress is not None and passthrough:
        progress(passthrough)
    joint_file = write_joint_permutations(out, joint)
    records = sorted(records + passthrough, key=lambda r: r.name)
    if joint_file is not None:
        records = [r if r.joint_group is None else replace(r, files={**r.files, "joint_perm": joint_file}) for r in records]
    _remove_outdated_files(out, previous, records)

    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "tool": {"name": "qstrat", "version": __version__},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(model.path), "files": sorted(f.path.name for f in model.files)},
        "config": config.describe(),
        "variant": config.variant,
        "tensors": {r.name: r.manifest_entry() for r in records},
    }
    manifest_path = write_manifest(out, manifest)
    return QuantizationResult(out, records, time.perf_counter() - started, manifest_path)
