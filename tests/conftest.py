import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Every Python process a test starts prints its threads' stacks on a fatal signal: a hung
# command is sent SIGABRT (tests/helpers.communicate_or_dump_stacks), and the failure shows where.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


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
