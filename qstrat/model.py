"""Read a whole quantized model back into numpy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qstrat.errors import InputError
from qstrat.io.manifest import JOINT_PERMUTATIONS_NAME, PASSTHROUGH_NAME, read_manifest
from qstrat.io.names import decode_name
from qstrat.io.q8k import check_permutation, read_perm, read_q8k
from qstrat.io.safetensors import SafetensorsFile, map_tensor, to_float32


def unpermute(stored: np.ndarray, perm: np.ndarray, axis: int = 1) -> np.ndarray:
    """Undo a gather map along ``axis``: stored index i holds original index perm[i]."""
    original = np.empty_like(stored)
    index = [slice(None)] * stored.ndim
    index[axis] = perm
    original[tuple(index)] = stored
    return original


def _load_passthrough(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    file = SafetensorsFile(path)
    # bfloat16 has no numpy dtype: it comes back as exactly equal float32 values
    return {name: np.array(to_float32(info, map_tensor(info))) for name, info in file.tensors.items()}


def load_model(output_dir: str | os.PathLike, original: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a quantized model as numpy arrays, by name.

    Quantized tensors are dequantized to float32 with any run-time permutation (``.perm``)
    undone; passed-through tensors come back as stored (bfloat16 as float32, exactly).
    ``original=True`` also undoes function-preserving joint permutations, so every tensor
    is in its source layout.  A directory written by the original Rust tool (``.q8k`` and
    ``.perm`` files, no manifest) loads too.
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        raise InputError(f"{directory}: not an output directory")
    manifest = read_manifest(directory)
    tensors: dict[str, np.ndarray] = {}
    if manifest is None:
        q8k_files = sorted(directory.glob("*.q8k"))
        if not q8k_files:
            raise InputError(f"{directory}: no manifest.json and no .q8k files; not a quantized model")
        for path in q8k_files:
            perm_path = path.with_suffix(".perm")
            tensors[decode_name(path.stem)] = _load_q8k(path, perm_path if perm_path.exists() else None)
        tensors.update(_load_passthrough(directory / PASSTHROUGH_NAME))
        return tensors
    passthrough = _load_passthrough(directory / PASSTHROUGH_NAME)
    joint = _load_passthrough(directory / JOINT_PERMUTATIONS_NAME) if original else {}
    for name, entry in manifest["tensors"].items():
        tensors[name] = _load_entry(directory, name, entry, passthrough)
        if original and "joint" in entry:
            if name not in joint:
                raise InputError(f"{directory / JOINT_PERMUTATIONS_NAME}: no joint permutation for tensor {name!r}")
            axis = int(entry["joint"]["axis"])
            check_permutation(joint[name], tensors[name].shape[axis], f"{directory / JOINT_PERMUTATIONS_NAME}: {name}")
            tensors[name] = unpermute(tensors[name], joint[name], axis)
    return tensors


def _load_entry(directory: Path, name: str, entry: dict, passthrough: dict[str, np.ndarray]) -> np.ndarray:
    if entry["storage"] == "passthrough":
        if name not in passthrough:
            raise InputError(f"{directory / PASSTHROUGH_NAME}: tensor {name!r} named by the manifest is missing")
        return passthrough[name]
    files = entry["files"]
    perm_path = directory / files["perm"]["path"] if "perm" in files else None
    return _load_q8k(directory / files["q8k"]["path"], perm_path)


def _load_q8k(path: Path, perm_path: Path | None) -> np.ndarray:
    stored = read_q8k(path)
    values = stored.dequantize()
    if perm_path is None:
        return values
    return unpermute(values, read_perm(perm_path, stored.k))
