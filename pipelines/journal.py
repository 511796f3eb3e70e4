"""Resumable runs: a journal of finished groups (the output directory's lock is io/atomic.output_lock).

The journal (``.qstrat-journal.jsonl``) starts with the run's fingerprint (config and input
identity) and gains one line per finished group, flushed to disk before the next is
recorded.  A rerun with the same fingerprint skips every group whose files still exist with
the recorded sha256; anything else is redone.  Because each file is written atomically and
the manifest last, a run killed at any moment and rerun ends byte-identical to one that was
never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from qstrat.errors import OutputError
from qstrat.io.atomic import atomic_path, describe_os_error, file_sha256
from qstrat.io.manifest import tensor_entry
from qstrat.io.names import JOURNAL_NAME
from qstrat.io.safetensors import HEADER_LENGTH_BYTES, SafetensorsModel
from qstrat.results import TensorRecord
from qstrat.strategies import Permutation

def input_identity(model: SafetensorsModel, with_times: bool = True) -> list[dict[str, object]]:
    """Each input file's name, size, modification time and header hash.  New weights of the same
    shapes (a retrained checkpoint downloaded over the old one) change only the data and the file's
    time; hashing the data itself would read the whole model on every rerun."""
    identity = []
    for file in model.files:
        with open(file.path, "rb") as f:
            header = f.read(file.data_start)
            modified = os.fstat(f.fileno()).st_mtime_ns
        entry = {"file": file.path.name, "size": file.size, "header_sha256": hashlib.sha256(header[HEADER_LENGTH_BYTES:]).hexdigest()}
        identity.append({**entry, "modified_ns": modified} if with_times else entry)
    return identity


def run_fingerprint(settings: dict[str, object], model: SafetensorsModel, with_times: bool = True) -> str:
    """The run's settings and input files, hashed; ``with_times=False``: as qstrat wrote it before
    it held the files' modification times (so that those outputs resume after an upgrade)."""
    document = json.dumps({"settings": settings, "inputs": input_identity(model, with_times)}, sort_keys=True)
    return hashlib.sha256(document.encode()).hexdigest()


def group_key(strategy: str, members: list[str]) -> str:
    return json.dumps([strategy, sorted(members)])


def _intact(entry: dict, directory: Path) -> tuple[list[TensorRecord], dict[str, Permutation]] | None:
    """A journal entry's records and joint permutations if every file it lists is as it says."""
    try:
        records = [TensorRecord.from_manifest_entry(name, tensor_entry(e)) for name, e in entry["records"].items()]
        joint = {name: Permutation(np.asarray(j["perm"], dtype=np.int64), int(j["axis"])) for name, j in entry["joint"].items()}
    except (ValueError, KeyError, TypeError):  # a line of another version: the group is redone
        return None
    for record in records:
        for file in record.files.values():
            if file_sha256(directory / file.path) != file.sha256:
                return None
    return records, joint


class Journal:
    """Finished groups of one fingerprint, read on start and appended as groups finish."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.path = directory / JOURNAL_NAME
        self.fingerprint = fingerprint
        #: the finished groups whose files are intact: each one's journal entry, and what it holds
        self._loaded: dict[str, tuple[dict, tuple[list[TensorRecord], dict[str, Permutation]]]] = {}
        self._file = None

    def previous_fingerprint(self) -> str | None:
        try:
            first = self.path.read_text(encoding="utf-8").split("\n", 1)[0]
            return json.loads(first).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None

    def load(self, directory: Path) -> None:
        """Read the finished groups whose files in ``directory`` are intact (a torn last line from a
        killed run is ignored; a group whose files changed is redone, and dropped from the journal)."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                key = entry["group"]
            except (ValueError, KeyError, TypeError):
                break
            kept = _intact(entry, directory)
            if kept is not None:
                self._loaded[key] = entry, kept
            else:
                self._loaded.pop(key, None)

    def open(self, keep_loaded: bool) -> None:
        """Start the journal afresh under this fingerprint, with the groups loaded from it if
        ``keep_loaded`` (once each: a rerun that redoes groups does not make it grow), then append."""
        try:
            with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
                for entry, _ in self._loaded.values() if keep_loaded else ():
                    f.write(json.dumps(entry, sort_keys=True, allow_nan=False) + "\n")
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as err:
            raise OutputError(describe_os_error(self.path, err)) from None

    def reusable(self, key: str) -> tuple[list[TensorRecord], dict[str, Permutation]] | None:
        """The records and joint permutations of a finished group whose files are intact, else None."""
        loaded = self._loaded.get(key)
        return loaded[1] if loaded is not None else None

    def record(self, key: str, records: list[TensorRecord], joint: dict[str, Permutation]) -> None:
        entry = {
            "group": key,
            "records": {r.name: r.manifest_entry().model_dump() for r in records},
            "joint": {n: {"axis": p.axis, "perm": p.perm.tolist()} for n, p in sorted(joint.items())},
        }
        try:
            # flushed, not fsynced: it survives a killed process, and after a power loss a lost
            # line only means redoing a group (entries are trusted only if the files' hashes match)
            self._file.write(json.dumps(entry, sort_keys=True, allow_nan=False) + "\n")
            self._file.flush()
        except OSError as err:
            raise OutputError(describe_os_error(self.path, err)) from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


