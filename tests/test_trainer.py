"""task_train and the trainers, on a real MongoDB pool and a real MLflow store.

The rolling flow is Qlib's examples/model_rolling/task_manager_rolling.py in qcelery
terms: rolling tasks for two models, trained by TrainerRM workers in two processes,
collected with RecorderCollector keyed by (model class, test segment), filtered to one
model, and joined by RollingGroup into one series over the whole test span.
"""

from __future__ import annotations

import copy
import multiprocessing

import pandas as pd
import pytest

from qcelery import status as st
from qcelery.calendar import default_calendar
from qcelery.collect import RecorderCollector, RollingGroup
from qcelery.errors import ConfigError
from qcelery.exp import Recorder, get_experiment, recorder_from_tags
from qcelery.gen import RollingGen, task_generator
from qcelery.manage import TaskManager
from qcelery.records import RecordError
from qcelery.serial import restricted_loads
from qcelery.trainer import (
    ERROR_TAG,
    DelayTrainerR,
    DelayTrainerRM,
    TrainerR,
    TrainerRM,
    TrainingFailedError,
    task_train,
)

HANDLER = {
    "class": "SyntheticAlphaHandler",
    "module_path": "qcelery.data",
    "kwargs": {
        "instruments": 30,
        "start_time": "2019-01-02",
        "end_time": "2020-12-31",
        "fit_start_time": "2019-01-02",
        "fit_end_time": "2019-12-31",
        "seed": 3,
        "signal_strength": 0.08,
    },
}
LINEAR = {"class": "LinearModel", "module_path": "qcelery.models", "kwargs": {"alpha": 1.0}}
LGB = {
    "class": "LGBModel",
    "module_path": "qcelery.models",
    "kwargs": {"num_boost_round": 20, "num_leaves": 8, "learning_rate": 0.1, "num_threads": 1},
}
RECORDS = [
    {"class": "SignalRecord", "module_path": "qcelery.records", "kwargs": {"model": "<MODEL>", "dataset": "<DATASET>"}},
    {"class": "SigAnaRecord", "module_path": "qcelery.records", "kwargs": {"ann_scaler": 252}},
    {"class": "PortAnaRecord", "module_path": "qcelery.records", "kwargs": {"topk": 5}},
]


def make_task(model: dict = LINEAR, records: list | None = None, test=("2020-04-01", "2020-12-31")) -> dict:
    return {
        "model": copy.deepcopy(model),
        "dataset": {
            "class": "DatasetH",
            "module_path": "qcelery.data",
            "kwargs": {
                "handler": copy.deepcopy(HANDLER),
                "segments": {"train": ("2019-01-02", "2019-12-31"), "valid": ("2020-01-02", "2020-03-31"), "test": test},
            },
        },
        "record": copy.deepcopy(RECORDS if records is None else records),
    }


def test_task_train_makes_one_finished_run_with_params_model_predictions_and_metrics(settings, mongo_db):
    rec = task_train(make_task(), "exp_one", settings=settings, tags={"pool": "p1", "task_id": "abc"})

    assert rec.status == Recorder.STATUS_FI
    tags = rec.list_tags()
    assert (tags["pool"], tags["task_id"], tags["model"]) == ("p1", "abc", "LinearModel")
    assert (tags["test_start"], tags["test_end"]) == ("2020-04-01", "2020-12-31")
    params = rec.list_params()
    assert params["model.class"] == "LinearModel"
    assert params["dataset.kwargs.handler.kwargs.seed"] == "3"
    assert rec.load_object("task") == make_task()
    pred, label = rec.load_object("pred.pkl"), rec.load_object("label.pkl")
    assert list(pred.columns) == ["score"] and pred.index.names == ["datetime", "instrument"]
    assert pred.index.equals(label.index)
    days = pred.index.get_level_values("datetime")
    assert days.min() >= pd.Timestamp("2020-04-01") and days.max() <= pd.Timestamp("2020-12-31")
    metrics = rec.list_metrics()
    for key in (
        "IC",
        "ICIR",
        "Rank IC",
        "Rank ICIR",
        "long_short.annualized_return",
        "long_short.information_ratio",
        "long_short.max_drawdown",
    ):
        assert key in metrics
    assert metrics["IC"] > 0  # the planted signal is found out of sample
    ic = rec.load_object("sig_analysis/ic.pkl")
    assert ic.mean() == pytest.approx(metrics["IC"])
    model = rec.load_object("params.pkl")
    assert model.predict(_dataset_of(rec)).equals(pred["score"])


