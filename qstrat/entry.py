"""The console commands' entry points.

Ctrl-C and SIGTERM become stop requests (qstrat.interrupts) before anything heavy is
imported: a signal while numba and the commands load ends the process with exit 130 and one
line, as it does later, instead of the signal's default action.
"""

from __future__ import annotations

import sys
from importlib import import_module

from qstrat.errors import Interrupted
from qstrat.interrupts import handle_stop_signals


def _start(module: str) -> None:
    handle_stop_signals()
    try:
        import_module(module).main()  # whose commands report a stop themselves, once under way
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(Interrupted.exit_code) from None


def qstrat() -> None:
    _start("qstrat.cli")


def quantize_q8k() -> None:
    _start("qstrat.legacy_cli")
