"""``manifest.json``: the index of an output directory, written last and atomically.

Its presence means the directory is complete.  It records, per tensor, the files that
hold it (name, size, sha256), its shape, source dtype, strategy and permutation kind,
and its metrics; see ``docs/formats.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

from qstrat.errors import FormatError, InputError
from qstrat.io.atomic import atomic_writer

MANIFEST_NAME = "manifest.json"
PASSTHROUGH_NAME = "passthrough.safetensors"
JOINT_PERMUTATIONS_NAME = "joint_permutations.safetensors"
MANIFEST_FORMAT = "qstrat-output"
MANIFEST_VERSION = 1


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = Path(directory) / MANIFEST_NAME
    encoded = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"
    with atomic_writer(path) as out:
        out.write(encoded)
    return path


def read_manifest(directory: Path) -> dict | None:
    """The manifest of an output directory, validated; None when the directory has none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{path}: not a readable manifest: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise FormatError(f"{path}: not a qstrat manifest (format must be {MANIFEST_FORMAT!r})")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise FormatError(f"{path}: unsupported manifest version {manifest.get('format_version')!r}")
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict):
        raise FormatError(f"{path}: 'tensors' must be an object")
    for name, entry in tensors.items():
        if not isinstance(entry, dict) or entry.get("storage") not in ("q8k", "passthrough"):
            raise FormatError(f"{path}: tensor {name!r}: 'storage' must be 'q8k' or 'passthrough'")
        for file in entry.get("files", {}).values():
            _check_file_entry(path, name, file)
    return manifest


def _check_file_entry(path: Path, name: str, file) -> None:
    if not (
        isinstance(file, dict)
        and isinstance(file.get("path"), str)
        and isinstance(file.get("size"), int)
        and isinstance(file.get("sha256"), str)
    ):
        raise FormatError(f"{path}: tensor {name!r}: each file needs path, size and sha256")
    relative = Path(file["path"])
    if relative.is_absolute() or len(relative.parts) != 1 or relative.name in (".", ".."):
        raise InputError(f"{path}: tensor {name!r}: file {file['path']!r} is outside the output directory")
