"""``qstrat convert``: an output directory (qstrat's or the original tool's) to GGUF and back,
without re-quantizing: the Q8_K bytes move unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

from qstrat.errors import InputError, OutputError
from qstrat.io.atomic import TEMP_MARKER, atomic_path, describe_os_error, output_lock, remove_stale_temporaries
from qstrat.io.gguf import KEY_PREFIX, LLAMA_LAYOUT, GGUFModel, check_unpackable, unpack_gguf, write_gguf
from qstrat.io.names import JOURNAL_NAME, LOCK_NAME, MANIFEST_NAME, unlisted_tensor_files
from qstrat.io.gguf_read import is_gguf_name
from qstrat.model import QuantizedModel
from qstrat.presets import file_type

#: block type of a uniform ``format`` -> llama.cpp's file type (gguf.LlamaFileType member), where
#: one exists; Q3_K, Q4_K and Q5_K only exist as llama.cpp's _S/_M/_L mixtures (use a preset)
FORMAT_FILE_TYPES = {
    "f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
    "q2_k": "MOSTLY_Q2_K", "q6_k": "MOSTLY_Q6_K", "iq4_nl": "MOSTLY_IQ4_NL",
}


def _file_type(config: dict) -> int | None:
    """general.file_type: a preset's, or a uniform format's when llama.cpp has one."""
    import gguf

    if config.get("preset"):
        return file_type(str(config["preset"]))
    name = FORMAT_FILE_TYPES.get(str(config.get("format")))
    if name is None or config.get("format_rules"):
        return None
    return int(gguf.LlamaFileType[name])


def _source_config(source: Path | None) -> dict:
    if source is None:
        return {}
    directory = source if source.is_dir() else source.parent
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def llama_layout(model: QuantizedModel, source: Path | None):
    """(LlamaLayout or None, why not): whether this output is written in llama.cpp's layout."""
    from qstrat.llama_gguf import LLAMA_FAMILY, plan_layout

    manifest = model.manifest
    architecture = manifest.source.architecture if manifest else None
    if any("q8k" in e.files for e in model.entries.values()):
        return None, "it holds Q8_K weights, which llama.cpp cannot run (Candle's Q8K path loads this container)"
    if architecture not in LLAMA_FAMILY:
        return None, f"not a Llama-family model (model_type {architecture!r})"
    if any("perm" in e.files for e in model.entries.values()):
        return None, "it holds run-time permutations (.perm gather maps), which llama.cpp cannot apply"
    hparams = _source_config(source)
    if not hparams:
        return None, "the source model's config.json is not at hand"
    shapes = {}
    for name, entry in model.entries.items():
        shapes[name] = tuple(model.quantized_shape(name) if entry.quantized else model.passthrough_info(name).shape)
    directory = source if source is not None and source.is_dir() else (source.parent if source is not None else None)
    return plan_layout(shapes, hparams, directory)


#: keys a GGUF input's metadata does not carry over: the writer sets them itself, for this file
_REWRITTEN_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def _names_mapped_back(reader, names) -> bool:
    """Whether ``names`` are not the tensor names of the GGUF ``reader`` reads but the Hugging Face
    names a file in llama.cpp's layout maps them back to (a directory ``qstrat convert`` made from it;
    a run whose input was that file keeps its names)."""
    layout = reader.fields.get(KEY_PREFIX + "layout")
    return layout is not None and str(layout.contents()) == LLAMA_LAYOUT and not set(names) <= {t.name for t in reader.tensors}


def carried_fields(reader, source: str | os.PathLike) -> list[tuple[str, object, object, object]]:
    """(key, value, GGUF value type, element type of an array) of every key-value pair of a
    GGUF input (``reader``: its gguf.GGUFReader, of the file ``source``) that its output keeps:
    hyperparameters, vocabulary, chat template, general.*."""
    import gguf

    fields = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith(KEY_PREFIX) or key in _REWRITTEN_KEYS:
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY and len(field.types) == 1:
            # dropped, the key could be one llama.cpp requires (tokenizer.ggml.merges of a BPE vocabulary)
            raise InputError(f"{source}: metadata {key!r} is an empty array, which the GGUF writer (gguf-py) cannot write")
        element_type = field.types[1] if value_type == gguf.GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), value_type, element_type))
    return fields


