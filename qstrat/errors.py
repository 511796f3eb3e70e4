"""One error hierarchy for everything a user can get wrong.

Each class carries the process exit code the CLI uses for it, so the mapping lives
in one place and scripts can tell failures apart (see the README's "Exit codes").
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_OUTPUT = 3
EXIT_THRESHOLD = 4
EXIT_BATCH_PARTIAL = 5
EXIT_WORKER_LOST = 6
EXIT_INTERRUPTED = 130

#: every exit code of both commands: (the few words of ``--help``, the README's sentence)
EXIT_CODES: dict[int, tuple[str, str]] = {
    EXIT_OK: ("success", "success"),
    EXIT_INTERNAL: ("unexpected internal error", "an unexpected internal error (a bug: please report it with the message)"),
    EXIT_USAGE: ("bad input, configuration or usage",
                 "bad input, configuration or usage (the message names the file, tensor, key or line)"),
    EXIT_OUTPUT: ("output not writable or in use",
                  "the output cannot be written (not a directory, permissions, disk full), is in use by another run, "
                  "or holds results of another config (`--force`)"),
    EXIT_THRESHOLD: ("a tensor failed a validation threshold",
                     "a tensor fell past a validation threshold (everything else was written; the manifest lists the failures)"),
    EXIT_BATCH_PARTIAL: ("some models of a batch failed", "some models of a batch failed (the others were written)"),
    EXIT_WORKER_LOST: ("a worker process died (rerun to resume)",
                       "a worker process died (killed, out of memory); rerun the same command to resume"),
    EXIT_INTERRUPTED: ("interrupted", "interrupted (Ctrl-C, SIGTERM)"),
}


def exit_codes_help() -> str:
    """One sentence for ``--help``."""
    return "Exit codes: " + "; ".join(f"{code} {words}" for code, (words, _) in EXIT_CODES.items()) + "."


def exit_codes_table() -> str:
    """The README's table (tests/test_config.py checks that it is there)."""
    rows = [f"| {code} | {sentence} |" for code, (_, sentence) in EXIT_CODES.items()]
    return "\n".join(["| code | meaning |", "| --- | --- |", *rows])


class QstratError(Exception):
    """Base of every user-facing error; ``str(err)`` is a one-line message."""

    exit_code = EXIT_USAGE


class InputError(QstratError):
    """An input file, directory or tensor is missing, malformed or unsupported."""


class FormatError(InputError):
    """A file does not follow its format (safetensors, .q8k, .perm, manifest)."""


class NonFiniteError(InputError):
    """A tensor holds NaN or infinity and cannot be quantized."""


class ConfigError(QstratError):
    """A configuration value, flag or environment variable is invalid."""


class OutputError(QstratError):
    """The output cannot be written (permissions, disk full, busy, inconsistent)."""

    exit_code = EXIT_OUTPUT


class ValidationFailed(QstratError):
    """A quantized tensor fell below a configured quality threshold."""

    exit_code = EXIT_THRESHOLD


class WorkerLost(QstratError):
    """A worker process died mid-run (killed, out of memory); a rerun resumes."""

    exit_code = EXIT_WORKER_LOST


class Interrupted(QstratError):
    """The run was stopped by a signal before it finished."""

    exit_code = EXIT_INTERRUPTED


#: loc entries pydantic adds for the members of a union: not keys a user wrote
_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "StrategyEntry", "QuantizedEntry", "PassthroughEntry"}


def describe_validation_error(err, where: str, lines: dict[tuple, int] | None = None, flags: dict[tuple, str] | None = None) -> str:
    """One line for a pydantic ``ValidationError``: ``where``, then each problem's key (and line);
    a problem under a key that ``flags`` maps (``("strategies",)`` -> ``"--set strategies=[x]"``) is
    that flag's instead."""
    messages, by_flag = [], []
    for problem in err.errors():
        location = tuple(
            p for p in problem["loc"] if not (isinstance(p, str) and (p in _UNION_MEMBERS or p.startswith(("list[", "literal["))))
        )
        key = ".".join(str(p) for p in location) or "(top level)"
        line = next((lines[location[:n]] for n in range(len(location), 0, -1) if location[:n] in lines), None) if lines else None
        text = {"extra_forbidden": "unknown key", "missing": "required key is missing"}.get(problem["type"], problem["msg"])
        text = text.removeprefix("Value error, ")
        flag = next((flags[location[:n]] for n in range(len(location), 0, -1) if location[:n] in flags), None) if flags else None
        if flag is None and flags and location:  # a check of a whole section: the flags that set keys inside it
            flag = ", ".join(v for path, v in flags.items() if path[: len(location)] == location) or None
        if flag:
            by_flag.append(f"{flag}: {key}: {text}")
        else:
            messages.append(f"{f'line {line}: ' if line else ''}{key}: {text}")
    parts = list(dict.fromkeys(by_flag)) + ([f"{where}: " + "; ".join(list(dict.fromkeys(messages)))] if messages else [])
    return "; ".join(parts[:5])

