"""Collectors, processors and the batch summary."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qcelery import status as st
from qcelery.collect import (
    AverageEnsemble,
    Collector,
    MergeCollector,
    RecorderCollector,
    RollingGroup,
    SingleKeyEnsemble,
    summarize_batch,
)
from qcelery.errors import TaskTypeError
from qcelery.exp import LoadObjectError, Recorder, get_experiment
from qcelery.manage import TaskManager

INSTRUMENTS = [f"S{i}" for i in range(12)]
DAYS = pd.bdate_range("2021-01-04", periods=60)


def frame(days: pd.DatetimeIndex, seed: int, column: str = "score") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    idx = pd.MultiIndex.from_product([days, INSTRUMENTS], names=["datetime", "instrument"])
    return pd.DataFrame({column: rng.normal(size=len(idx))}, index=idx)


def window_task(model: str, window: tuple) -> dict:
    return {
        "model": {"class": model, "module_path": "qcelery.models"},
        "dataset": {"class": "DatasetH", "kwargs": {"segments": {"test": window}}},
        "record": [{"class": "PortAnaRecord", "kwargs": {"topk": 3}}],
    }


@pytest.fixture
def rolling_runs(settings):
    """Two models x three 20-day windows, like a trained rolling batch."""
    exp = get_experiment("rolling", settings)
    label = frame(DAYS, 0, "LABEL0")
    recs = []
    for m, model in enumerate(["LinearModel", "LGBModel"]):
        for w in range(3):
            days = DAYS[w * 20 : (w + 1) * 20]
            window = (days[0], days[-1])
            rec = exp.create_recorder(tags={"task_id": f"{model}-{w}"})
            noise = frame(days, 10 * m + w)["score"]
            pred = (label.loc[days, "LABEL0"] * (0.5 if m == 0 else 0.1) + noise).to_frame("score")
            rec.save_objects(**{"pred.pkl": pred, "label.pkl": label.loc[days], "task": window_task(model, window)})
            rec.log_metrics(IC=0.1 * (m + 1), ICIR=1.0)
            rec.end_run(Recorder.STATUS_FI)
            recs.append(rec)
    return exp, recs


def rec_key(rec):
    task = rec.load_object("task")
    return task["model"]["class"], task["dataset"]["kwargs"]["segments"]["test"]


def test_recorder_collector_keys_filters_and_status(rolling_runs):
    exp, recs = rolling_runs
    unfinished = exp.create_recorder()  # RUNNING: not collected by default
    collected = RecorderCollector(
        exp,
        rec_key_func=rec_key,
        rec_filter_func=lambda r: rec_key(r)[0] == "LinearModel",
        artifacts_path={"pred": "pred.pkl", "label": "label.pkl"},
        artifacts_key="pred",
    ).collect()
    assert list(collected) == ["pred"]
    assert {k[0] for k in collected["pred"]} == {"LinearModel"} and len(collected["pred"]) == 3

    raw = RecorderCollector(exp, artifacts_key=RecorderCollector.ART_KEY_RAW, status=None).collect()
    assert set(raw[RecorderCollector.ART_KEY_RAW]) == {r.id for r in recs} | {unfinished.id}
    tagged = RecorderCollector(exp, list_kwargs={"filter_string": "tags.task_id = 'LGBModel-1'"}).collect()
    assert list(tagged["pred"]) == [recs[4].id]

    missing = RecorderCollector(exp, artifacts_path={"ic": "sig_analysis/ic.pkl"})
    assert missing.collect() == {}
    with pytest.raises(LoadObjectError):
        missing.collect(only_exist=False)


def test_rolling_group_joins_windows_into_one_series_per_model_without_overlap():
    first, second = frame(DAYS[:30], 1), frame(DAYS[20:50], 2)  # 10 days overlap
    joined = RollingGroup()({("M", "w1"): first, ("M", "w2"): second, ("N", "w1"): first})
    assert set(joined) == {("M",), ("N",)}
    m = joined[("M",)]
    assert not m.index.duplicated().any()
    assert m.index.get_level_values("datetime").unique().equals(DAYS[:50])
    pd.testing.assert_frame_equal(m.loc[DAYS[20:50]], second.sort_index())  # the later window wins the overlap
    with pytest.raises(TaskTypeError, match="tuple keys"):
        RollingGroup()({"not-a-tuple": first})


def test_average_ensemble_and_single_key_ensemble():
    a, b = frame(DAYS[:5], 1), frame(DAYS[:5], 2)
    avg = AverageEnsemble()({"a": a, "nested": {"b": b}})

    def z(f: pd.DataFrame) -> pd.Series:
        return f.groupby(level="datetime").transform(lambda s: (s - s.mean()) / s.std())["score"]

    pd.testing.assert_series_equal(avg, ((z(a) + z(b)) / 2).sort_index(), check_names=False)
    assert SingleKeyEnsemble()({"only": {"inner": 3}}) == 3


def test_merge_collector_and_dill_pickled_collectors_carry_user_functions(rolling_runs, tmp_path):
    exp, recs = rolling_runs
    offset = 7
    collector = RecorderCollector(exp, rec_key_func=lambda r: (r.list_tags()["task_id"], offset))
    collector.to_pickle(tmp_path / "c.pkl")
    loaded = Collector.load(tmp_path / "c.pkl")
    assert set(loaded.collect()["pred"]) == {(r.list_tags()["task_id"], 7) for r in recs}
    merged = MergeCollector({"A": loaded}, merge_func=lambda ck, k: f"{ck}:{k}").collect()
    assert list(merged) == ["A:pred"]


def test_summarize_batch_scores_each_model_over_the_whole_test_span_and_writes_a_report(settings, rolling_runs):
    exp, recs = rolling_runs
    failures = [{"task_id": "bad1", "error": "ConfigError: module 'qcelery.models' has no class 'Nope'"}]
    out = summarize_batch(recs, experiment_name="rolling", batch_id="b1", settings=settings, failures=failures)

    json.dumps(out)  # small and JSON-able
    models = {m["model"]: m for m in out["models"]}
    assert set(models) == {"LinearModel", "LGBModel"}
    lin = models["LinearModel"]
    assert lin["n_tasks"] == 3 and (lin["test_start"], lin["test_end"]) == ("2021-01-04", DAYS[59].strftime("%Y-%m-%d"))
    assert lin["IC"] > models["LGBModel"]["IC"]  # the stronger planted signal wins
    assert {"ICIR", "Rank IC", "Rank ICIR", "annualized_return", "information_ratio", "max_drawdown"} <= set(lin)
    assert len(out["tasks"]) == 6 and out["failures"] == failures
    assert {row["run_id"] for row in out["tasks"]} == {r.id for r in recs}

    report = out["report_path"]
    html = Path(report).read_text(encoding="utf-8")
    assert "Model comparison" in html and html.count("data:image/png;base64,") == 2 and "Nope" in html
    summary_exp = get_experiment(out["experiment_name"], settings, create=False)
    run = summary_exp.get_recorder(recorder_id=out["summary_run_id"])
    assert {"models.csv", "tasks.csv", "failures.csv", "ic_by_window.png", "cumulative_long_short.png", "report.html"} <= set(
        run.list_artifacts()
    )
    assert run.list_tags()["batch_id"] == "b1" and run.status == Recorder.STATUS_FI
    # the task experiment stays clean for Qlib-style collectors
    assert set(exp.list_recorders()) == {r.id for r in recs}


def test_summarize_batch_from_the_pool_reads_done_results_and_failures(settings, mongo_db, rolling_runs):
    exp, recs = rolling_runs
    tm = TaskManager("sum_pool", settings)
    ids = tm.create_task([{"model": {"i": i}, "dataset": {}} for i in range(3)])
    for task_id, res in zip(ids[:2], recs[:2], strict=True):
        task = tm.fetch_task({"_id": task_id})
        tm.commit(task, res)
    bad = tm.fetch_task({"_id": ids[2]})
    tm.task_pool.update_one({"_id": ids[2]}, {"$set": {"max_attempts": 1}})
    tm.fail({**bad, "max_attempts": 1}, "Traceback ...\nConfigError: no class 'Nope'")
    assert tm.task_stat() == {st.DONE: 2, st.FAILED: 1}

    tm.task_pool.update_many({"_id": {"$in": ids}}, {"$set": {"batch_ids": ["b2"]}})  # the batch's tasks carry its id
    out = summarize_batch(tm, experiment_name="rolling", settings=settings, batch={"_id": "b2"})
    assert [row["task_id"] for row in out["tasks"]] == [str(i) for i in ids[:2]]
    assert out["failures"] == [{"task_id": str(ids[2]), "error": "ConfigError: no class 'Nope'"}]
    assert out["models"][0]["model"] == "LinearModel" and out["models"][0]["n_tasks"] == 2


def test_collect_on_another_host_downloads_the_report_from_the_summary_run(settings, mongo_db, rolling_runs, tmp_path):
    """The aggregating worker wrote the report under its own run directory; `collect` run
    with another run directory (another machine, where that path does not exist) shows
    files of its own, fetched from the summary run's artifacts, not the worker's paths."""
    import shutil

    from bson import ObjectId
    from cli_support import cli_env, qcelery

    _, recs = rolling_runs
    out = summarize_batch(recs, experiment_name="rolling", batch_id="b3", settings=settings)
    worker_report = Path(out["report_path"])
    expected = worker_report.read_bytes()
    shutil.rmtree(worker_report.parent)  # that machine's disk is not this one's
    bid = ObjectId()
    mongo_db["qcelery_batches"].insert_one(
        {
            "_id": bid,
            "pool": "rolling",
            "state": "aggregated",
            "n_tasks": len(recs),
            "summary": out,
            "created_at": datetime.now(timezone.utc),
        }
    )
    here = tmp_path / "producer-host"
    env = cli_env(settings.model_copy(update={"run_dir": here}))
    proc = qcelery("collect", "--batch", str(bid), cwd=tmp_path, env=env, timeout=120)

    assert proc.returncode == 0, proc.stderr
    [report_line] = [line for line in proc.stdout.splitlines() if line.startswith("report: ")]
    shown = Path(report_line.removeprefix("report: "))
    assert shown.is_relative_to(here.resolve()) and shown.read_bytes() == expected
    [plots_line] = [line for line in proc.stdout.splitlines() if line.startswith("plots: ")]
    assert all(Path(p).is_file() and Path(p).is_relative_to(here.resolve()) for p in plots_line.removeprefix("plots: ").split(", "))
    assert str(worker_report) not in proc.stdout