def gguf_metadata(model: QuantizedModel, source: str | os.PathLike | None = None) -> dict[str, object]:
    """What write_gguf needs; ``source`` is the source model (default: the manifest's source path).
    ``layout`` is llama.cpp's layout when the model is Llama-family and llama.cpp can run its
    weights, else None and ``not_llama_cpp`` says why."""
    manifest = model.manifest  # None for a directory of the original tool
    config = (manifest and manifest.config) or {}
    if source is None and manifest is not None:
        source = manifest.source.path
    q8k = any("q8k" in e.files for e in model.entries.values())
    reader = None
    if source is not None and is_gguf_name(source) and Path(source).is_file() and not q8k:
        from qstrat.io.gguf_read import open_gguf

        reader = open_gguf(source)  # parsed once: a large vocabulary takes a second or more
        if KEY_PREFIX + "version" in reader.fields and KEY_PREFIX + "layout" not in reader.fields:
            reader = None  # qstrat's generic container: written again as such (carried over, it changed)
    if reader is not None:
        if _names_mapped_back(reader, model.entries):
            # the directory came from a file qstrat wrote in llama.cpp's layout, its tensors mapped back to
            # Hugging Face names: carrying that file's metadata over them gives a file llama.cpp refuses
            raise InputError(
                f"{model.directory}: converted from {source}, a GGUF in llama.cpp's layout; qstrat writes that layout "
                "again only from a run's output directory whose source model (config.json, tokenizer) is at hand: "
                "use that GGUF itself, or convert the run's own output directory"
            )
        # a GGUF input: its names, metadata and vocabulary carry over, as llama-quantize keeps them;
        # a directory only converted from it (no run: no fingerprint) holds its tensors, of its file type
        converted = manifest is not None and manifest.fingerprint is None
        file_type = _file_type(config)
        if converted:
            source_type = reader.fields.get("general.file_type")
            if source_type is not None and (len(source_type.types) != 1 or type(source_type.contents()) is not int):
                raise InputError(f"{source}: general.file_type is not an integer")
            file_type = int(source_type.contents()) if source_type is not None else None
        return {
            "file_type": file_type,
            "architecture": (manifest and manifest.source.architecture) or "qstrat",
            "name": None,
            "variant": (manifest and manifest.variant) or "unknown",
            "config": config,
            "layout": None,
            "carried": carried_fields(reader, source),
            "not_llama_cpp": None,
        }
    layout, why_not = llama_layout(model, Path(source) if source is not None else None)
    return {
        # a uniform format's file type describes a llama.cpp model only; a preset's is written in any case
        "file_type": _file_type(config) if layout is not None or config.get("preset") else None,
        "architecture": (manifest and manifest.source.architecture) or "qstrat",
        "name": (manifest and manifest.source.name) or model.directory.name,
        "variant": (manifest and manifest.variant) or "unknown",
        "config": config,
        "layout": layout,
        "not_llama_cpp": why_not if layout is None else None,
    }


def directory_to_gguf(output_dir: str | os.PathLike, target: str | os.PathLike) -> Path:
    """One GGUF file from an output directory; directories of the original Rust tool work too.
    A Llama-family model whose source directory is still at hand is written for llama.cpp."""
    from qstrat.io.manifest import read_manifest
    from qstrat.model import as_directory

    manifest = read_manifest(Path(output_dir)) if Path(output_dir).is_dir() else None
    source = manifest.source.path if manifest is not None else None
    # a directory written with outputs: [gguf] holds its tensors in its container: read them from there
    with as_directory(output_dir) as directory:
        model = QuantizedModel(directory)
        return write_gguf(model, target, gguf_metadata(model, source))


def _holds_qstrat_manifest(directory: Path) -> bool:
    from qstrat.io.manifest import read_manifest

    try:
        return read_manifest(directory) is not None
    except (InputError, OSError):
        return False


def gguf_to_directory(source: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """An output directory (.q8k / .qblk, .perm, passthrough, manifest) from a qstrat GGUF file.

    As a run does, under the directory's lock: the previous manifest goes first and a journal marks
    the directory unfinished until the new manifest is written, so a convert stopped half-way leaves
    a directory every reader refuses (the same command finishes it), never one that reads as a
    complete model; tensor files of a model converted there before are removed.  A directory holding
    files qstrat did not write is refused."""
    model = GGUFModel(source)
    model.check_intact()  # a changed file must not come out with fresh checksums
    types = model.checked_types()  # every tensor checked first: a bad file leaves the target untouched
    check_unpackable(model, types)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        others = {e.name for e in out.iterdir() if e.name != LOCK_NAME and TEMP_MARKER not in e.name}
    except OSError as err:
        raise OutputError(describe_os_error(out, err)) from None
    if others and JOURNAL_NAME not in others and not _holds_qstrat_manifest(out):
        raise OutputError(f"output {out} holds files qstrat did not write (no qstrat {MANIFEST_NAME}); convert into a new or empty directory")
    with output_lock(out):
        try:
            # what a convert killed with SIGKILL left (a dequantize into this directory may be writing: kept)
            remove_stale_temporaries(out, keep_live_writers=True)
            (out / MANIFEST_NAME).unlink(missing_ok=True)
            with atomic_path(out / JOURNAL_NAME) as tmp:
                tmp.write_text(json.dumps({"fingerprint": None, "convert": str(model.path.resolve())}) + "\n", encoding="utf-8")
        except OSError as err:
            raise OutputError(describe_os_error(out, err)) from None
        unpack_gguf(model, out, types)
        from qstrat.io.manifest import read_manifest

        listed = {f.path for e in read_manifest(out).tensors.values() for f in e.files.values()}
        try:
            for stale in unlisted_tensor_files(out, listed):
                (out / stale).unlink()
            (out / JOURNAL_NAME).unlink()
        except OSError as err:
            raise OutputError(describe_os_error(out, err)) from None
    return out


__all__ = ["directory_to_gguf", "gguf_metadata", "gguf_to_directory"]
