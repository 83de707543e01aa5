"""TrainerCelery / DelayTrainerCelery: the rolling experiment on real Celery workers.

Two worker processes (one worker, concurrency 2) train the demo workflow's 2 models x
8 rolling windows; the batch's aggregation runs RecorderCollector + RollingGroup once
and logs one summary run.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from qcelery import batch as batches
from qcelery.calendar import default_calendar
from qcelery.celery_app import app_for
from qcelery.cluster import Cluster
from qcelery.collect import RecorderCollector, RollingGroup
from qcelery.config import load_workflow
from qcelery.exp import Recorder, get_experiment
from qcelery.gen import task_generator
from qcelery.manage import TaskManager
from qcelery.trainer import DelayTrainerCelery, TrainerCelery, TrainingFailedError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workers(settings):
    with Cluster(settings) as cluster:
        cluster.start_worker("cpu", concurrency=2)
        cluster.wait_ready(app_for(settings))
        yield cluster


def demo_tasks() -> list[dict]:
    templates, generators = load_workflow(ROOT / "config" / "demo.yaml")
    return task_generator(templates, generators)


def _test_days(task: dict) -> set[pd.Timestamp]:
    start, end = (pd.Timestamp(x) for x in task["dataset"]["kwargs"]["segments"]["test"])
    return {d for d in default_calendar("XSHG").dates if start <= d <= end}


def test_rolling_experiment_on_celery_aggregates_once(settings, workers, mongo_db):
    tasks = demo_tasks()
    assert len(tasks) == 16
    trainer = TrainerCelery(
        "celery_rolling",
        task_pool="rolling",
        aggregate="qcelery.collect.summarize_batch",
        wait_aggregated=True,
        timeout=600,
        settings=settings,
    )
    recs = trainer.train(tasks)

    # one finished run per task, in task order, each leading back to its task
    assert len(recs) == 16 and all(r.status == Recorder.STATUS_FI for r in recs)
    tm = TaskManager("rolling", settings)
    ids = tm.create_task(tasks)  # all exist: the same ids, in input order
    assert [r.list_tags()["task_id"] for r in recs] == [str(i) for i in ids]
    assert tm.task_stat() == {"done": 16}

    batch = batches.load(mongo_db, trainer.last_batch_id)
    assert batch["state"] == batches.AGGREGATED and batch["aggregate_runs"] == 1
    summary = batch["summary"]
    assert len(summary["tasks"]) == 16 and summary["failures"] == []
    assert sorted(m["model"] for m in summary["models"]) == ["linear_alpha_0.1", "linear_alpha_10"]
    assert Path(summary["report_path"]).is_file()
    summary_runs = get_experiment("celery_rolling.summary", settings).list_recorders()
    assert len(summary_runs) == 1
    # the planted signal: the ridge model predicts out of sample over the whole test span
    assert all(m["IC"] > 0 for m in summary["models"])

    # the joined rolling predictions cover every test day of every window exactly once
    by_run = {r.id: t for r, t in zip(recs, tasks, strict=True)}
    joined = RecorderCollector(
        experiment=lambda: recs,
        process_list=RollingGroup(),
        rec_key_func=lambda r: (by_run[r.id]["model"]["name"], str(by_run[r.id]["dataset"]["kwargs"]["segments"]["test"])),
        artifacts_path={"pred": "pred.pkl"},
    )()
    assert sorted(k[0] for k in joined["pred"]) == ["linear_alpha_0.1", "linear_alpha_10"]
    for (model,), pred in joined["pred"].items():
        assert not pred.index.duplicated().any()
        expected = set().union(*(_test_days(t) for t in tasks if t["model"]["name"] == model))
        assert set(pred.index.get_level_values("datetime").unique()) == expected


def test_two_phase_training_through_part_done(settings, workers):
    tasks = [t for t in demo_tasks() if t["model"]["name"] == "linear_alpha_10"][:2]
    trainer = DelayTrainerCelery("celery_delay", task_pool="delay", timeout=300, settings=settings)
    tm = TaskManager("delay", settings)

    recs = trainer.train(tasks)
    assert tm.task_stat() == {"part_done": 2}
    assert all(r.status == Recorder.STATUS_S for r in recs) and all("IC" not in r.list_metrics() for r in recs)

    done = trainer.end_train(recs)
    assert tm.task_stat() == {"done": 2}
    assert [r.id for r in done] == [r.id for r in recs]
    assert all(r.status == Recorder.STATUS_FI and "IC" in r.list_metrics() for r in done)


def test_unknown_model_class_fails_only_its_task(settings, workers, mongo_db):
    good = [t for t in demo_tasks() if t["model"]["name"] == "linear_alpha_10"][:2]
    bad = {**good[0], "model": {"class": "NoSuchModel", "module_path": "qcelery.models", "kwargs": {}}}
    trainer = TrainerCelery(
        "celery_bad", task_pool="bad", aggregate="qcelery.collect.summarize_batch", wait_aggregated=True, timeout=300, settings=settings
    )
    with pytest.raises(TrainingFailedError) as info:
        trainer.train([*good, bad])
    assert "NoSuchModel" in str(info.value)
    assert len(info.value.failures) == 1

    tm = TaskManager("bad", settings)
    assert tm.task_stat() == {"done": 2, "failed": 1}
    failed = next(tm.query({"status": "failed"}))
    assert failed["attempt"] == settings.max_attempts
    assert "NoSuchModel" in failed["error"] and "Traceback" in failed["error"]
    batch = batches.load(mongo_db, trainer.last_batch_id)
    assert batch["aggregate_runs"] == 1
    assert [f["task_id"] for f in batch["summary"]["failures"]] == [str(failed["_id"])]
    assert len(batch["summary"]["tasks"]) == 2
