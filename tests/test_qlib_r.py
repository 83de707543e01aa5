"""Qlib's ``R`` inside a task is the task's run (issue 13.3), with real pyqlib.

A model whose ``fit`` logs through ``qlib.workflow.R`` and a record that reads
``R.get_recorder()`` run through ``task_train``, in process (``TrainerR``) and on a real
Celery worker (``TrainerCelery``): the metric lands on the task's own MLflow run, the
record sees that run, no ``./mlruns`` appears in the working directory, and the
experiment holds one run per task.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from qlib_support import R_METRIC, r_task, write_provider

from qcelery.exp import Recorder, get_experiment
from qcelery.trainer import TrainerCelery, TrainerR

TESTS = Path(__file__).resolve().parent


def _qlib_init(root: Path) -> dict:
    write_provider(root, pd.bdate_range("2024-01-01", periods=40))
    return {"provider_uri": str(root), "region": "cn"}


def _assert_task_runs(recs: list[Recorder], experiment: str, settings) -> None:
    assert len(recs) == 2 and all(r.status == Recorder.STATUS_FI for r in recs)
    for rec in recs:
        run = rec.client.get_run(rec.id)
        assert run.data.metrics.get(R_METRIC) == 0.5, f"run {rec.id} has metrics {run.data.metrics}"
        tags = rec.list_tags()
        assert tags["qlib_recorder_id"] == rec.id
        assert tags["qlib_experiment_id"] == rec.experiment_id
        assert tags["qlib_uri"] == settings.mlflow_tracking_uri
    # one run per task: Qlib's R made none of its own
    assert len(get_experiment(experiment, settings).list_recorders()) == 2


@pytest.fixture
def r_settings(settings):
    return settings.model_copy(update={"allowed_modules": ["qlib_support"]})


def test_qlib_r_is_the_task_run_in_process(r_settings, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trainer = TrainerR("qlib_r", settings=r_settings, qlib_init=_qlib_init(tmp_path / "provider"))
    recs = trainer.train([r_task(0), r_task(1)])
    _assert_task_runs(recs, "qlib_r", r_settings)
    assert not (cwd / "mlruns").exists()
    # Qlib's recorder sets MLflow's URI process-wide (os.environ too): undone after each task
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_qlib_r_is_the_task_run_on_a_celery_worker(r_settings, tmp_path):
    from qcelery.celery_app import app_for
    from qcelery.cluster import Cluster

    settings = r_settings.model_copy(update={"default_queue": f"qlib-r-{os.getpid()}"})
    had_mlruns = (Path.cwd() / "mlruns").exists()
    cluster = Cluster(settings, extra_env={"PYTHONPATH": str(TESTS)})
    try:
        cluster.start_worker(settings.default_queue, concurrency=1)
        cluster.wait_ready(app_for(settings), timeout=120)
        trainer = TrainerCelery("qlib_r_celery", task_pool="qlib_r", timeout=300, settings=settings, qlib_init=_qlib_init(tmp_path / "p"))
        recs = trainer.train([r_task(0), r_task(1)])
    finally:
        for proc in reversed(cluster.procs):
            proc.stop(timeout=20)
        cluster.procs.clear()
    _assert_task_runs(recs, "qlib_r_celery", settings)
    # the workers ran in this directory: Qlib's default store was not made there
    assert (Path.cwd() / "mlruns").exists() == had_mlruns
