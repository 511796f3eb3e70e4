"""Where the groups run: local worker processes (joblib's loky) or a Dask cluster.

The pipeline is the same on both: joblib dispatches the same tasks, and each task maps its
input and writes its output itself, so a Dask worker must see the same paths as the client
(a shared filesystem); that is checked on every worker before any work is sent.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from qstrat.runconfig import RunConfig
from qstrat.errors import ConfigError, InputError


def local_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def numba_threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Threads per worker so that workers x threads never exceeds the cores."""
    return max(1, (cores or local_cores()) // workers)


def _paths_visible(paths: list[str], output: str | None) -> str | None:
    """Run on a worker: the first path it cannot read, or the output it cannot write (None if all fine)."""
    for path in paths:
        if not os.access(path, os.R_OK):
            return f"cannot read {path}"
    if output is not None:
        probe = Path(output)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            return f"cannot write {output}"
    return None


@contextlib.contextmanager
def execution_backend(config: RunConfig, jobs, output: Path | None) -> Iterator[tuple[int, int]]:
    """Yield (joblib n_jobs, numba threads per task) with the configured backend active.

    One local worker is this process itself: joblib is then not even imported.
    """
    parallel = config.parallel
    if parallel.backend == "loky":
        # more processes than cores only add memory (each maps and decodes tensors of its own)
        workers = min(parallel.workers, len(jobs), local_cores())
        if workers <= 1:
            yield 1, numba_threads_per_worker(1)
            return
        from joblib import parallel_config

        with parallel_config(backend="loky"):
            yield workers, numba_threads_per_worker(workers)
        return
    try:
        from distributed import Client
    except ImportError:
        raise ConfigError("parallel.backend: dask needs the dask extra (pip install 'qstrat[dask]')") from None
    try:  # the address's form was checked with the config (ParallelSection)
        client = Client(parallel.address, timeout="10s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        raise ConfigError(f"parallel.address: cannot reach the Dask scheduler at {parallel.address}: {err}") from None
    try:
        inputs = sorted({str(m.info.path) for job in jobs for m in job.members})
        problems = client.run(_paths_visible, inputs, str(output) if output is not None else None)
        for worker, problem in sorted(problems.items()):
            if problem:
                raise InputError(f"Dask worker {worker} {problem}: workers must share the client's filesystem")
        # numba threads x task threads on a worker never exceed that worker's cores
        threads = client.nthreads()
        cores = client.run(local_cores)
        per_task = min(max(1, cores[w] // max(1, n)) for w, n in threads.items()) if threads else 1
        from joblib import parallel_config

        with parallel_config(backend="dask", client=client, wait_for_workers_timeout=30):
            yield max(1, sum(threads.values())), per_task
    finally:
        client.close()