def _dataset_of(rec: Recorder):
    from qcelery.instance import init_instance_by_config

    return init_instance_by_config(rec.load_object("task")["dataset"])


def test_recorder_as_task_result_is_small_and_decodes_through_the_restricted_unpickler(settings, mongo_db):
    rec = task_train(make_task(records=[]), "exp_res", settings=settings)
    from qcelery.serial import dumps

    data = dumps(rec)
    assert len(data) < 400
    back = restricted_loads(data)
    assert back == rec and back.status == Recorder.STATUS_FI


def test_bad_model_class_fails_that_task_with_a_clear_error(settings, mongo_db):
    bad = make_task(model={"class": "NoSuchModel", "module_path": "qcelery.models"}, records=[])
    good = make_task(records=[])
    trainer = TrainerRM("exp_bad", "pool_bad", settings=settings)

    with pytest.raises(TrainingFailedError) as info:
        trainer.train([bad, good])

    err = info.value
    assert "NoSuchModel" in str(err) and "qcelery.models" in str(err)
    assert len(err.failures) == 1 and len(err.recorders) == 1
    tm = TaskManager("pool_bad", settings)
    failed = tm.re_query(err.failures[0]["task_id"])
    assert failed["status"] == st.FAILED
    assert "module 'qcelery.models' has no class 'NoSuchModel'" in failed["error"]
    assert failed["attempt"] == settings.max_attempts
    ((good_id, good_rec),) = err.recorders.items()
    assert tm.re_query(good_id)["status"] == st.DONE
    assert good_rec.status == Recorder.STATUS_FI


def test_bad_module_in_task_train_names_the_module_and_fails_the_run(settings, mongo_db):
    task = make_task(model={"class": "Ridge", "module_path": "no_such_package.models"}, records=[])
    # a module of the user's own must be in the allow-list (else it is refused unimported)
    settings = settings.model_copy(update={"allowed_modules": ["no_such_package"]})
    with pytest.raises(ConfigError, match="cannot import module 'no_such_package.models' for class 'Ridge'"):
        task_train(task, "exp_badmod", settings=settings)
    exp = get_experiment("exp_badmod", settings)
    (rec,) = exp.list_recorders(rtype="list")
    assert rec.status == Recorder.STATUS_FA
    assert "no_such_package" in rec.list_tags()[ERROR_TAG]


def test_a_record_that_raises_is_reported_with_its_name_and_run(settings, mongo_db):
    records = [RECORDS[0], {"class": "SigAnaRecord", "module_path": "qcelery.records", "kwargs": {"label_col": 5}}]
    with pytest.raises(RecordError, match=r"record #1 SigAnaRecord of run \w+ raised IndexError") as info:
        task_train(make_task(records=records), "exp_rec", settings=settings)
    assert isinstance(info.value.__cause__, IndexError)
    (rec,) = get_experiment("exp_rec", settings).list_recorders(rtype="list")
    assert rec.status == Recorder.STATUS_FA
    assert "SigAnaRecord" in rec.list_tags()[ERROR_TAG]
    assert "pred.pkl" in rec.list_artifacts()  # what ran before the failing record is kept


def test_trainer_r_returns_recorders_in_task_order_and_delay_trainer_r_trains_in_end_train(settings, mongo_db):
    tasks = [make_task(records=[], test=("2020-04-01", "2020-06-30")), make_task(records=[], test=("2020-07-01", "2020-12-31"))]
    recs = TrainerR("exp_r", settings=settings)(tasks)
    assert [r.list_tags()["test_start"] for r in recs] == ["2020-04-01", "2020-07-01"]
    assert all(r.list_tags()[TrainerR.STATUS_KEY] == TrainerR.STATUS_END for r in recs)

    delay = DelayTrainerR("exp_dr", settings=settings)
    begun = delay.train(tasks)
    assert [r.status for r in begun] == [Recorder.STATUS_S] * 2
    assert "params.pkl" not in begun[0].list_artifacts()
    ended = delay.end_train(begun)
    assert [r.status for r in ended] == [Recorder.STATUS_FI] * 2
    assert "params.pkl" in ended[0].list_artifacts()


