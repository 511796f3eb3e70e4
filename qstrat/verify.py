"""``qstrat verify``: is an output directory exactly what its manifest says?"""

from __future__ import annotations

import os
from pathlib import Path

from qstrat.errors import QstratError
from qstrat.io.manifest import MANIFEST_NAME, PASSTHROUGH_NAME, Manifest, read_manifest
from qstrat.io.names import storage_name, unlisted_tensor_files
from qstrat.io.q8k import check_permutation, read_perm, read_q8k
from qstrat.io.qblock import read_blocks_header
from qstrat.model import QuantizedModel, container_of, header_disagreement
from qstrat.io.atomic import file_sha256


def verify_gguf_file(path: str | os.PathLike) -> tuple[list[str], bool]:
    """Every problem of a lone ``.gguf`` file (empty when it is intact), and whether its bytes could
    be checked: a file qstrat writes records the sha256 of its header and tensor data (``qstrat.sha256``;
    an earlier qstrat's, ``qstrat.data_sha256``, of the data alone), another tool's does not, nor does one
    another tool rewrote in other types (its record is of a file that is gone): then only its structure is checked."""
    from qstrat.io.gguf import GGUFModel

    path = Path(path)
    checked = False
    try:
        model = GGUFModel(path)
        problem, checked = model.checksum_problem()  # the data is read only to compare it
        if problem is not None:
            return [problem], True
        # read back in place: every tensor's type, shape and permutations (the checks a reader makes);
        # another tool's types qstrat does not read (Q8_1, ...) are not damage: its structure was checked
        if not model.unreadable_types():
            model.checked_types()
        return [], checked
    except QstratError as err:  # a file that cannot be read back is a damaged one
        return [str(err)], checked


def _as_in_gguf(storage: str, shape, dtype: str | None) -> tuple:
    """What a GGUF container keeps of a tensor (``storage``: a manifest's; ``dtype``: a passed-through
    one's): a quantized tensor's block type and shape (not its source dtype); a tensor's dtype and shape
    otherwise (one written as f32, f16 or bf16 included)."""
    if storage in ("f32", "f16", "bf16"):
        return ("passthrough", list(shape), storage.upper())
    if storage == "passthrough":
        return ("passthrough", list(shape), dtype)
    return (storage, list(shape))


def file_problems(directory: Path, manifest: Manifest) -> list[str]:
    """Each file the manifest lists that is missing or differs from it (size, sha256), and each
    tensor file it does not list: a run's files, as its manifest says, and nothing else."""
    problems: list[str] = []
    checked: set[str] = set()
    for file in manifest.files():
        if file.path in checked:
            continue
        checked.add(file.path)
        path = directory / file.path
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != file.size:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {file.size}")
        elif file_sha256(path) != file.sha256:
            problems.append(f"{path}: sha256 differs from the manifest (the file was changed or corrupted)")
    # a tensor file the manifest does not list was left by an earlier run; a reader (Candle gathers
    # with any .perm beside a .q8k) would take it for part of the model
    problems += [
        f"{directory / name}: not listed in the manifest (a stale file of an earlier run; delete it, or rerun the run)"
        for name in unlisted_tensor_files(directory, checked)
    ]
    return problems


def verify_output(output_dir: str | os.PathLike) -> list[str]:
    """Every problem found (empty when the directory is intact), each naming its file; a
    manifest that is not one raises :class:`qstrat.errors.FormatError`.

    Checks each file's size and sha256 against the manifest, each .q8k/.qblk/.perm against its
    format and the tensor's shape and type, the passthrough file's contents, and every permutation.
    """
    directory = Path(output_dir)
    manifest = read_manifest(directory)  # one that cannot be read is an error of its own (exit 2)
    if manifest is None:
        return [f"{directory / MANIFEST_NAME}: missing (the run did not finish, or this is not an output directory)"]
    problems = file_problems(directory, manifest)
    if problems:
        return problems
    if manifest.gguf_only:
        # GGUF only: the container's checksum matched; its tensors, read in place, must be the manifest's
        from qstrat.io.gguf import GGUFModel

        try:
            container = GGUFModel(container_of(directory, manifest)[0])
            types = container.checked_types()
        except QstratError as err:  # matching its checksum, yet not readable: damaged as any other file
            return [str(err)]
        problems = [f"{directory}: tensor {name!r} is missing from the GGUF container" for name in sorted(set(manifest.tensors) - set(types))]
        for name, entry in sorted(manifest.tensors.items()):
            if name in types:
                passed = types[name] is None
                held = _as_in_gguf("passthrough" if passed else storage_name(types[name]), container.shape(name),
                                   container.passthrough_dtype(name) if passed else None)
                recorded = _as_in_gguf(entry.storage, entry.shape, entry.dtype)
                if held != recorded:
                    problems.append(f"{directory}: tensor {name!r} is {' '.join(map(str, held))} in the GGUF "
                                    f"container, the manifest says {' '.join(map(str, recorded))}")
        return problems
    model = QuantizedModel(directory, manifest, check_files=False)  # every file's sha256 is compared above
    for name, entry in sorted(manifest.tensors.items()):
        try:
            if entry.storage != "passthrough":
                if entry.storage == "q8k":
                    path = directory / entry.files["q8k"].path
                    shape, type_name = read_q8k(path).shape, "q8k"
                else:
                    path = directory / entry.files["blocks"].path
                    type_name, *shape = read_blocks_header(path)
                    shape = tuple(shape)
                problem = header_disagreement(path, type_name, shape, entry)
                if problem is not None:
                    problems.append(problem)
                if "perm" in entry.files:
                    read_perm(directory / entry.files["perm"].path, shape[1])
            else:
                info = model.passthrough_info(name)
                if list(info.shape) != entry.shape or info.dtype != entry.dtype:
                    problems.append(f"{directory / PASSTHROUGH_NAME}: tensor {name!r} differs from the manifest")
            for label, joint in (("joint", model.joint_permutation(name)), ("residual-stream", model.residual_permutation(name))):
                if joint is not None:
                    check_permutation(joint[0], entry.shape[joint[1]], f"{directory}: {label} permutation of {name!r}")
        except QstratError as err:
            problems.append(str(err))
    return problems
