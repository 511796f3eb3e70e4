"""The work of one group in a worker process: map, permute, quantize, measure, write.

Workers receive only file paths and offsets (a plan entry), never tensor data: each maps
the input itself and writes its own output files.  What comes back is small: records,
and the permutations of tensors that the main process stores permuted (passthrough).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numba
from qstrat.pipelines.plan import GroupJob

from qstrat.blocks import KERNEL_STORAGE, check_finite
from qstrat.errors import QstratError
from qstrat.io.q8k import check_permutation, write_perm, write_q8k
from qstrat.io.safetensors import map_tensor
from qstrat.quantize import TensorMetrics, quantize_matrix
from qstrat.results import TensorRecord
from qstrat.strategies import Permutation
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


def _checked(job: GroupJob, name: str, permutation: Permutation | None, shape: tuple[int, ...]) -> Permutation | None:
    if permutation is None:
        return None
    kind = job.strategy.permutation_kind
    if permutation.axis not in (0, 1) or permutation.axis >= len(shape) or (kind == "runtime" and permutation.axis != 1):
        raise QstratError(f"strategy {job.strategy.name} gave tensor {name!r} a permutation on an invalid axis")
    check_permutation(permutation.perm, shape[permutation.axis], f"strategy {job.strategy.name}, tensor {name!r}")
    return permutation


def quantize_group(
    job: GroupJob, variant: str, validation: ValidationSettings | None, output_dir: Path | None, numba_threads: int
) -> GroupResult:
    """Quantize the quantized members of ``job``, write their files (unless ``output_dir`` is
    None: an in-memory evaluation), return records and joint maps."""
    numba.set_num_threads(numba_threads)
    started = time.perf_counter()
    arrays = {m.info.name: map_tensor(m.info).view(KERNEL_STORAGE[m.info.dtype]) for m in job.members}
    if _strategy_reads_values(job):
        # strategies must see finite values; without one, the quantize kernel refuses them itself
        for member in job.members:
            if member.quantize:
                check_finite(arrays[member.info.name], member.info.name)
    proposed = job.strategy.permutations(arrays, variant)
    permutations = {m.info.name: _checked(job, m.info.name, proposed.get(m.info.name), m.info.shape) for m in job.members}
    quantized = [m for m in job.members if m.quantize]
    shared_seconds = (time.perf_counter() - started) / max(1, len(quantized))
    kind = job.strategy.permutation_kind
    result = GroupResult([])
    if kind == "joint":
        result.joint = {name: p for name, p in permutations.items() if p is not None}
    for member in quantized:
        begin = time.perf_counter()
        info = member.info
        permutation = permutations[info.name]
        row_perm = permutation.perm if permutation is not None and permutation.axis == 0 else None
        col_perm = permutation.perm if permutation is not None and permutation.axis == 1 else None
        stages = validation.stages if validation is not None else ()
        probes = {stage: probe_vector(stage, info.shape[1]) for stage in ("sum_test", "gradient_test") if stage in stages}
        outcome = quantize_matrix(
            arrays[info.name], variant, row_perm, col_perm, tensor_name=info.name, measure="weight_error" in stages, probes=probes
        )
        blocks, metrics = outcome.blocks, outcome.metrics
        if probes:
            probe_mse = {
                f"{stage}_mse": matvec_mse(outcome.probe_products[stage], blocks, probe, validation.product, variant)
                for stage, probe in probes.items()
            }
            metrics = replace(metrics or TensorMetrics.empty(), **probe_mse)
        rows, k = info.shape
        files = {}
        if output_dir is not None:
            # made durable all at once before the manifest (see qstrat.io.atomic)
            files["q8k"] = write_q8k(output_dir / f"{member.stem}.q8k", blocks, rows, k, durable=False)
            runtime_perm = col_perm if kind == "runtime" else None
            if runtime_perm is not None:
                files["perm"] = write_perm(output_dir / f"{member.stem}.perm", runtime_perm, durable=False)
            if "roundtrip" in stages:
                perm_path = output_dir / files["perm"].path if "perm" in files else None
                check_roundtrip(output_dir / files["q8k"].path, blocks, perm_path, runtime_perm)
        result.records.append(
            TensorRecord(
                name=info.name,
                shape=info.shape,
                dtype=info.dtype,
                storage="q8k",
                strategy=job.strategy.name,
                permutation=kind if permutation is not None else "none",
                joint_group=job.group_id if kind == "joint" and permutation is not None else None,
                joint_axis=permutation.axis if kind == "joint" and permutation is not None else None,
                files=files,
                metrics=metrics,
                seconds=time.perf_counter() - begin + shared_seconds,
            )
        )
    return result
