"""The same pipeline on a real Dask cluster (scheduler and workers on loopback)."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a tier of its own: python -m pytest -m slow

from qstrat.synthetic import write_model
from tests.conftest import REPO
from tests.helpers import assert_clean_failure, communicate_or_dump_stacks, run_cli

DASK = Path(sys.executable).with_name("dask")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, DASK_DISTRIBUTED__WORKER__DAEMON="False")
    logs = open(tmp_path / "dask.log", "w")
    scheduler = subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                 stdout=logs, stderr=logs, env=env, start_new_session=True)
    workers = [
        subprocess.Popen([str(DASK), "worker", address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1",
                          "--name", f"w{i}"], stdout=logs, stderr=logs, env=env, start_new_session=True)
        for i in range(2)
    ]
    from distributed import Client

    deadline = time.time() + 60
    while True:
        try:
            with Client(address, timeout="2s") as client:
                client.wait_for_workers(2, timeout=30)
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    yield address, workers
    for process in workers + [scheduler]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    logs.close()


def _model(tmp_path, count=40):
    rng = np.random.default_rng(0)
    tensors = {f"blocks.{i}.proj.weight": rng.standard_normal((256, 1024)).astype(np.float32) for i in range(count)}
    return write_model(tmp_path / "model", tensors, dtype="BF16", shards=2)


def _tensor_files(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".q8k", ".perm", ".safetensors")}


def test_dask_output_equals_loky_and_survives_a_killed_worker(tmp_path, cluster):
    address, workers = cluster
    model = _model(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {model}\noutput: unused\nstrategies: [l2_norm]\n")
    reference = tmp_path / "loky"
    assert run_cli("qstrat", "run", str(config), "-o", str(reference), "-q").returncode == 0
    dask_flags = ["--set", "parallel.backend=dask", "--set", f"parallel.address={address}"]
    out = tmp_path / "dask"
    result = run_cli("qstrat", "run", str(config), "-o", str(out), "-q", *dask_flags)
    assert result.returncode == 0, result.stderr
    assert _tensor_files(out) == _tensor_files(reference)
    # the workers loaded the kernels from numba's on-disk cache: nothing was compiled per task
    from distributed import Client

    def _kernel_cache_stats():  # nested, so that it travels to the workers by value
        from qstrat.kernels.q8k import QUANTIZE_KERNELS

        stats = [kernel.stats for kernel in QUANTIZE_KERNELS]
        return sum(sum(s.cache_hits.values()) for s in stats), sum(sum(s.cache_misses.values()) for s in stats)

    with Client(address, timeout="10s") as client:
        stats = client.run(_kernel_cache_stats)
    for worker, (hits, misses) in stats.items():
        assert hits > 0 and misses == 0, (worker, hits, misses)
    # kill one worker mid-run: Dask reschedules its tasks, or the run fails clearly; a rerun completes
    killed = tmp_path / "killed"
    script = Path(sys.executable).with_name("qstrat")
    run = subprocess.Popen([str(script), "run", str(config), "-o", str(killed), "-q", *dask_flags],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = killed / ".qstrat-journal.jsonl"
    while run.poll() is None and (not journal.exists() or len(journal.read_text().splitlines()) < 5):
        time.sleep(0.01)
    os.kill(run.pid, signal.SIGSTOP)  # the run cannot end while its worker is killed
    assert run.poll() is None, "the run ended before a worker was killed"
    os.killpg(workers[0].pid, signal.SIGKILL)
    os.kill(run.pid, signal.SIGCONT)
    _, stderr = communicate_or_dump_stacks(run, 300)
    assert "Traceback" not in stderr
    if run.returncode != 0:
        rerun = run_cli("qstrat", "run", str(config), "-o", str(killed), "-q", *dask_flags)
        assert rerun.returncode == 0, rerun.stderr
    assert _tensor_files(killed) == _tensor_files(reference)
    assert run_cli("qstrat", "verify", str(killed)).returncode == 0


def test_unreachable_scheduler_and_invisible_paths(tmp_path):
    result = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(tmp_path / "o"),
                     "--set", "parallel.backend=dask", "--set", f"parallel.address=tcp://127.0.0.1:{_free_port()}")
    assert_clean_failure(result, "parallel.address", "Dask scheduler")
    from qstrat.pipelines.backends import _paths_visible

    assert "cannot read" in _paths_visible([str(tmp_path / "missing.safetensors")], None)
    assert _paths_visible([], str(tmp_path / "new" / "out")) is None
