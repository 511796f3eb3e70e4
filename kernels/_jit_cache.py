"""Where numba keeps the compiled kernels: a per-user cache directory, never the package's own.

Numba's default writes ``__pycache__`` beside the kernels' source.  Inside an installed
package that is ``site-packages/qstrat/kernels/__pycache__``, which pip's uninstall does not
know about: after ``pip install .`` then ``pip install -e .``, the leftover ``qstrat/``
directory became a namespace package that shadowed the editable install.  A read-only
install could not cache at all.  So qstrat's kernels are cached under the user's cache
directory (``$XDG_CACHE_HOME/qstrat`` or ``~/.cache/qstrat`` on Linux), or under
``NUMBA_CACHE_DIR`` when the user set it.  Entries are keyed by the kernels' location and by a
digest of all their sources: numba itself checks only the stamp of the file that defines a
kernel, not of the helpers it calls from the other kernel files, so an upgrade (or an edit)
that changed only a helper would otherwise load stale code, under ``NUMBA_CACHE_DIR`` too.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from numba.core import caching, config
from numba.misc.appdirs import AppDirs

# numba < 0.61 spells these with a leading underscore
_UserWideLocator = getattr(caching, "UserWideCacheLocator", None) or caching._UserWideCacheLocator
_CacheImpl = getattr(caching, "CacheImpl", None) or caching._CacheImpl

# as numba sees the kernels' files (through the qstrat/kernels link in a checkout)
_KERNELS_DIR = Path(os.path.abspath(__file__)).parent


def cache_root() -> Path:
    """The directory under which qstrat's compiled kernels are kept."""
    if config.CACHE_DIR:
        return Path(config.CACHE_DIR)
    try:
        return Path(AppDirs(appname="qstrat", appauthor=False).user_cache_dir)
    except (KeyError, RuntimeError):  # no home directory to be found
        return Path(tempfile.gettempdir()) / f"qstrat-cache-{os.getuid()}"


@functools.cache
def _sources_digest() -> str:
    """A digest of every kernel source file: any change to any of them selects a fresh cache."""
    digest = hashlib.sha1()
    for path in sorted(_KERNELS_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _cache_path(py_file: str) -> Path:
    return cache_root() / f"{_UserWideLocator.get_suitable_cache_subpath(py_file)}_{_sources_digest()}"


def kernel_cache_dir() -> Path:
    """The directory holding the compiled kernels of this installation of qstrat (with
    ``NUMBA_CACHE_DIR`` set, that directory: they are kept in a subdirectory of it)."""
    if config.CACHE_DIR:
        return Path(config.CACHE_DIR)
    return _cache_path(str(_KERNELS_DIR / "q8k.py"))


class _KernelCacheLocator(_UserWideLocator):
    """Claims the functions defined in this package's files; numba's own locators take the rest."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = str(_cache_path(py_file))

    @classmethod
    def from_function(cls, py_func, py_file):
        if Path(py_file).resolve().parent != _KERNELS_DIR.resolve():
            return None
        return super().from_function(py_func, py_file)


def install() -> None:
    """Put the locator first, before numba's NUMBA_CACHE_DIR one, which knows no source digest (idempotent)."""
    locators = _CacheImpl._locator_classes
    if _KernelCacheLocator not in locators:
        locators.insert(0, _KernelCacheLocator)


def _weighted_entry_cached(module: str) -> bool:
    """Whether a module's row quantizer (``quantize_rows_*``) was compiled with an importance vector
    (its last argument an array, not None): another specialisation of the same kernels, which takes
    as long to compile as the first.  Read from numba's index of the entry point's cached versions;
    an index this numba cannot read counts as cached."""
    import pickle

    from numba.core import types

    indexes = list(kernel_cache_dir().rglob(f"{module}.quantize_rows_*.nbi"))
    if not indexes:
        return False
    for index in indexes:
        try:
            with open(index, "rb") as file:
                pickle.load(file)  # numba's version
                _, overloads = pickle.loads(file.read())
            signatures = [key[0] for key in overloads]
        except Exception:  # another numba's layout: say nothing rather than something wrong
            return True
        if any(len(signature) and isinstance(signature[-1], types.Array) for signature in signatures):
            return True
    return False


def kernels_compiled(modules: Iterable[str] = ("q8k",), weighted: Iterable[str] = ()) -> bool:
    """Whether the kernels of each of ``modules`` (names of this package's kernel files, as
    ``legacy``) have been compiled and cached here before, those of ``weighted`` with an importance
    vector too: a cold cache makes a run compile for several seconds per module."""
    try:
        return (all(any(kernel_cache_dir().rglob(f"{module}.*.nbi")) for module in modules)
                and all(_weighted_entry_cached(module) for module in weighted))
    except OSError:
        return False
