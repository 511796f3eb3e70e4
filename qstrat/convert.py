"""``qstrat convert``: an output directory (qstrat's or the original tool's) to GGUF and back,
without re-quantizing: the Q8_K bytes move unchanged."""

from __future__ import annotations

import os
from pathlib import Path

from qstrat.io.gguf import gguf_to_directory, write_gguf
from qstrat.model import QuantizedModel
from qstrat.presets import file_type


def gguf_metadata(model: QuantizedModel) -> dict[str, object]:
    manifest = model.manifest  # None for a directory of the original tool
    preset = manifest.config.get("preset") if manifest else None
    return {
        "file_type": file_type(preset) if preset else None,
        "architecture": (manifest and manifest.source.architecture) or "qstrat",
        "name": (manifest and manifest.source.name) or model.directory.name,
        "variant": (manifest and manifest.variant) or "unknown",
        "config": (manifest and manifest.config) or {},
    }


def directory_to_gguf(output_dir: str | os.PathLike, target: str | os.PathLike) -> Path:
    """One GGUF file from an output directory; directories of the original Rust tool work too."""
    model = QuantizedModel(output_dir)
    return write_gguf(model, target, gguf_metadata(model))


__all__ = ["directory_to_gguf", "gguf_metadata", "gguf_to_directory"]
