"""Read a whole quantized model back into numpy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qstrat.errors import InputError
from qstrat.io.manifest import PASSTHROUGH_NAME, read_manifest
from qstrat.io.names import decode_name
from qstrat.io.q8k import read_perm, read_q8k
from qstrat.io.safetensors import SafetensorsFile, map_tensor, to_float32


def unpermute_columns(stored: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Undo a gather map: stored column j holds original column perm[j]."""
    original = np.empty_like(stored)
    original[:, perm] = stored
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
    for name, entry in manifest["tensors"].items():
        if entry["storage"] == "passthrough":
            if name not in passthrough:
                raise InputError(f"{directory / PASSTHROUGH_NAME}: tensor {name!r} named by the manifest is missing")
            tensors[name] = passthrough[name]
            continue
        files = entry["files"]
        perm_path = directory / files["perm"]["path"] if "perm" in files else None
        tensors[name] = _load_q8k(directory / files["q8k"]["path"], perm_path)
    return tensors


def _load_q8k(path: Path, perm_path: Path | None) -> np.ndarray:
    stored = read_q8k(path)
    values = stored.dequantize()
    if perm_path is None:
        return values
    return unpermute_columns(values, read_perm(perm_path, stored.k))
