"""config/qlib_lightgbm_alpha158.yaml (issue 13.7): Qlib's LightGBM + Alpha158 benchmark
shape, with Qlib's own model, dataset and handler, trained by qcelery on the synthetic
market written as a Qlib provider; real pyqlib and LightGBM."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from qcelery.config import load_workflow
from qcelery.data.qlib_provider import write_qlib_provider
from qcelery.exp import Recorder
from qcelery.gen import task_generator
from qcelery.qlib_bridge import provider_calendar
from qcelery.trainer import TrainerR

CONFIG = Path(__file__).resolve().parents[1] / "config" / "qlib_lightgbm_alpha158.yaml"


def test_qlib_benchmark_config_runs_on_the_synthetic_provider(settings, tmp_path):
    # the provider the file's header writes, here under tmp_path
    provider = write_qlib_provider(tmp_path / "synthetic", instruments=20, start_time="2021-01-04", end_time="2023-12-29")
    text = CONFIG.read_text().replace("provider_uri: .qcelery/qlib_data/synthetic", f"provider_uri: {provider}")
    workflow = tmp_path / "workflow.yaml"
    workflow.write_text(text)
    qlib_init = yaml.safe_load(text)["qlib_init"]

    tasks = task_generator(*load_workflow(workflow, settings=settings))
    # rolled on the provider's calendar: 2023 in windows of 80 of its trading days
    days = list(provider_calendar(qlib_init).dates)
    first = days.index(pd.Timestamp("2023-01-03"))
    assert [t["dataset"]["kwargs"]["segments"]["test"][0] for t in tasks] == [days[first], days[first + 80], days[first + 160]]
    # the last window ends before the data does: PortAnaRecord's backtest trades the next day
    assert tasks[-1]["dataset"]["kwargs"]["segments"]["test"][1] < days[-1]

    recs = TrainerR("qlib_lightgbm_alpha158", settings=settings, qlib_init=qlib_init).train(tasks[:1])
    assert recs[0].status == Recorder.STATUS_FI
    pred = recs[0].load_object("pred.pkl")
    test = tasks[0]["dataset"]["kwargs"]["segments"]["test"]
    assert len(pred) == 20 * len([d for d in days if test[0] <= d <= test[1]])
    metrics = recs[0].client.get_run(recs[0].id).data.metrics
    # LightGBM's training curves, logged by Qlib's LGBModel through R, are on the task's run
    assert {"l2.train", "l2.valid"} <= set(metrics), sorted(metrics)
    # Qlib's own SigAnaRecord and PortAnaRecord (TopkDropoutStrategy backtest) on qcelery's recorder
    assert {"IC", "Rank IC", "1day.excess_return_with_cost.annualized_return"} <= set(metrics)
    assert "portfolio_analysis/port_analysis_1day.pkl" in recs[0].list_artifacts("portfolio_analysis")


def test_qlib_benchmark_config_on_a_celery_worker(settings, tmp_path):
    """The same file through the Celery path: the batch carries qlib_init, the worker
    initialises Qlib, builds Qlib's Alpha158 (through the GridFS handler cache) and trains
    Qlib's LightGBM; its curves land on each task's run."""
    from qcelery.celery_app import app_for
    from qcelery.cluster import Cluster
    from qcelery.trainer import TrainerCelery

    provider = write_qlib_provider(tmp_path / "synthetic", instruments=20, start_time="2021-01-04", end_time="2023-12-29")
    text = CONFIG.read_text().replace("provider_uri: .qcelery/qlib_data/synthetic", f"provider_uri: {provider}")
    workflow = tmp_path / "workflow.yaml"
    workflow.write_text(text)
    qlib_init = yaml.safe_load(text)["qlib_init"]
    tasks = task_generator(*load_workflow(workflow, settings=settings))[:2]

    cluster = Cluster(settings)
    try:
        cluster.start_worker(settings.default_queue, concurrency=1)
        cluster.wait_ready(app_for(settings), timeout=120)
        recs = TrainerCelery("qlib_alpha158_celery", task_pool="qlib_alpha158", timeout=600, settings=settings, qlib_init=qlib_init).train(
            tasks
        )
    finally:
        for proc in reversed(cluster.procs):
            proc.stop(timeout=20)
        cluster.procs.clear()
    assert [r.status for r in recs] == [Recorder.STATUS_FI] * 2
    for rec in recs:
        assert {"l2.train", "l2.valid", "IC", "1day.excess_return_with_cost.annualized_return"} <= set(
            rec.client.get_run(rec.id).data.metrics
        )
        assert len(rec.load_object("pred.pkl")) > 0
