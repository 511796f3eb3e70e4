"""The console commands' entry points.

Ctrl-C and SIGTERM become stop requests (qstrat.interrupts) before anything heavy is
imported: a signal while numba and the commands load ends the process with exit 130 and one
line, as it does later, instead of the signal's default action.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from importlib import import_module

from qstrat.errors import Interrupted
from qstrat.interrupts import handle_stop_signals


#: a write's errors when the reader has gone: a closed pipe (``| head``), a closed terminal (hangup)
_READER_GONE = (errno.EPIPE, errno.EIO)


class _ReaderGoneGuard:
    """A standard stream that stops writing once its reader has gone (``qstrat run ... | head -1``,
    a terminal closed under the run): the command goes on to its end and exit code, as it would with
    its output in a file, instead of failing half-way on a broken pipe."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._gone = False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except OSError as err:
                if err.errno not in _READER_GONE:
                    raise
                self._reader_gone()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except OSError as err:
                if err.errno not in _READER_GONE:
                    raise
                self._reader_gone()

    def _reader_gone(self) -> None:
        self._gone = True
        # what is left in the stream's buffer is flushed at exit: into /dev/null, where it cannot fail
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def run_json_line(models: list[dict], exit_code: int, error: str | None = None, warnings: list[str] | tuple = ()) -> str:
    """``qstrat run --json``'s one line: each model's outcome, the exit code, what stopped the run
    (``error``) if something did, and the run's warnings if there are any."""
    return json.dumps({"models": models, "exit_code": exit_code, **({"error": error} if error is not None else {}),
                       **({"warnings": list(warnings)} if warnings else {})})


def _is_run_json(argv: list[str]) -> bool:
    """``qstrat run ... --json``: its one line on stdout is promised whatever stops it, a signal
    while the command still loads included."""
    words = [a for a in argv if not a.startswith("-")]
    return bool(words) and words[0] == "run" and "--json" in argv


def _start(module: str, json_runs: bool = False) -> None:
    """Run ``module``'s ``main``; ``json_runs``: its ``run --json`` promises a JSON line (qstrat's)."""
    handle_stop_signals()
    sys.stdout, sys.stderr = _ReaderGoneGuard(sys.stdout), _ReaderGoneGuard(sys.stderr)
    try:
        import_module(module).main()  # whose commands report a stop themselves, once under way
    except KeyboardInterrupt:
        if json_runs and _is_run_json(sys.argv[1:]):
            print(run_json_line([], Interrupted.exit_code, "interrupted"), flush=True)
        else:
            print("error: interrupted", file=sys.stderr)
        raise SystemExit(Interrupted.exit_code) from None


def qstrat() -> None:
    _start("qstrat.cli", json_runs=True)


def quantize_q8k() -> None:
    _start("qstrat.legacy_cli")
