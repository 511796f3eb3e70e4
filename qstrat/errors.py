"""One error hierarchy for everything a user can get wrong.

Each class carries the process exit code the CLI uses for it, so the mapping lives
in one place and scripts can tell failures apart (see the README's "Exit codes").
"""

from __future__ import annotations


class QstratError(Exception):
    """Base of every user-facing error; ``str(err)`` is a one-line message."""

    exit_code = 2


class InputError(QstratError):
    """An input file, directory or tensor is missing, malformed or unsupported."""

    exit_code = 2


class FormatError(InputError):
    """A file does not follow its format (safetensors, .q8k, .perm, manifest)."""


class NonFiniteError(InputError):
    """A tensor holds NaN or infinity and cannot be quantized."""


class ConfigError(QstratError):
    """A configuration value, flag or environment variable is invalid."""

    exit_code = 2


class OutputError(QstratError):
    """The output cannot be written (permissions, disk full, busy, inconsistent)."""

    exit_code = 3


class ValidationFailed(QstratError):
    """A quantized tensor fell below a configured quality threshold."""

    exit_code = 4


class WorkerLost(QstratError):
    """A worker process died mid-run (killed, out of memory); a rerun resumes."""

    exit_code = 6


class Interrupted(QstratError):
    """The run was stopped by a signal before it finished."""

    exit_code = 130


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

