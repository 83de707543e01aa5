"""Porting a Qlib script by changing imports (issue 13 point 5): the calls Qlib's own
``qlib.workflow.task.utils`` / ``collect`` / ``manage`` users make, on real servers.

* ``RecorderCollector("name")`` and ``list_recorders(experiment, rec_filter_func)`` find
  the experiment without settings passed (read from the environment, as the trainers do);
* ``get_mongodb()`` is the task pools' database;
* ``replace_task_handler_with_cache(task, cache_dir)`` reuses a handler pickled there;
* ``safe_fetch_task()`` / ``task_fetcher_iter()`` keep the task's lease alive while the
  caller holds it, so beat's recovery does not hand it to another worker.
"""

from __future__ import annotations

import time

import pandas as pd
import pytest

from qcelery import status as st
from qcelery.collect import RecorderCollector, list_recorders
from qcelery.data import SyntheticAlphaHandler, replace_task_handler_with_cache
from qcelery.data.cache import clear_memory
from qcelery.exp import Recorder, get_experiment
from qcelery.manage import TaskManager
from qcelery.store import get_mongodb

HANDLER = {
    "class": "SyntheticAlphaHandler",
    "module_path": "qcelery.data",
    "kwargs": {"instruments": 5, "start_time": "2020-01-02", "end_time": "2020-06-30", "seed": 11},
}


@pytest.fixture
def from_environment(settings, monkeypatch, tmp_path):
    """The test's servers named only by environment variables, as a Qlib script on a
    configured machine would find them."""
    monkeypatch.chdir(tmp_path)  # no ./qcelery.toml of the repository's
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    return settings


def finished_run(settings, experiment: str, name: str, value: float) -> Recorder:
    rec = get_experiment(experiment, settings).create_recorder(name, tags={"model": name})
    rec.save_objects(**{"pred.pkl": pd.Series([value], name="score")})
    rec.end_run(Recorder.STATUS_FI)
    return rec


def test_recorder_collector_and_list_recorders_need_no_settings(from_environment, mongo_db):
    a = finished_run(from_environment, "ported", "lgb", 1.0)
    b = finished_run(from_environment, "ported", "linear", 2.0)

    collected = RecorderCollector("ported")()
    assert {rid: s.tolist() for rid, s in collected["pred"].items()} == {a.id: [1.0], b.id: [2.0]}

    assert set(list_recorders("ported")) == {a.id, b.id}
    only_lgb = list_recorders("ported", rec_filter_func=lambda rec: rec.list_tags()["model"] == "lgb")
    assert list(only_lgb) == [a.id] and only_lgb[a.id].id == a.id


def test_get_mongodb_is_the_pools_database(from_environment, mongo_db):
    TaskManager("ported_pool", from_environment).create_task([{"key": 1}])
    db = get_mongodb()
    assert db.name == from_environment.mongo_db
    assert "ported_pool" in db.list_collection_names()


@pytest.mark.parametrize("qlib_call", ["positional", "keyword"])
def test_replace_task_handler_with_cache_takes_qlibs_cache_dir(tmp_path, qlib_call):
    task = {"model": {"class": "LinearModel"}, "dataset": {"class": "DatasetH", "kwargs": {"handler": HANDLER, "segments": {}}}}
    cache_dir = tmp_path / "handlers"

    def replace():
        if qlib_call == "positional":
            return replace_task_handler_with_cache(task, str(cache_dir))
        return replace_task_handler_with_cache(task, cache_dir=cache_dir)

    clear_memory()
    first = replace()["dataset"]["kwargs"]["handler"]
    assert isinstance(first, SyntheticAlphaHandler)
    (stored,) = cache_dir.glob("*.pkl")
    clear_memory()  # a new process: only the directory remembers
    second = replace()["dataset"]["kwargs"]["handler"]
    assert second is not first and second.fetch().equals(first.fetch())
    assert list(cache_dir.glob("*.pkl")) == [stored]
    assert task["dataset"]["kwargs"]["handler"] == HANDLER  # the caller's task is left alone


@pytest.mark.parametrize("how", ["safe_fetch_task", "task_fetcher_iter"])
def test_a_task_held_past_its_lease_by_a_fetch_loop_is_not_taken_over(settings, mongo_db, how):
    fast = settings.model_copy(update={"lease_seconds": 4.0, "heartbeat_seconds": 0.5})
    tm = TaskManager("held", fast)
    tm.create_task([{"key": "long"}])

    def hold_and_commit(task):
        # a training that outlasts its lease twice over, while beat recovers expired leases
        for _ in range(8):
            time.sleep(fast.lease_seconds / 4)
            assert tm.recover_expired() == []
        tm.commit_task_res(task, {"trained": True})

    if how == "safe_fetch_task":
        with tm.safe_fetch_task() as task:
            hold_and_commit(task)
    else:
        for task in tm.task_fetcher_iter():
            hold_and_commit(task)

    (doc,) = list(tm.query())
    assert (doc["status"], doc["attempt"], doc["res"]) == (st.DONE, 1, {"trained": True})