def test_delay_trainer_rm_trains_in_two_phases_through_part_done(settings, mongo_db):
    tasks = [make_task(test=("2020-04-01", "2020-06-30")), make_task(test=("2020-07-01", "2020-12-31"))]
    trainer = DelayTrainerRM("exp_drm", "pool_drm", settings=settings)
    tm = TaskManager("pool_drm", settings)

    begun = trainer.train(tasks)
    assert tm.task_stat() == {st.PART_DONE: 2}
    assert [r.status for r in begun] == [Recorder.STATUS_S] * 2

    ended = trainer.end_train(begun)
    assert tm.task_stat() == {st.DONE: 2}
    assert ended == begun
    assert all(r.status == Recorder.STATUS_FI and "IC" in r.list_metrics() for r in ended)


def _pool_worker(experiment: str, pool: str, settings, counts) -> None:
    counts.put(TrainerRM(experiment, pool, settings=settings).worker())


def test_rolling_tasks_of_two_models_trained_by_two_worker_processes_and_collected_per_model(settings, mongo_db):
    pytest.importorskip("lightgbm")
    calendar = default_calendar("XSHG")
    tasks = task_generator([make_task(LINEAR), make_task(LGB)], RollingGen(step=60, rtype=RollingGen.ROLL_SD, calendar=calendar))
    windows = {t["dataset"]["kwargs"]["segments"]["test"] for t in tasks}
    assert len(tasks) == 2 * len(windows) and len(windows) >= 3

    exp_name, pool = "rolling_exp", "rolling_pool"
    tm = TaskManager(pool, settings)
    tm.create_task(tasks)
    get_experiment(exp_name, settings)
    # spawn: a forked child would inherit (and try to close) earlier tests' broker connections
    ctx = multiprocessing.get_context("spawn")
    counts = ctx.Queue()
    workers = [ctx.Process(target=_pool_worker, args=(exp_name, pool, settings, counts)) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        recs = TrainerRM(exp_name, pool, skip_run_task=True, settings=settings).train(tasks)
    finally:
        for w in workers:
            w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert sum(counts.get(timeout=5) for _ in workers) == len(tasks)
    assert tm.task_stat() == {st.DONE: len(tasks)}

    # a result leads back to its task and a task to its run
    for task_id, rec in zip(tm.create_task(tasks), recs, strict=True):
        tags = rec.list_tags()
        assert (tags["pool"], tags["task_id"], tags[TrainerRM.TM_ID]) == (pool, str(task_id), str(task_id))
        assert recorder_from_tags(get_experiment(exp_name, settings), task_id=str(task_id)) == [rec]

    def rec_key(recorder):
        task = recorder.load_object("task")
        return task["model"]["class"], task["dataset"]["kwargs"]["segments"]["test"]

    def only_lgb(recorder):
        return rec_key(recorder)[0] == "LGBModel"

    collector = RecorderCollector(
        experiment=get_experiment(exp_name, settings),
        process_list=RollingGroup(),
        rec_key_func=rec_key,
        rec_filter_func=only_lgb,
    )
    collected = collector()
    assert list(collected) == ["pred"]
    assert list(collected["pred"]) == [("LGBModel",)]
    joined = collected["pred"][("LGBModel",)]
    assert not joined.index.duplicated().any()
    days = joined.index.get_level_values("datetime").unique()
    test_start = min(w[0] for w in windows)
    test_end = max(w[1] for w in windows)
    expected = calendar.dates[(calendar.dates >= test_start) & (calendar.dates <= test_end)]
    assert days.equals(expected)  # every day of every window, each once
