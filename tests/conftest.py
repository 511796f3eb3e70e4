import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Every Python process a test starts prints its threads' stacks on a fatal signal: a hung
# command is sent SIGABRT (tests/helpers.communicate_or_dump_stacks), and the failure shows where.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
# The tests run qstrat in-process, as the qstrat commands run it: numba's OpenMP threads wait
# passively between kernel calls (qstrat.cli.quiet_openmp_threads). With OpenMP's default spinning,
# on a busy machine, each parallel kernel call on a test's tiny tensors took about 15 ms instead of
# 0.1 ms. Set before the first kernel call starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _vectors_path() -> Path:
    # ../shared/vectors beside the clone, locally and in CI; QSTRAT_VECTORS overrides.
    override = os.environ.get("QSTRAT_VECTORS")
    return Path(override) if override else REPO.parent / "shared" / "vectors" / "q8k_reference.npz"


@pytest.fixture(scope="session")
def reference_vectors():
    path = _vectors_path()
    if not path.is_file():
        pytest.fail(f"reference vectors not found at {path} (set QSTRAT_VECTORS)")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}
