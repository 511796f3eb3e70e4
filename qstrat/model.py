"""Read a quantized model back: one tensor at a time, or the whole model into numpy."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qstrat.errors import FormatError, InputError
from qstrat.io.atomic import flock_path, require_sha256
from qstrat.io.gguf_read import is_gguf_name
from qstrat.io.names import JOINT_PERMUTATIONS_NAME, JOURNAL_NAME, MANIFEST_NAME, PASSTHROUGH_NAME, RESIDUAL_PERMUTATION_KEY, decode_name
from qstrat.io.q8k import check_permutation, read_perm, read_q8k, read_q8k_shape
from qstrat.io.qblock import read_blocks, read_blocks_header
from qstrat.io.safetensors import DTYPES, SafetensorsFile, TensorInfo, map_tensor, stacked_rows, to_float32

if TYPE_CHECKING:
    from qstrat.io.manifest import Manifest


def unpermute(stored: np.ndarray, perm: np.ndarray, axis: int = 1) -> np.ndarray:
    """Undo a gather map along ``axis``: stored index i holds original index perm[i]."""
    original = np.empty_like(stored)
    index = [slice(None)] * stored.ndim
    index[axis] = perm
    original[tuple(index)] = stored
    return original


def undo_permutations(array: np.ndarray, permutations, where: str) -> np.ndarray:
    """``array`` with each ``(perm, axis)`` of ``permutations`` (None: none) undone.  A tensor's
    joint and residual-stream permutations permute different axes, so their order does not matter."""
    for permutation in permutations:
        if permutation is not None:
            perm, axis = permutation
            check_permutation(perm, array.shape[axis], where)
            array = unpermute(array, perm, axis)
    return array


@dataclass(frozen=True)
class StoredTensor:
    """What reading needs of one tensor: its storage and its files, by role (``q8k``, ``perm``, ...)."""

    quantized: bool
    files: dict[str, str] = field(default_factory=dict)
    joint_axis: int | None = None  # the axis of its joint permutation, if it has one
    residual_axis: int | None = None  # the axis residual_stream permuted, if it did
    #: the shape the manifest records, for a stack of matrices (MoE experts, 3-D), whose file holds
    #: the rows of all of them; None for a matrix (its file's header says it) or without a manifest
    stack_shape: tuple[int, ...] | None = None


def header_disagreement(path: Path, kind: str, shape: tuple[int, int], recorded) -> str | None:
    """A sentence when a tensor file's header (``kind``: ``q8k`` or its block type, ``shape``: rows, k)
    is not what the manifest records of its tensor (``recorded``: its entry; a stack of matrices'
    file holds the rows of all of them)."""
    stored = [stacked_rows(recorded.shape), recorded.shape[-1]] if len(recorded.shape) == 3 else list(recorded.shape)
    if (kind, list(shape)) == (recorded.storage, stored):
        return None
    return f"{path}: {kind} of shape {list(shape)}, the manifest says {recorded.storage} of {list(recorded.shape)}"


def refuse_unfinished(directory: Path) -> None:
    """A clear error for the directory of a qstrat run that stopped before its manifest: its files are
    only some of the model's (the Rust tool's directories, read without a manifest, have no journal)."""
    if (directory / JOURNAL_NAME).exists() and not (directory / MANIFEST_NAME).exists():
        raise InputError(f"{directory}: an unfinished qstrat run or convert (a journal, no manifest.json); run the same command again to finish it")


class QuantizedModel:
    """An output directory (or one written by the original Rust tool), read lazily."""

    def __init__(self, output_dir: str | os.PathLike, manifest: Manifest | None = None, check_files: bool = True) -> None:
        """``check_files``: check each file's bytes against the manifest's sha256 before its values are
        read (:meth:`intact`); off where the caller has just written or checked them (a run, verify)."""
        # pydantic (the manifest's model) is imported on first use, not with `import qstrat`
        from qstrat.io.manifest import read_manifest

        self.directory = Path(output_dir)
        if not self.directory.exists():
            raise InputError(f"{self.directory}: no such file or directory")
        if not self.directory.is_dir():
            raise InputError(f"{self.directory}: not an output directory")
        self.manifest = manifest if manifest is not None else read_manifest(self.directory)
        passthrough_path = self.directory / PASSTHROUGH_NAME
        self._passthrough = SafetensorsFile(passthrough_path) if passthrough_path.exists() else None
        if self.manifest is None:
            self.entries = self._seed_entries()
        else:
            self.entries = {
                name: StoredTensor(
                    e.storage != "passthrough", {role: f.path for role, f in e.files.items()}, e.joint.axis if e.joint else None, e.residual_axis,
                    tuple(e.shape) if "blocks" in e.files and len(e.shape) == 3 else None,
                )
                for name, e in self.manifest.tensors.items()
            }
        self._joint: SafetensorsFile | None = None
        #: the manifest's sha256 of each file (by its path in the directory), while not yet checked
        self._unchecked: dict[str, str] = {} if self.manifest is None or not check_files else {
            f.path: f.sha256 for e in self.manifest.tensors.values() for f in e.files.values()}

    def _seed_entries(self) -> dict[str, StoredTensor]:
        """Entries for a directory without manifest: .q8k (+ .perm) files and any passthrough."""
        refuse_unfinished(self.directory)
        q8k_files = sorted(self.directory.glob("*.q8k"))
        if not q8k_files:
            raise InputError(f"{self.directory}: no manifest.json and no .q8k files; not a quantized model")
        entries: dict[str, StoredTensor] = {}
        for path in q8k_files:
            files = {"q8k": path.name}
            if path.with_suffix(".perm").exists():
                files["perm"] = path.with_suffix(".perm").name
            entries[decode_name(path.stem)] = StoredTensor(True, files)
        if self._passthrough is not None:
            for name in self._passthrough.tensors:
                entries.setdefault(name, StoredTensor(False))
        return entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.entries))

    def intact(self, relative: str) -> Path:
        """The path of one of the directory's files, once its bytes are those the manifest records
        (each file checked once, before its values are first read): a file changed since the run
        must not pass as the model, nor be sealed by ``convert`` in a GGUF with a fresh checksum."""
        path = self.directory / relative
        expected = self._unchecked.get(relative)
        if expected is not None:
            require_sha256(path, expected, self.directory)
            self._unchecked.pop(relative, None)
        return path

    def passthrough_info(self, name: str) -> TensorInfo:
        if self._passthrough is None or name not in self._passthrough.tensors:
            raise InputError(f"{self.directory / PASSTHROUGH_NAME}: tensor {name!r} named by the manifest is missing")
        return self._passthrough.tensors[name]

    def joint_permutation(self, name: str) -> tuple[np.ndarray, int] | None:
        """The joint permutation of a tensor and its axis, if it has one."""
        axis = self.entries[name].joint_axis
        if axis is None:
            return None
        joint = self._joint_file()
        if name not in joint.tensors:
            raise InputError(f"{self.directory / JOINT_PERMUTATIONS_NAME}: no joint permutation for tensor {name!r}")
        return np.asarray(map_tensor(joint.tensors[name]), dtype=np.int64), axis

    def _joint_file(self) -> SafetensorsFile:
        if self._joint is None:
            self._joint = SafetensorsFile(self.intact(JOINT_PERMUTATIONS_NAME))
        return self._joint

    def residual_permutation(self, name: str) -> tuple[np.ndarray, int] | None:
        """The residual stream's permutation and the axis it permutes in this tensor, if it does."""
        axis = self.entries[name].residual_axis
        if axis is None:
            return None
        joint = self._joint_file()
        if RESIDUAL_PERMUTATION_KEY not in joint.tensors:
            raise InputError(f"{self.directory / JOINT_PERMUTATIONS_NAME}: the residual stream's permutation is missing")
        return np.asarray(map_tensor(joint.tensors[RESIDUAL_PERMUTATION_KEY]), dtype=np.int64), axis

    def undo_joint(self, name: str, array: np.ndarray) -> np.ndarray:
        """``array`` with the tensor's function-preserving permutations undone."""
        permutations = (self.joint_permutation(name), self.residual_permutation(name))
        return undo_permutations(array, permutations, f"{self.directory / JOINT_PERMUTATIONS_NAME}: {name}")

    def is_quantized(self, name: str) -> bool:
        return self.entries[name].quantized

    def stored_type(self, name: str) -> str:
        """A quantized tensor's block type (the registry's name), from its file's header."""
        files = self.entries[name].files
        return "q8_k" if "q8k" in files else read_blocks_header(self.directory / files["blocks"])[0]

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from its file's header (nothing is read or dequantized)."""
        return self.quantized_shape(name) if self.entries[name].quantized else self.passthrough_info(name).shape

    def passthrough_dtype(self, name: str) -> str:
        """A passed-through tensor's safetensors dtype tag."""
        return self.passthrough_info(name).dtype

    def stored_passthrough(self, name: str) -> tuple[str, np.ndarray]:
        """A passed-through tensor as stored: its dtype tag and its values (mapped, bf16 as uint16 bits)."""
        info = self.passthrough_info(name)
        self.intact(PASSTHROUGH_NAME)
        return info.dtype, map_tensor(info)

    def quantized_shape(self, name: str) -> tuple[int, ...]:
        """(rows, k) of a quantized tensor, from its file's header; a stack of matrices' shape
        from the manifest, once its file's header holds as many rows."""
        entry = self.entries[name]
        if "q8k" in entry.files:
            return read_q8k_shape(self.directory / entry.files["q8k"])
        type_name, rows, k = read_blocks_header(self.directory / entry.files["blocks"])
        if entry.stack_shape is None:
            return rows, k
        problem = header_disagreement(self.directory / entry.files["blocks"], type_name, (rows, k), self.manifest.tensors[name])
        if problem is not None:
            raise FormatError(problem)
        return entry.stack_shape

    def tensor(self, name: str, original: bool = False) -> np.ndarray:
        """One tensor: dequantized float32 (run-time permutation undone) or as passed through
        (bfloat16 as exactly equal float32); ``original`` also undoes joint permutations."""
        entry = self.entries[name]
        if not entry.quantized:
            array = np.array(to_float32(*self.stored_passthrough(name)))
        else:
            stored = read_q8k(self.intact(entry.files["q8k"])) if "q8k" in entry.files else read_blocks(self.intact(entry.files["blocks"]))
            recorded = self.manifest.tensors.get(name) if self.manifest is not None else None
            if recorded is not None:  # a header of another type of the same size would dequantize to other values
                path = self.directory / entry.files.get("q8k", entry.files.get("blocks"))
                problem = header_disagreement(path, "q8k" if "q8k" in entry.files else stored.type_name, (stored.rows, stored.k), recorded)
                if problem is not None:
                    raise FormatError(problem)
            array = stored.dequantize()
            if "perm" in entry.files:  # it permutes each row's k columns: undone before a stack is shaped
                array = unpermute(array, read_perm(self.intact(entry.files["perm"]), stored.k))
            if entry.stack_shape is not None:
                array = array.reshape(entry.stack_shape)  # checked against the header above
        return self.undo_joint(name, array) if original else array


