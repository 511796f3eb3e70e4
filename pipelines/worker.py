"""The work of one group in a worker process: map, permute, quantize, measure, write.

Workers receive only file paths and offsets (a plan entry), never tensor data: each maps
the input itself and writes its own output files.
"""

from __future__ import annotations

import time
from pathlib import Path

import numba

from qstrat.blocks import KERNEL_STORAGE
from qstrat.io.q8k import write_perm, write_q8k
from qstrat.io.safetensors import map_tensor
from qstrat.quantize import quantize_matrix
from qstrat.results import TensorRecord
from qstrat.pipelines.plan import GroupJob


def quantize_group(
    job: GroupJob, variant: str, measure: bool, output_dir: Path, numba_threads: int
) -> list[TensorRecord]:
    """Quantize every member of ``job`` and write its .q8k (and .perm) files."""
    numba.set_num_threads(numba_threads)
    started = time.perf_counter()
    arrays = {m.info.name: map_tensor(m.info).view(KERNEL_STORAGE[m.info.dtype]) for m in job.members}
    permutations = job.strategy.column_permutations(arrays)
    shared_seconds = (time.perf_counter() - started) / len(job.members)
    records = []
    for member in job.members:
        begin = time.perf_counter()
        info = member.info
        perm = permutations[info.name]
        blocks, metrics = quantize_matrix(arrays[info.name], variant, perm, tensor_name=info.name, measure=measure)
        rows, k = info.shape
        files = {"q8k": write_q8k(output_dir / f"{member.stem}.q8k", blocks, rows, k)}
        if perm is not None:
            files["perm"] = write_perm(output_dir / f"{member.stem}.perm", perm)
        records.append(
            TensorRecord(
                name=info.name,
                shape=info.shape,
                dtype=info.dtype,
                storage="q8k",
                strategy=job.strategy.name,
                permutation=job.strategy.permutation_kind if perm is not None else "none",
                files=files,
                metrics=metrics,
                seconds=time.perf_counter() - begin + shared_seconds,
            )
        )
    return records
