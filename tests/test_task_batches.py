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


def _model_jobs(tmp_path: Path, count: int) -> list[GroupJob]:
    import numpy as np
    from qstrat.pipelines.plan import make_plan

    from qstrat.config import QuantizationConfig
    from qstrat.io.safetensors import SafetensorsModel
    from qstrat.synthetic import write_model

    rng = np.random.default_rng(0)
    model = write_model(tmp_path / "m", {f"layers.{i}.weight": rng.standard_normal((4, 256)).astype(np.float32) for i in range(count)})
    plan = make_plan(SafetensorsModel(model), QuantizationConfig(strategies=["identity"]))
    return sorted(plan.groups, key=lambda g: g.members[0].info.name)


def test_results_keep_job_order_when_a_later_write_finishes_first(tmp_path, monkeypatch):
    import threading

    from qstrat.pipelines import worker

    jobs = _model_jobs(tmp_path, 6)
    first_may_finish = threading.Event()
    real_write = worker._write_member

    def write(member, *args):
        if member.record.name == jobs[0].members[0].info.name:
            # the first member's write waits until the second one has landed
            assert first_may_finish.wait(10)
        record = real_write(member, *args)
        if member.record.name == jobs[1].members[0].info.name:
            first_may_finish.set()
        return record

    monkeypatch.setattr(worker, "_write_member", write)
    out = tmp_path / "o"
    out.mkdir()
    results = list(worker.quantize_stream(jobs, "candle", None, out, 1))
    assert [r.records[0].name for r in results] == [j.members[0].info.name for j in jobs]
    assert all((out / r.records[0].files["q8k"].path).exists() for r in results)


def test_a_failed_later_write_surfaces(tmp_path, monkeypatch):
    import pytest
    from qstrat.pipelines import worker

    from qstrat.errors import OutputError

    jobs = _model_jobs(tmp_path, 4)
    real_write = worker._write_member

    def write(member, *args):
        if member.record.name == jobs[1].members[0].info.name:
            raise OutputError("disk full (simulated)")
        return real_write(member, *args)

    monkeypatch.setattr(worker, "_write_member", write)
    out = tmp_path / "o"
    out.mkdir()
    names = []
    with pytest.raises(OutputError, match="simulated"):
        for result in worker.quantize_stream(jobs, "candle", None, out, 1):
            names.append(result.records[0].name)
    assert names == [jobs[0].members[0].info.name]  # nothing after the failed one is reported done


def test_no_more_local_workers_start_than_there_are_cores():
    from qstrat.pipelines.backends import execution_backend, local_cores
    from qstrat.runconfig import RunConfig

    groups = [_group(i, 1 << 20) for i in range(100)]
    config = RunConfig(output="o", parallel={"workers": 48})
    with execution_backend(config, groups, None) as (workers, threads):
        assert (workers, threads) == (local_cores(), 1)  # one thread each (one worker, this process, on one core)
    with execution_backend(config, groups[:1], None) as (workers, threads):
        assert workers == 1
