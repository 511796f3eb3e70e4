"""Tensor name -> output file name: safe, reversible, collision-free.

Characters outside ``[A-Za-z0-9._-]`` are percent-encoded (UTF-8 bytes as ``%XX``), so a
name can neither leave the output directory (``/``, ``\\``, NUL) nor look like ``..``.
Names too long for a file system entry are cut and suffixed with ``~`` and a hash of the
whole name (``~`` never appears in an encoded name, so this cannot collide with one).
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from pathlib import Path

#: the files of an output directory besides each tensor's own (see docs/formats.md)
MANIFEST_NAME = "manifest.json"
PASSTHROUGH_NAME = "passthrough.safetensors"
JOINT_PERMUTATIONS_NAME = "joint_permutations.safetensors"
#: a run's journal of finished groups and its lock: a journal without a manifest is an unfinished run
JOURNAL_NAME = ".qstrat-journal.jsonl"
LOCK_NAME = ".qstrat.lock"
#: the suffixes of each tensor's own files (.q8k blocks, .perm gather maps, .qblk blocks of another
#: type): in an output directory, one its manifest does not list is a stale one
TENSOR_FILE_SUFFIXES = (".q8k", ".perm", ".qblk")
#: the residual stream's permutation in that file: one for every tensor it permutes
RESIDUAL_PERMUTATION_KEY = "qstrat.residual_stream"
#: a manifest's ``storage`` of the original tool's Q8K (``.q8k`` files); any other type is stored under
#: its registry name
Q8K_STORAGE = "q8k"


def storage_name(type_name: str) -> str:
    """A manifest's ``storage`` of a tensor quantized to block type ``type_name``."""
    return Q8K_STORAGE if type_name == "q8_k" else type_name


def storage_type_name(storage: str) -> str:
    """The registry's block type of a manifest's ``storage`` (a quantized one)."""
    return "q8_k" if storage == Q8K_STORAGE else storage

SAFE_CHARACTERS = re.compile(r"[A-Za-z0-9._-]")
MAX_FILE_NAME_BYTES = 255
HASH_SUFFIX_CHARS = 16
LONGEST_EXTENSION = 8  # room kept for ".q8k", ".perm", and a temporary prefix


def encode_name(name: str) -> str:
    """The file stem for a tensor name (extension not included)."""
    encoded = "".join(ch if SAFE_CHARACTERS.fullmatch(ch) else urllib.parse.quote(ch, safe="") for ch in name)
    if encoded in ("", ".", ".."):
        encoded = urllib.parse.quote(encoded, safe="").replace(".", "%2E") or "%"
    budget = MAX_FILE_NAME_BYTES - LONGEST_EXTENSION - 40  # 40: temp-file prefix and suffix
    if len(encoded) > budget:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_SUFFIX_CHARS]
        encoded = f"{encoded[: budget - HASH_SUFFIX_CHARS - 1]}~{digest}"
    return encoded


def decode_name(stem: str) -> str:
    """The tensor name of a file stem written by the original tool or by :func:`encode_name`."""
    return urllib.parse.unquote(stem)


def assign_file_stems(names: list[str]) -> dict[str, str]:
    """File stems for all tensors of a run, unique even on case-insensitive file systems.

    Names are taken in sorted order, so the result does not depend on the input's order.
    """
    stems: dict[str, str] = {}
    taken: set[str] = set()
    for name in sorted(names):
        stem = encode_name(name)
        if stem.casefold() in taken:
            digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_SUFFIX_CHARS]
            stem = f"{stem[: MAX_FILE_NAME_BYTES - 90]}~{digest}"
        taken.add(stem.casefold())
        stems[name] = stem
    return stems


def unlisted_tensor_files(directory: Path, listed: set[str]) -> list[str]:
    """The names of the tensor files in ``directory`` (by suffix) that ``listed`` does not hold."""
    return sorted(p.name for p in directory.iterdir() if p.suffix in TENSOR_FILE_SUFFIXES and p.is_file() and p.name not in listed)
