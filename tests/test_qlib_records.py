"""Qlib's own records as task parts (issue 13.2), with real pyqlib, LightGBM and a Celery worker.

Qlib's LightGBM + Alpha158 task with Qlib's ``SignalRecord``, ``SigAnaRecord`` and
``PortAnaRecord`` (Qlib's ``TopkDropoutStrategy`` and backtest, configured as in Qlib's
``examples/benchmarks/LightGBM/workflow_config_lightgbm_Alpha158.yaml``), rolled over a few
windows of the synthetic market written as a Qlib provider, runs on a real qcelery worker
with qcelery's recorder; Qlib's own ``qlib.model.trainer.TrainerR`` runs the same tasks in
this process. Every task's predictions (index and values), labels, IC / Rank IC and the
backtest's risk analysis are the same.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pandas as pd
import pytest

from qcelery.celery_app import app_for
from qcelery.cluster import Cluster
from qcelery.data.qlib_provider import write_qlib_provider
from qcelery.exp import Recorder
from qcelery.gen import RollingGen, task_generator
from qcelery.qlib_bridge import _process_tracking_uri_kept, ensure_qlib_init, provider_calendar
from qcelery.trainer import TrainerCelery

#: the market's span; the rolled test windows end well before the data does (the last window
#: runs a full step past TEST_END, and the backtest trades on the day after a prediction)
START, END = "2022-01-04", "2023-07-31"
TEST_END = "2023-05-10"
#: the artifacts Qlib's three records write, beside pred.pkl
RECORD_ARTIFACTS = {"label.pkl", "sig_analysis/ic.pkl", "sig_analysis/ric.pkl", "portfolio_analysis/port_analysis_1day.pkl"}


def qlib_lightgbm_task(codes: list[str]) -> dict:
    """Qlib's LightGBM + Alpha158 benchmark task (smaller, deterministic: fixed threads and seed)
    with Qlib's three records; the backtest's benchmark is the market's mean return (the
    synthetic provider has no index)."""
    port_analysis_config = {
        "strategy": {
            "class": "TopkDropoutStrategy",
            "module_path": "qlib.contrib.strategy",
            "kwargs": {"signal": "<PRED>", "topk": 4, "n_drop": 1},
        },
        "backtest": {
            "start_time": None,  # PortAnaRecord takes each window's span from its predictions
            "end_time": None,
            "account": 100000000,
            "benchmark": codes,
            "exchange_kwargs": {"limit_threshold": 0.095, "deal_price": "close", "open_cost": 0.0005, "close_cost": 0.0015, "min_cost": 5},
        },
    }
    handler = {
        "class": "Alpha158",
        "module_path": "qlib.contrib.data.handler",
        "kwargs": {"start_time": START, "end_time": END, "fit_start_time": START, "fit_end_time": "2022-09-30", "instruments": "all"},
    }
    return {
        "model": {
            "class": "LGBModel",
            "module_path": "qlib.contrib.model.gbdt",
            "kwargs": {"loss": "mse", "num_boost_round": 30, "num_leaves": 7, "learning_rate": 0.05, "num_threads": 1, "seed": 7},
        },
        "dataset": {
            "class": "DatasetH",
            "module_path": "qlib.data.dataset",
            "kwargs": {
                "handler": handler,
                "segments": {"train": [START, "2022-09-30"], "valid": ["2022-10-01", "2022-12-30"], "test": ["2023-01-03", TEST_END]},
            },
        },
        "record": [
            {"class": "SignalRecord", "module_path": "qlib.workflow.record_temp", "kwargs": {"model": "<MODEL>", "dataset": "<DATASET>"}},
            {"class": "SigAnaRecord", "module_path": "qlib.workflow.record_temp", "kwargs": {"ana_long_short": False, "ann_scaler": 252}},
            {"class": "PortAnaRecord", "module_path": "qlib.workflow.record_temp", "kwargs": {"config": port_analysis_config}},
        ],
    }


@pytest.fixture
def qlib_market(tmp_path):
    provider = write_qlib_provider(tmp_path / "provider", instruments=12, start_time=START, end_time=END)
    codes = [line.split("\t")[0] for line in (provider / "instruments" / "all.txt").read_text().splitlines()]
    return {"provider_uri": str(provider), "region": "cn"}, codes


def _qlib_trainer_r(tasks: list[dict], qlib_init: dict, settings, mlruns: Path) -> list:
    """Qlib's own ``TrainerR`` on ``tasks`` in this process, its ``R`` on a store of its own."""
    from qlib.model.trainer import TrainerR as QlibTrainerR

    exp_manager = {
        "class": "MLflowExpManager",
        "module_path": "qlib.workflow.expm",
        "kwargs": {"uri": mlruns.as_uri(), "default_exp_name": "qlib_default"},
    }
    with _process_tracking_uri_kept():  # Qlib's R sets MLflow's URI process-wide; not for the next tests
        ensure_qlib_init({**qlib_init, "exp_manager": exp_manager}, settings.allowed_modules, where="Qlib's TrainerR")
        return QlibTrainerR(experiment_name="qlib_own").train(copy.deepcopy(tasks))  # Qlib edits the configs it builds from


