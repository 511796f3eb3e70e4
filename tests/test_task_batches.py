"""How a run cuts its groups into worker tasks."""

from pathlib import Path

from qstrat.pipelines.plan import GroupJob, TensorJob
from qstrat.pipelines.run import TASK_BYTES, TASK_GROUPS, task_batches

from qstrat.io.safetensors import TensorInfo
from qstrat.strategies import make_strategy


def _group(i: int, nbytes: int) -> GroupJob:
    info = TensorInfo(f"t{i}", "BF16", (nbytes // 512, 256), Path("m.safetensors"), 0, nbytes)
    return GroupJob(make_strategy("identity"), f"t{i}", (TensorJob(info, f"t{i}"),))


def test_batches_keep_order_and_respect_the_limits():
    groups = [_group(i, n) for i, n in enumerate([300 << 20, 100 << 20, 100 << 20, 60 << 20] + [1 << 20] * 20)]
    batches = task_batches(groups, workers=1)
    assert [g for batch in batches for g in batch] == groups  # every group once, in order
    for batch in batches:
        assert len(batch) <= TASK_GROUPS
        assert len(batch) == 1 or sum(g.nbytes for g in batch) <= TASK_BYTES  # a larger group goes alone
    assert len(batches[0]) == 1  # the 300 MB group


def test_at_least_two_tasks_per_worker_when_groups_allow():
    groups = [_group(i, 8 << 20) for i in range(8)]  # 64 MB in all
    assert len(task_batches(groups, workers=2)) >= 4
    assert len(task_batches(groups[:1], workers=2)) == 1
    assert task_batches([], workers=2) == []
