"""Soak check of stopping: SIGTERM at seeded moments of a 2-worker run, then a rerun.

    python benchmarks/soak_sigterm.py                 # 50 runs of a 200 MB model (~25 min on 2 cores)
    python benchmarks/soak_sigterm.py --runs 5 --mb 60

Each run gets one SIGTERM at a moment drawn (seeded) over the first 70 % of the worker phase of
an uninterrupted run (from the moment a worker process exists to the run's exit: results,
then files made durable, reports, manifest), a tenth of them during start-up instead; each must end within 10 s with exit 130 (or 0 with a complete output, when
the signal came after the command had completed, while the process exited), no traceback, no process of its
group left, no temporaries, the lock released; the rerun of the same command must complete
byte-identical to the uninterrupted run.  Prints one line per run and a summary; exits 1 if
any run broke a rule.  Not part of the test suite: it takes minutes, and its figures are
the README's.
"""

from __future__ import annotations

import argparse
import fcntl
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from qstrat.synthetic import write_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import group_members, journal_lines, loky_workers, wait_for  # noqa: E402

EXIT_WITHIN_S = 10.0
QSTRAT = str(Path(sys.executable).with_name("qstrat"))


def tensor_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith((".", "report.")) and p.name != "manifest.json"}


def lock_is_free(out: Path) -> bool:
    with open(out / ".qstrat.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        handle.seek(0)
        return handle.read() == ""  # an empty lock file names nobody


def run(config: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([QSTRAT, "run", str(config), "-o", str(out), "-q"], capture_output=True, text=True, timeout=600)


def start(config: Path, out: Path) -> tuple[subprocess.Popen, float]:
    """A run in its own process group, and when it started."""
    process = subprocess.Popen([QSTRAT, "run", str(config), "-o", str(out), "-q"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    return process, time.perf_counter()


def wait_for_workers(process: subprocess.Popen) -> None:
    wait_for(lambda: process.poll() is not None or loky_workers(process.pid), 120, "a worker process")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--mb", type=int, default=200, help="model size in MB (BF16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="qstrat-soak-"))
    try:
        tensors = args.mb // 2  # 1024 x 1024 BF16: 2 MB each
        values = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
        model = write_model(work / "model", {f"blocks.{i}.weight": np.roll(values, i, axis=1) for i in range(tensors)}, dtype="BF16", shards=3)
        config = work / "c.yaml"
        config.write_text(f"input: {model}\noutput: unused\nstrategies: [l2_norm]\nparallel: {{workers: 2}}\n")
        reference, started = start(config, work / "reference")
        wait_for_workers(reference)
        startup = time.perf_counter() - started
        _, stderr = reference.communicate(timeout=600)
        assert reference.returncode == 0, stderr
        worker_phase = time.perf_counter() - started - startup
        expected = tensor_files(work / "reference")
        print(f"model: {tensors} tensors, {args.mb} MB BF16, {tensors} groups; an uninterrupted 2-worker run: "
              f"{startup:.1f} s of start-up, then {worker_phase:.1f} s with workers", flush=True)
        exits, codes, failures, landed_before_end, completed_anyway = [], Counter(), [], 0, 0
        for index in range(args.runs):
            out = work / "o"
            shutil.rmtree(out, ignore_errors=True)
            during_startup = rng.random() < 0.1
            process, started = start(config, out)
            if during_startup:
                time.sleep(rng.uniform(0.0, startup))
            else:
                wait_for_workers(process)
                time.sleep(rng.uniform(0.0, 0.7 * worker_phase))
            moment = time.perf_counter() - started
            problems, landed = [], process.poll() is None
            if not landed and process.returncode != 0:
                problems.append(f"the run failed (exit {process.returncode}) before the signal")
            done_at_signal = max(0, journal_lines(out) - 1)  # less the fingerprint line
            signalled = time.perf_counter()
            process.send_signal(signal.SIGTERM)
            try:
                _, stderr = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                _, stderr = process.communicate()
            seconds = time.perf_counter() - signalled
            if landed:
                landed_before_end += 1
                exits.append(seconds)
                codes[process.returncode] += 1
                if seconds > EXIT_WITHIN_S:
                    problems.append(f"exit after {seconds:.1f} s")
                # A signal after the command's result is decided (the output complete, the process
                # still exiting) is ignored by design: exit 0 with a complete output is right then.
                completed = process.returncode == 0 and (out / "manifest.json").exists() and not stderr.strip()
                if completed:
                    completed_anyway += 1
                elif process.returncode != 130:
                    problems.append(f"exit code {process.returncode}")
                if not completed and ("Traceback" in stderr or "interrupted" not in stderr):
                    problems.append(f"stderr: {stderr.strip()[-300:]!r}")
            left = group_members(process.pid)
            if left:
                problems.append(f"processes left: {left}")
                subprocess.run(["kill", "-9", *map(str, left)], check=False)
            if list(out.glob(".*.tmp-*")):
                problems.append("temporaries left")
            if out.exists() and not lock_is_free(out):
                problems.append("lock held")
            rerun = run(config, out)
            if rerun.returncode != 0:
                problems.append(f"rerun exit {rerun.returncode}: {rerun.stderr.strip()[-300:]!r}")
            elif tensor_files(out) != expected:
                problems.append("rerun differs from the uninterrupted run")
            failures += [f"run {index}: {p}" for p in problems]
            outcome = f"exit {process.returncode} after {seconds:.2f} s" if landed else "the run had ended"
            print(f"run {index:2d}: signal at {moment:5.2f} s ({done_at_signal:3d}/{tensors} groups journaled), "
                  f"{outcome}{'; ' + '; '.join(problems) if problems else ''}", flush=True)
        print(f"\n{args.runs} runs, {landed_before_end} signals landed before the run's end; time from SIGTERM to exit: "
              f"median {statistics.median(exits):.2f} s, max {max(exits):.2f} s; exit codes: {dict(codes)} ({completed_anyway} of "
              f"them after the command had completed, while the process exited); problems: {len(failures)}")
        for failure in failures:
            print(f"  {failure}")
        return 1 if failures else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