def test_qlib_records_on_a_celery_worker_match_qlibs_own_trainer(settings, qlib_market, tmp_path, monkeypatch):
    qlib_init, codes = qlib_market
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # Qlib's own store below is a file store, as qcelery's
    tasks = task_generator(qlib_lightgbm_task(codes), RollingGen(step=40, rtype=RollingGen.ROLL_SD, calendar=provider_calendar(qlib_init)))
    assert len(tasks) == 3

    cluster = Cluster(settings)
    try:
        cluster.start_worker(settings.default_queue, concurrency=1)
        cluster.wait_ready(app_for(settings), timeout=120)
        recs = TrainerCelery("qlib_records", task_pool="qlib_records", timeout=600, settings=settings, qlib_init=qlib_init).train(tasks)
    finally:
        cluster.stop()
    assert [r.status for r in recs] == [Recorder.STATUS_FI] * 3

    # Qlib's MLflowExpManager puts its lock for a file:///abs URI under ./abs (relative): not in the checkout
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    qlib_recs = _qlib_trainer_r(tasks, qlib_init, settings, tmp_path / "qlib_mlruns")

    for task, ours, theirs in zip(tasks, recs, qlib_recs, strict=True):
        test = task["dataset"]["kwargs"]["segments"]["test"]
        pred = ours.load_object("pred.pkl")
        # same index, same values: Qlib's model and data through qcelery's worker and handler cache
        pd.testing.assert_frame_equal(pred, theirs.load_object("pred.pkl"), check_exact=True)
        days = pred.index.get_level_values("datetime")
        assert days.min() == test[0] and days.max() == test[1] and len(pred) == 12 * days.nunique()
        pd.testing.assert_frame_equal(ours.load_object("label.pkl"), theirs.load_object("label.pkl"), check_exact=True)
        artifacts = set(ours.list_artifacts()) | {a for d in ("sig_analysis", "portfolio_analysis") for a in ours.list_artifacts(d)}
        assert artifacts >= RECORD_ARTIFACTS, sorted(artifacts)
        pd.testing.assert_frame_equal(
            ours.load_object("portfolio_analysis/port_analysis_1day.pkl", allowed_modules=["qlib"]),
            theirs.load_object("portfolio_analysis/port_analysis_1day.pkl"),
        )

        metrics, qlib_metrics = ours.list_metrics(), theirs.list_metrics()
        analysis = {"IC", "ICIR", "Rank IC", "Rank ICIR"} | {k for k in qlib_metrics if k.startswith("1day.excess_return")}
        assert len(analysis) == 4 + 10, sorted(qlib_metrics)  # mean, std, annualized_return, information_ratio, max_drawdown x 2
        for key in sorted(analysis):
            assert math.isclose(metrics[key], qlib_metrics[key], rel_tol=1e-9, abs_tol=1e-12), (key, metrics[key], qlib_metrics[key])
        # and LightGBM's curves, through Qlib's R, on the task's own run
        assert {"l2.train", "l2.valid"} <= set(metrics)