def container_of(directory: Path, manifest: Manifest) -> tuple[Path, str]:
    """The GGUF container of a directory written with ``outputs: [gguf]``, and its sha256 the manifest records."""
    name, entry = next(iter(manifest.containers.items()))
    return directory / name, entry.sha256


#: the temporary directories GGUF files are unpacked into; each is flock-ed by its reader while in use
_UNPACKED_PREFIX = "qstrat-gguf-"
_UNPACKED_GRACE_S = 10  # a directory this young may not be locked yet


def _remove_stale_unpacked() -> None:
    """Remove this user's unpacked copies that no reader holds: one killed with SIGKILL skips the
    cleanup, and a model's worth of files would stay in the temporary directory for good.  A lock,
    not a pid, tells: pids do not identify a process across containers sharing the directory."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in Path(tempfile.gettempdir()).glob(f"{_UNPACKED_PREFIX}*"):
            with contextlib.suppress(OSError):
                status = entry.lstat()
                if not entry.is_dir() or entry.is_symlink() or status.st_uid != os.getuid() or now - status.st_mtime < _UNPACKED_GRACE_S:
                    continue
                with flock_path(entry, blocking=False) as free:
                    if free:
                        shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def as_directory(path: str | os.PathLike, follow_container: bool = True) -> Iterator[Path]:
    """An output directory for ``path``: itself, or a GGUF file unpacked into a temporary one.

    A directory written with ``outputs: [gguf]`` keeps the model in its GGUF container only;
    with ``follow_container`` that container is unpacked.
    """
    # pydantic and gguf are imported on first use, not with `import qstrat`
    from qstrat.io.gguf import GGUFModel, unpack_gguf
    from qstrat.io.manifest import read_manifest

    path = Path(path)
    expected_sha256 = None
    if path.is_dir() and follow_container:
        manifest = read_manifest(path)
        if manifest is not None and manifest.gguf_only:
            path, expected_sha256 = container_of(path, manifest)
    if path.is_file() and is_gguf_name(path):
        model = GGUFModel(path)
        model.check_intact(expected_sha256)  # unpacked, its files get fresh checksums
        _remove_stale_unpacked()
        with tempfile.TemporaryDirectory(prefix=_UNPACKED_PREFIX) as tmp, flock_path(Path(tmp), blocking=True):
            unpack_gguf(model, Path(tmp))
            yield Path(tmp)
    else:
        yield path


class GGUFTensors:
    """A qstrat GGUF file (or another tool's) read lazily, tensor by tensor, without unpacking it:
    what :class:`QuantizedModel` gives of an output directory."""

    def __init__(self, path: str | os.PathLike, manifest: Manifest | None = None, expected_sha256: str | None = None) -> None:
        """``manifest``: the run's, when the file is an output directory's container (it names the
        tensors quantized to F32/F16/BF16, which read back as quantized ones: float32), and
        ``expected_sha256`` the file's sha256 it records.  The file's bytes are checked before the
        first tensor's values are read (:meth:`GGUFModel.check_intact`)."""
        from qstrat.io.gguf import GGUFModel  # gguf-py is imported on first use

        self.file = GGUFModel(path)
        self._expected_sha256 = expected_sha256
        self._unchecked = True
        self._damage: FormatError | None = None  # a failed check, said again without hashing the file again
        self.path = self.file.path
        float_quantized = () if manifest is None else [n for n, e in manifest.tensors.items() if e.storage in ("f32", "f16", "bf16")]
        self.types = self.file.block_types(float_quantized)

    def __iter__(self) -> Iterator[str]:
        return iter(self.types)  # sorted

    def is_quantized(self, name: str) -> bool:
        return self.types[name] is not None

    def stored_type(self, name: str) -> str:
        return self.types[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.shape(name)

    def passthrough_dtype(self, name: str) -> str:
        return self.file.passthrough_dtype(name)

    def _intact(self) -> None:
        if self._damage is not None:
            raise self._damage
        if self._unchecked:
            try:
                self.file.check_intact(self._expected_sha256)
            except FormatError as err:
                self._damage = err
                raise
            self._unchecked = False

    def stored_passthrough(self, name: str) -> tuple[str, np.ndarray]:
        self._intact()
        tag, raw = self.file.passthrough_bytes(name, list(self.shape(name)))
        return tag, raw.view(DTYPES[tag]).reshape(self.shape(name))

    def tensor(self, name: str, original: bool = False) -> np.ndarray:
        """As :meth:`QuantizedModel.tensor`."""
        if self.types[name] is None:
            array = np.array(to_float32(*self.stored_passthrough(name)))
        else:
            self._intact()
            stored = self.file.stored_tensor(name, self.types[name])
            array = stored.dequantize()
            perm = self.file.runtime_perm(name, stored.k)
            if perm is not None:
                array = unpermute(array, perm)
            array = array.reshape(self.shape(name))  # a stack of matrices (MoE experts) from its rows
        return self.undo_joint(name, array) if original else array

    def undo_joint(self, name: str, array: np.ndarray) -> np.ndarray:
        return undo_permutations(array, (self.file.joint.get(name), self.file.residual.get(name)), f"{self.path}: {name}")


class OpenModel(Mapping[str, np.ndarray]):
    """A quantized model as a read-only mapping, name -> numpy array, read lazily: a tensor is read and
    dequantized each time it is looked up, and not kept, so a model larger than memory can be walked
    tensor by tensor.  ``shape(name)`` reads only headers.  Made by :func:`open_model`."""

    def __init__(self, reader: QuantizedModel | GGUFTensors, original: bool) -> None:
        self._reader: QuantizedModel | GGUFTensors | None = reader
        self._names = tuple(reader)
        self._known = frozenset(self._names)
        self.original = original

    @property
    def reader(self) -> QuantizedModel | GGUFTensors:
        if self._reader is None:
            raise ValueError("the model is closed")
        return self._reader

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        return self.reader.tensor(name, self.original)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, without reading its values."""
        if name not in self._known:
            raise KeyError(name)
        return tuple(self.reader.shape(name))

    def close(self) -> None:
        """Let go of the files (arrays already returned stay valid: each is a copy)."""
        self._reader = None

    def __enter__(self) -> OpenModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_model(path: str | os.PathLike, original: bool = False) -> OpenModel:
    """A quantized model, read lazily: an output directory, one written by the original Rust tool,
    or a qstrat ``.gguf`` file (read in place, not unpacked).  Each tensor comes as
    :func:`load_model` gives it (``original`` as there), read when it is looked up."""
    path = Path(path)
    if path.is_dir():
        # pydantic (the manifest's model) is imported on first use, not with `import qstrat`
        from qstrat.io.manifest import read_manifest

        manifest = read_manifest(path)
        if manifest is not None and manifest.gguf_only:  # the model lives in its container only
            container, expected_sha256 = container_of(path, manifest)
            return OpenModel(GGUFTensors(container, manifest, expected_sha256), original)
        return OpenModel(QuantizedModel(path, manifest), original)
    if path.is_file() and is_gguf_name(path):
        return OpenModel(GGUFTensors(path), original)
    return OpenModel(QuantizedModel(path), original)  # its errors: no such file, not an output directory


def load_model(output_dir: str | os.PathLike, original: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a quantized model as numpy arrays, by name.

    Quantized tensors are dequantized to float32 with any run-time permutation (``.perm``)
    undone; passed-through tensors come back as stored (bfloat16 as exactly equal float32).
    ``original=True`` also undoes function-preserving joint permutations, so every tensor
    is in its source layout.  A directory written by the original Rust tool (``.q8k`` and
    ``.perm`` files, no manifest) loads too, and so does a qstrat ``.gguf`` file.
    """
    with open_model(output_dir, original) as model:
        return dict(model.items())
