"""Compiled kernels are cached per user, never inside the installed package (whose leftover
``__pycache__`` once shadowed a later editable install), and a cold cache is announced once."""

from pathlib import Path

import numpy as np

import qstrat.kernels
from qstrat.synthetic import write_model
from tests.helpers import run_cli

PACKAGE_DIR = Path(qstrat.kernels.__file__).resolve().parent


def _package_cache_files() -> set[Path]:
    return {p for p in PACKAGE_DIR.rglob("*") if p.suffix in (".nbi", ".nbc")}


def test_kernels_compile_into_the_user_cache_and_say_so_once(tmp_path):
    model = write_model(tmp_path / "model", {"layer.weight": np.ones((4, 256), dtype=np.float32)}, dtype="F32")
    cache_home = tmp_path / "cache"
    env = {"XDG_CACHE_HOME": str(cache_home), "NUMBA_CACHE_DIR": ""}
    before = _package_cache_files()

    first = run_cli("qstrat", "quantize", str(model), str(tmp_path / "a"), "--no-validation", env=env)
    assert first.returncode == 0, first.stderr
    assert "compiling the kernels of q8_k for this machine (once" in first.stderr
    cached = list((cache_home / "qstrat").rglob("q8k.*.nbi"))
    assert cached, f"no kernel index under {cache_home}"
    assert _package_cache_files() == before, "numba wrote its cache inside the package"

    second = run_cli("qstrat", "quantize", str(model), str(tmp_path / "b"), "--no-validation", env=env)
    assert second.returncode == 0, second.stderr
    assert "compiling" not in second.stderr


def test_numba_cache_dir_is_honoured(tmp_path):
    model = write_model(tmp_path / "model", {"layer.weight": np.ones((4, 256), dtype=np.float32)}, dtype="F32")
    env = {"XDG_CACHE_HOME": str(tmp_path / "unused"), "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    result = run_cli("qstrat", "quantize", str(model), str(tmp_path / "a"), "--no-validation", env=env)
    assert result.returncode == 0, result.stderr
    indexes = list((tmp_path / "numba").rglob("q8k.*.nbi"))
    assert indexes and not (tmp_path / "unused" / "qstrat").exists()
    # keyed by the digest of every kernel source there too: an edited helper never loads stale code
    from qstrat.kernels._jit_cache import _sources_digest

    assert all(index.parent.name.endswith(_sources_digest()) for index in indexes), indexes
    assert "compiling the kernels" in result.stderr
    again = run_cli("qstrat", "quantize", str(model), str(tmp_path / "b"), "--no-validation", env=env)
    assert again.returncode == 0 and "compiling" not in again.stderr, again.stderr  # found where numba put them


def runs_with_a_cache_of_its_own(tmp_path: Path, model: Path, settings: str = ""):
    """A function running ``qstrat run`` of ``model`` with these settings and ``--set`` arguments, the
    kernels cached in a directory of this test's, giving its stderr."""
    config = tmp_path / "run.yaml"
    config.write_text(f"input: {model}\noutput: {tmp_path / 'out'}/{{model}}\n{settings}")
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba")}

    def run(*sets: str) -> str:
        result = run_cli("qstrat", "run", str(config), *(a for s in sets for a in ("--set", s)), "--force", env=env)
        assert result.returncode == 0, result.stderr
        return result.stderr

    return run


def test_a_block_type_whose_kernels_are_not_cached_is_announced_too(tmp_path):
    model = write_model(tmp_path / "model", {"layer.weight": np.ones((4, 256), dtype=np.float32)}, dtype="F32")
    run = runs_with_a_cache_of_its_own(tmp_path, model)
    assert "compiling the kernels of q8_k" in run()
    assert "compiling" not in run()
    # Q8K's kernels are cached now, F16's are not: that run compiles, and says so
    assert "compiling the kernels of f16" in run("format=f16")
    assert "compiling" not in run("format=f16")


def test_kernels_first_compiled_with_importance_vectors_are_announced(tmp_path):
    # an importance matrix compiles other specialisations of the same kernels (25 s for Q4_K): a run
    # whose unweighted kernels were cached sat silent that long
    from qstrat.imatrix import ImportanceEntry, ImportanceMatrix, write_imatrix

    model = write_model(tmp_path / "model", {"layer.weight": np.linspace(-1, 1, 1024, dtype=np.float32).reshape(4, 256)}, dtype="F32")
    vector = np.linspace(0.5, 2.0, 256, dtype=np.float32)[None, :]
    write_imatrix(tmp_path / "imatrix.gguf", ImportanceMatrix({"layer.weight": ImportanceEntry(vector, np.array([1]))}, ["text"], 1, 32))
    run = runs_with_a_cache_of_its_own(tmp_path, model, "format: q4_0\n")
    assert "compiling the kernels of q4_0 for this machine" in run()
    assert "compiling" not in run()
    weighted = f"imatrix={tmp_path / 'imatrix.gguf'}"
    assert "compiling the kernels of q4_0 with importance vectors for this machine" in run(weighted)
    assert "compiling" not in run(weighted)
    assert "compiling" not in run()