def test_qlibs_records_are_built_and_load_by_qlibs_rules_on_qcelerys_recorder(settings):
    """The two seams, without a worker: a missing artifact on qcelery's recorder is Qlib's
    ``LoadObjectError`` too (Qlib's ``RecordTemp.load`` falls back to the record it depends on
    only on that type), and Qlib's ``PortAnaRecord``, which takes ``model`` / ``dataset`` through
    ``**kwargs`` and refuses them further down, is built as Qlib builds it (without them)."""
    from qlib.utils.exceptions import LoadObjectError as QlibLoadObjectError
    from qlib.workflow.record_temp import PortAnaRecord, SigAnaRecord, SignalRecord

    from qcelery.exp import LoadObjectError, get_experiment
    from qcelery.instance import init_instance_by_config

    rec = get_experiment("seams", settings).create_recorder()
    rec.save_objects(**{"pred.pkl": pd.DataFrame({"score": [1.0]})})
    with pytest.raises(QlibLoadObjectError) as raised:
        rec.load_object("sig_analysis/pred.pkl")
    assert isinstance(raised.value, LoadObjectError)
    # Qlib's own fallback from sig_analysis/pred.pkl to SignalRecord's pred.pkl
    assert SigAnaRecord(recorder=rec).load("pred.pkl")["score"].tolist() == [1.0]

    try_kwargs = {"model": object(), "dataset": object()}
    signal = init_instance_by_config(
        {"class": "SignalRecord", "module_path": "qlib.workflow.record_temp"}, recorder=rec, try_kwargs=try_kwargs
    )
    assert isinstance(signal, SignalRecord) and signal.model is try_kwargs["model"]
    port = init_instance_by_config(
        {
            "class": "PortAnaRecord",
            "module_path": "qlib.workflow.record_temp",
            "kwargs": {"config": qlib_lightgbm_task(["A"])["record"][2]["kwargs"]["config"]},
        },
        recorder=rec,
        try_kwargs=try_kwargs,
    )
    assert isinstance(port, PortAnaRecord) and port.recorder is rec
    assert port.strategy_config["class"] == "TopkDropoutStrategy"


@pytest.mark.parametrize(
    ("model", "records_from"),
    [
        ({"class": "LGBModel", "module_path": "qlib.contrib.model.gbdt"}, "qlib.workflow.record_temp"),
        ({"class": "qlib.contrib.model.gbdt.LGBModel"}, "qlib.workflow.record_temp"),
        ({"class": "LinearModel", "module_path": "qcelery.models"}, "qcelery.records"),
    ],
)
def test_a_record_without_module_path_comes_from_the_tasks_side(model, records_from):
    """As Qlib's task_train does, a record config without module_path is Qlib's own in a Qlib
    task; in a task of qcelery's models it is qcelery's. Decided by the task, never by what
    ran in the worker process before."""
    from qcelery.trainer import _default_record_module

    assert _default_record_module({"model": model, "dataset": {"class": "DatasetH", "module_path": "qcelery.data"}}) == records_from


def test_a_fitted_qlib_alpha158_is_loaded_from_the_shared_cache(settings, qlib_market):
    """What every worker but the builder does: load Qlib's fitted Alpha158 from GridFS through
    the allow-listing unpickler (its CSZScoreNorm keeps Qlib's zscore function, which the
    default allow-list must admit), and get the same data."""
    from qcelery.data import HandlerCache
    from qcelery.data.cache import clear_memory

    qlib_init, codes = qlib_market
    ensure_qlib_init(qlib_init, settings.allowed_modules, where="test")
    config = qlib_lightgbm_task(codes)["dataset"]["kwargs"]["handler"]
    clear_memory()
    built = HandlerCache(settings).get(config)
    clear_memory()  # as in another worker process: nothing in memory
    cache = HandlerCache(settings)
    loaded = cache.get(config)
    assert dict(cache.stats) == {"store": 1}
    pd.testing.assert_frame_equal(loaded.fetch(col_set="label"), built.fetch(col_set="label"))
    pd.testing.assert_frame_equal(loaded.fetch(col_set="feature"), built.fetch(col_set="feature"))
