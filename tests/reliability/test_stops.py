"""Stop requests (Ctrl-C, SIGTERM) land where a run can stop; a worker death is exit 6 whenever noticed."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qstrat import interrupts
from qstrat.config import QuantizationConfig
from qstrat.errors import WorkerLost
from qstrat.interrupts import deferred_stops, interruptible_wait, raise_if_stop_requested
from qstrat.pipelines.run import quantize_model
from qstrat.synthetic import write_model
from tests.helpers import assert_clean_failure, run_cli


@pytest.fixture
def stop_handlers():
    """The command line's handlers in this process, for one test."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    previous_hook = sys.unraisablehook
    interrupts.handle_stop_signals()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = previous_hook
        interrupts._state.requested = False


def test_outside_a_result_loop_a_signal_interrupts_at_once(stop_handlers):
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("not interrupted")
    signal.raise_signal(signal.SIGINT)  # a second one is ignored: cleanup runs whole


def test_in_a_result_loop_a_signal_waits_for_a_stop_point(stop_handlers):
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_stops():
            signal.raise_signal(signal.SIGTERM)
            reached.append("after the signal")
            signal.raise_signal(signal.SIGINT)
            reached.append("after a second one")
            raise_if_stop_requested()
            reached.append("past the stop point")
    assert reached == ["after the signal", "after a second one"]


def test_a_wait_in_a_result_loop_is_interrupted_and_no_request_is_lost(stop_handlers):
    with pytest.raises(KeyboardInterrupt), deferred_stops(), interruptible_wait():
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("not interrupted")
    interrupts._state.requested = False
    with pytest.raises(KeyboardInterrupt), deferred_stops():
        signal.raise_signal(signal.SIGTERM)
        with interruptible_wait():  # a request made before the wait ends it at once
            raise AssertionError("waited")
    interrupts._state.requested = False
    with pytest.raises(KeyboardInterrupt):
        with deferred_stops():
            signal.raise_signal(signal.SIGTERM)
        raise AssertionError("the request was lost at the loop's end")


def test_once_the_command_is_over_signals_are_ignored(stop_handlers):
    interrupts.ignore_stop_signals()  # as the command line does before the interpreter exits
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGINT)


def test_a_stop_python_drops_is_delivered_again(stop_handlers):
    # a signal handled inside a weakref callback or __del__ (seen while a command imported its modules):
    # Python printed "Exception ignored", the command ran on to exit 0, and every later signal was ignored
    class StoppedWhileCollected:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGTERM)  # its handler runs here, inside __del__
            sum(range(1000))

    reached = []
    with pytest.raises(KeyboardInterrupt):
        StoppedWhileCollected()
        reached.append("after the object is gone")
        time.sleep(5)  # a signal ends the sleep
        raise AssertionError("the stop request was lost")
    assert len(reached) <= 1


def _model(tmp_path, count=24):
    rng = np.random.default_rng(0)
    tensors = {f"blocks.{i}.proj.weight": rng.standard_normal((256, 1024)).astype(np.float32) for i in range(count)}
    return write_model(tmp_path / "m", tensors, dtype="BF16")


def test_sigterm_during_a_result_callback_stops_after_it(tmp_path, stop_handlers):
    """The case of issue 15: the signal lands outside joblib's generator, among result callbacks
    (that the workers are gone after the process is tested through the command line)."""
    out = tmp_path / "o"
    calls = []

    def progress(records, nbytes):
        calls.append("begun")
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        calls[-1] = "ended"

    model, config = _model(tmp_path), QuantizationConfig(strategies=["amax"], workers=2)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, config, out, progress)
    assert calls == ["ended"] * 3  # the callback ran to its end, and no result was handled after it
    assert not list(out.glob(".*.tmp-*"))
    assert (out / ".qstrat.lock").read_text() == ""
    assert not (out / "manifest.json").exists()
    # the files written so far are only some of the model's: nothing reads them as a model
    for command in (["convert", str(out), str(tmp_path / "x.gguf")], ["dequantize", str(out), str(tmp_path / "x.safetensors")],
                    ["inspect", str(out)]):
        refused = run_cli("qstrat", *command)
        assert refused.returncode == 2, refused.stderr
        assert_clean_failure(refused, f"{out}: an unfinished qstrat run or convert (a journal, no manifest.json)")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.safetensors").exists()
    interrupts._state.requested = False  # as in a new process
    quantize_model(model, config, out)  # a rerun completes
    assert (out / "manifest.json").exists()


def test_a_worker_death_noticed_while_dispatching_is_a_lost_worker(tmp_path, monkeypatch):
    from joblib import Parallel
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    def broken(self, iterable):
        raise TerminatedWorkerError("A worker process managed by the executor was unexpectedly terminated.")

    monkeypatch.setattr(Parallel, "__call__", broken)
    out = tmp_path / "o"
    with pytest.raises(WorkerLost, match="worker process died"):
        quantize_model(_model(tmp_path), QuantizationConfig(strategies=["amax"], workers=2), out)
    assert (out / ".qstrat.lock").read_text() == ""


def test_a_signal_while_the_command_loads_exits_130(tmp_path):
    # A stand-in for the command's module that receives SIGTERM halfway through its import, as a
    # process stopped while numba loads does: the handler must already be there.
    (tmp_path / "signalled_while_loading.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nraise AssertionError('still loading')\n"
    )
    code = "from qstrat.entry import _start; _start('signalled_while_loading')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "error: interrupted"
    # qstrat run --json: its one JSON line on stdout, even this early, and nothing on stderr
    code = "import sys; sys.argv = ['qstrat', 'run', 'c.yaml', '--json']; " + code.replace("')", "', json_runs=True)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 130 and result.stderr == "", result.stderr
    assert json.loads(result.stdout) == {"models": [], "error": "interrupted", "exit_code": 130}


def test_a_hangup_stops_as_sigterm_does_unless_it_is_ignored(tmp_path):
    (tmp_path / "hung_up.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGHUP)\nprint('went on')\ndef main(): pass\n"
    )
    code = "from qstrat.entry import _start; _start('hung_up')"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    # a terminal's session, whatever this one's is (pytest under nohup ignores SIGHUP, and children inherit that)
    closed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    assert closed.returncode == 130 and closed.stderr.strip() == "error: interrupted", closed.stderr
    # under nohup SIGHUP is ignored: it stays so (the run goes on)
    nohup = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                           preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert nohup.returncode == 0 and nohup.stdout.strip() == "went on", nohup.stderr


def test_the_entry_points_take_signals_before_anything_heavy_loads():
    code = "import sys, qstrat.entry; print(sorted(m for m in ('numba', 'numpy', 'typer') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
