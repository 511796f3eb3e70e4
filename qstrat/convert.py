"""``qstrat convert``: an output directory (qstrat's or the original tool's) to GGUF and back,
without re-quantizing: the Q8_K bytes move unchanged."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from qstrat._version import __version__
from qstrat.errors import InputError, OutputError
from qstrat.io.atomic import describe_os_error
from qstrat.io.gguf import GGUFModel, write_gguf
from qstrat.io.manifest import (
    JOINT_PERMUTATIONS_NAME,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    PASSTHROUGH_NAME,
    write_manifest,
)
from qstrat.io.names import assign_file_stems
from qstrat.io.q8k import write_perm, write_q8k
from qstrat.io.safetensors import write_safetensors
from qstrat.kernels import BLOCK_BYTES, QK_K
from qstrat.model import QuantizedModel

#: GGML type id -> safetensors dtype tag, for tensors that were passed through
_PASSTHROUGH_TYPES = {0: "F32", 1: "F16", 30: "BF16", 28: "F64", 24: "I8", 25: "I16", 26: "I32", 27: "I64"}
Q8_K = 15


def gguf_metadata(model: QuantizedModel) -> dict[str, object]:
    manifest = model.manifest or {}
    source = manifest.get("source", {})
    return {
        "architecture": source.get("architecture") or "qstrat",
        "name": source.get("name") or model.directory.name,
        "variant": manifest.get("variant") or "unknown",
        "config": manifest.get("config") or {},
    }


def directory_to_gguf(output_dir: str | os.PathLike, target: str | os.PathLike) -> Path:
    """One GGUF file from an output directory; directories of the original Rust tool work too."""
    model = QuantizedModel(output_dir)
    return write_gguf(model, target, gguf_metadata(model))


def gguf_to_directory(source: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """An output directory (.q8k, .perm, passthrough, manifest) from a qstrat GGUF file."""
    model = GGUFModel(source)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(describe_os_error(out, err)) from None
    names = model.model_tensors()
    quantized = [n for n in names if int(model.tensors[n].tensor_type) == Q8_K]
    stems = assign_file_stems(quantized)
    entries: dict[str, dict] = {}
    passthrough, joint = [], []
    for name in names:
        tensor = model.tensors[name]
        shape = [int(d) for d in reversed(tensor.shape.tolist())]
        if name in stems:
            rows, k = shape
            if k % QK_K:
                raise InputError(f"{model.path}: Q8_K tensor {name!r} has row length {k}")
            blocks = np.asarray(tensor.data).reshape(rows * (k // QK_K), BLOCK_BYTES)
            files = {"q8k": write_q8k(out / f"{stems[name]}.q8k", blocks, rows, k)}
            if name + ".perm" in model.perm_names:
                files["perm"] = write_perm(out / f"{stems[name]}.perm", np.asarray(model.tensors[name + ".perm"].data))
            entries[name] = {"storage": "q8k", "shape": shape, "dtype": "unknown", "strategy": None,
                             "permutation": "runtime" if "perm" in files else "none", "files": files, "metrics": None}
        else:
            tag = _PASSTHROUGH_TYPES.get(int(tensor.tensor_type))
            if tag is None:
                raise InputError(f"{model.path}: tensor {name!r} has GGML type {int(tensor.tensor_type)}, not one qstrat writes")
            raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
            passthrough.append((name, tag, tuple(shape), raw))
            entries[name] = {"storage": "passthrough", "shape": shape, "dtype": tag, "permutation": "none", "reason": "from GGUF"}
        companion = name + ".joint_perm"
        if companion in model.joint_axes:
            joint.append((name, "I64", (len(model.tensors[companion].data),), np.asarray(model.tensors[companion].data).astype("<i8")))
            entries[name]["permutation"] = "joint"
            entries[name]["joint"] = {"group": None, "axis": model.joint_axes[companion]}
    size, sha = write_safetensors(out / PASSTHROUGH_NAME, passthrough)
    for name, *_ in passthrough:
        entries[name]["files"] = {"safetensors": {"path": PASSTHROUGH_NAME, "size": size, "sha256": sha}}
    if joint:
        jsize, jsha = write_safetensors(out / JOINT_PERMUTATIONS_NAME, joint)
        for name, *_ in joint:
            entries[name]["files"]["joint_perm"] = {"path": JOINT_PERMUTATIONS_NAME, "size": jsize, "sha256": jsha}
    for entry in entries.values():
        entry["files"] = {role: (vars(f) if not isinstance(f, dict) else f) for role, f in entry["files"].items()}
    write_manifest(out, {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "tool": {"name": "qstrat", "version": __version__},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(model.path), "architecture": model.architecture, "name": model.name, "files": [model.path.name]},
        "config": model.config,
        "variant": model.variant,
        "tensors": entries,
        "validation": {"failed": []},
    })
    return out
