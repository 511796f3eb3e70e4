"""kill -9 of the main process or of one worker at seeded points: a rerun ends identical."""

import contextlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qstrat.synthetic import write_model
from tests.helpers import communicate_or_dump_stacks, group_members, journal_lines, loky_workers, run_cli, wait_for


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("kills")
    rng = np.random.default_rng(0)
    tensors = {f"blocks.{i}.proj.weight": rng.standard_normal((512, 1024)).astype(np.float32) for i in range(120)}
    model = write_model(base / "model", tensors, dtype="BF16", shards=3)
    config = base / "c.yaml"
    config.write_text(f"input: {model}\noutput: unused\nstrategies: [amax]\nparallel: {{workers: 2}}\n")
    reference = base / "reference"
    assert run_cli("qstrat", "run", str(config), "-o", str(reference), "-q").returncode == 0
    return config, reference


def _tensor_files(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith((".", "report.")) and p.name != "manifest.json"}


@pytest.mark.parametrize("seed", range(8))
def test_kill_then_rerun_is_identical(tmp_path, model_and_reference, seed):
    config, reference = model_and_reference
    rng = random.Random(seed)
    out = tmp_path / "o"
    target_worker = seed % 2 == 1  # odd seeds kill one worker, even seeds the main process
    # a seeded moment: once a worker runs, and once that many of 120 groups are journaled (seeds 0, 1:
    # as soon as a worker exists, while the first batches are dispatched), with most of the work ahead
    journaled = 0 if seed < 2 else rng.randrange(1, 30)
    process = subprocess.Popen([str(Path(sys.executable).with_name("qstrat")), "run", str(config), "-o", str(out), "-q"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: process.poll() is not None or loky_workers(process.pid), 120, "a worker process")
        wait_for(lambda: process.poll() is not None or journal_lines(out) > journaled, 120, f"{journaled} journaled groups")
        os.killpg(process.pid, signal.SIGSTOP)  # nothing moves while the victim is picked
        assert process.poll() is None, f"the run ended before {journaled} groups were journaled"
        if target_worker:
            workers = loky_workers(process.pid)
            assert workers, "no worker process to kill"
            os.kill(workers[0], signal.SIGKILL)  # raises if it killed nothing
            os.killpg(process.pid, signal.SIGCONT)
        else:  # the main process, with its workers, as `kill -9 -PGID` (or the OOM killer's cgroup) would
            os.killpg(process.pid, signal.SIGKILL)
        _, stderr = communicate_or_dump_stacks(process, 300)
        assert "Traceback" not in stderr
        if target_worker:
            assert process.returncode == 6 and "worker process died" in stderr, stderr
            # the other worker was terminated with the run; the resource trackers end with it
            wait_for(lambda: not group_members(process.pid), 10, f"no process of the run left ({workers})")
            assert (out / ".qstrat.lock").read_text() == ""
            assert not list(out.glob(".*.tmp-*"))
        else:
            assert process.returncode == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    rerun = run_cli("qstrat", "run", str(config), "-o", str(out), "-q")
    assert rerun.returncode == 0, rerun.stderr
    assert _tensor_files(out) == _tensor_files(reference)
    assert run_cli("qstrat", "verify", str(out)).returncode == 0
