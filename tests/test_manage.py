"""The task pool (``qcelery.manage``): Qlib's ``TaskManager`` API and what it adds.

Every test runs against the real MongoDB-wire server of the session (SecantusDB by
default) with a database of its own. The lease contract (claim, fetch order, fencing,
recovery) runs once per claim path (``each_claim_path``); the other tests claim with
``find_one_and_update``, the path real MongoDB takes.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time

import numpy as np
import pandas as pd
import pymongo
import pytest
from bson import Binary, ObjectId
from claims_support import DEFAULT_CLAIM_PATH, each_claim_path, with_claim_path
from pydantic import ValidationError
from pymongo import monitoring

from qcelery.errors import LeaseLostError, TaskDefinitionError, TaskNotFoundError, UnsafePickleError
from qcelery.manage import Heartbeat, TaskManager, format_exception, run_task, to_object_id, utcnow
from qcelery.serial import dumps
from qcelery.settings import Settings
from qcelery.store import RESULT_BUCKET, result_fs, scans_find_and_modify


def task_def(i: int, model: str = "LinearModel") -> dict:
    """A Qlib-shaped task definition."""
    return {
        "model": {"class": model, "module_path": "qlib.contrib.model.linear", "kwargs": {"alpha": 0.1 * i}},
        "dataset": {
            "class": "DatasetH",
            "kwargs": {
                "segments": {"train": ("2010-01-01", "2014-12-31"), "test": (pd.Timestamp("2015-01-01"), pd.Timestamp("2015-12-31"))}
            },
        },
        "record": [{"class": "SignalRecord"}],
        "i": i,
    }


@pytest.fixture
def claim_strategy() -> str:
    """The claim path of a test not decorated with ``each_claim_path``."""
    return DEFAULT_CLAIM_PATH


@pytest.fixture
def settings(settings, claim_strategy):
    return with_claim_path(settings, claim_strategy)


@pytest.fixture
def tm(settings, mongo_db) -> TaskManager:
    return TaskManager("pool", settings)


def far_future() -> dt.datetime:
    return utcnow() + dt.timedelta(days=1)


def add_one(x, inc=1):
    """A task function for run_task (module level, so a child process can load it)."""
    return {"out": x["i"] + inc} if "i" in x else {"out": x["out"] + inc}


def pid_of_runner(x):
    return os.getpid()


# ----------------------------------------------------------------------- create_task
def test_create_task_returns_ids_in_input_order_and_stores_qlib_fields(tm):
    defs = [task_def(i) for i in range(5)]
    ids = tm.create_task(defs)
    assert len(ids) == 5 and all(isinstance(i, ObjectId) for i in ids)
    for i, _id in enumerate(ids):
        t = tm.re_query(_id)
        assert t["def"] == defs[i]
        assert t["status"] == TaskManager.STATUS_WAITING == "waiting"
        assert t["res"] is None
        assert t["filter"]["i"] == i
        assert t["attempt"] == 0 and t["max_attempts"] == tm.settings.max_attempts
    assert tm.task_pool.count_documents({}) == 5


def test_create_task_again_inserts_nothing_and_returns_the_same_ids(tm):
    defs = [task_def(i) for i in range(20)]
    first = tm.create_task(defs)
    # the same tasks, shuffled, with one new and one repeated inside the list
    again = [defs[7], task_def(100), defs[3], defs[7]]
    ids = tm.create_task(again)
    assert ids[0] == first[7] and ids[2] == first[3] and ids[3] == first[7]
    assert ids[1] not in first
    assert tm.task_pool.count_documents({}) == 21


def test_create_task_dedups_equal_values_of_different_types(tm):
    a = {"seg": ("2020-01-01", "2020-06-30"), "n": 3, "t": pd.Timestamp("2020-01-02")}
    b = {"n": np.int64(3), "t": dt.date(2020, 1, 2), "seg": ["2020-01-01", "2020-06-30"]}
    assert tm.create_task([a]) == tm.create_task([b])
    # the definition is kept as given (pickled), only the filter is normalised
    t = tm.re_query(tm.create_task([a])[0])
    assert t["def"]["seg"] == ("2020-01-01", "2020-06-30")
    assert t["filter"] == {"seg": ["2020-01-01", "2020-06-30"], "n": 3, "t": "2020-01-02"}


def test_create_task_dry_run_writes_nothing_and_print_nt_prints_new_tasks(tm, capsys):
    tm.create_task([task_def(0)])
    assert tm.create_task([task_def(0), task_def(1)], dry_run=True, print_nt=True) == []
    printed = capsys.readouterr().out
    assert "'i': 1" in printed and "'i': 0" not in printed
    assert tm.task_pool.count_documents({}) == 1
    new, old = tm.plan([task_def(0), task_def(1), task_def(1)])
    assert new == [task_def(1)] and old == [task_def(0)]


def test_create_task_of_an_empty_list(tm):
    assert tm.create_task([]) == []


def test_filter_is_queryable_by_nested_keys(tm):
    ids = tm.create_task([task_def(0, "LinearModel"), task_def(1, "LGBModel"), task_def(2, "LGBModel")])
    lgb = [t["_id"] for t in tm.query({"filter.model.class": "LGBModel"})]
    assert sorted(lgb) == sorted(ids[1:])
    # query values are normalised like stored filters: a tuple finds the stored list
    found = list(tm.query({"filter.dataset.kwargs.segments.train": ("2010-01-01", "2014-12-31")}))
    assert len(found) == 3
    found = list(tm.query({"filter.dataset.kwargs.segments.test": [pd.Timestamp("2015-01-01"), pd.Timestamp("2015-12-31")]}))
    assert len(found) == 3


def count_commands(settings, fn):
    """Run ``fn`` with a client of its own and count the commands sent to the server."""
    listener.events.clear()
    listener.active = True
    try:
        fn()
    finally:
        listener.active = False
    return dict(listener.counts())


class _Listener(monitoring.CommandListener):
    def __init__(self):
        self.active, self.events = False, []

    def started(self, event):
        if self.active:
            self.events.append(event.command_name)

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass

    def counts(self):
        out: dict[str, int] = {}
        for name in self.events:
            out[name] = out.get(name, 0) + 1
        return out


listener = _Listener()
monitoring.register(listener)  # only clients created from now on see it


def test_create_task_is_a_few_round_trips_per_thousand_tasks(settings, mongo_db):
    # a timeout of its own gives this test a fresh client, created after the listener
    s = settings.model_copy(update={"mongo_timeout_ms": 4321})
    tm = TaskManager("pool", s)
    defs = [task_def(i) for i in range(1000)]
    fresh = count_commands(s, lambda: tm.create_task(defs))
    again = count_commands(s, lambda: tm.create_task(defs))
    assert tm.task_pool.count_documents({}) == 1000
    assert fresh.get("insert") == 1
    assert sum(fresh.values()) <= 15, fresh
    assert "insert" not in again and sum(again.values()) <= 15, again


# ---------------------------------------------------------------- inserts & replace
def test_insert_task_def_and_insert_task(tm):
    r = tm.insert_task_def(task_def(0))
    t = tm.re_query(r.inserted_id)
    assert t["status"] == "waiting" and t["def"] == task_def(0)
    with pytest.raises(TaskDefinitionError, match="identical task"):
        tm.insert_task_def(task_def(0))
    # Qlib's low-level insert of an already encoded document, twice, without a hash
    raw = {"def": Binary(__import__("pickle").dumps({"x": 1})), "filter": {"x": 1}, "status": "waiting"}
    a = tm.insert_task(dict(raw)).inserted_id
    b = tm.insert_task({"def": raw["def"], "filter": {"x": 2}, "status": "waiting"}).inserted_id
    assert tm.re_query(a)["def"] == {"x": 1} and tm.re_query(b)["status"] == "waiting"
    # such a task is found by create_task like any other
    assert tm.create_task([{"x": 1}]) == [a]


def test_replace_task(tm):
    _id = tm.create_task([task_def(0)])[0]
    task = tm.re_query(_id)
    new = dict(task, **{"def": task_def(9), "filter": task_def(9)})
    tm.replace_task(task, new)
    t = tm.re_query(_id)
    assert t["def"] == task_def(9) and t["filter"]["i"] == 9
    # the replaced filter takes part in deduplication
    assert tm.create_task([task_def(9)]) == [_id]
    assert tm.create_task([task_def(0)]) != [_id]


def test_replace_task_onto_an_existing_filter_is_refused(tm):
    a, b = tm.create_task([task_def(0), task_def(1)])
    task = tm.re_query(a)
    with pytest.raises(TaskDefinitionError, match="already"):
        tm.replace_task(task, dict(task, **{"def": task_def(1), "filter": task_def(1)}))
    assert tm.re_query(a)["def"] == task_def(0)


# -------------------------------------------------------------------- fetch / query
@each_claim_path
def test_fetch_task_takes_highest_priority_first_and_leases_it(tm):
    ids = tm.create_task([task_def(i) for i in range(3)])
    tm.prioritize(ids[1], 5)
    tm.prioritize({"_id": str(ids[2])}, 3)
    order = []
    while (t := tm.fetch_task()) is not None:
        order.append(t["_id"])
        assert t["status"] == "running" and t["attempt"] == 1
        assert t["lease_until"] > utcnow() and t["worker"]
        assert isinstance(t["def"], dict)
    assert order == [ids[1], ids[2], ids[0]]
    assert tm.task_stat() == {"running": 3}


@each_claim_path
def test_fetch_task_with_query_and_status(tm):
    ids = tm.create_task([task_def(0, "A"), task_def(1, "B")])
    t = tm.fetch_task({"filter.model.class": "B"})
    assert t["_id"] == ids[1]
    assert tm.fetch_task({"filter.model.class": "B"}) is None
    assert tm.fetch_task(status="part_done") is None


@each_claim_path
def test_safe_fetch_task_returns_the_task_when_the_body_raises(tm):
    _id = tm.create_task([task_def(0)])[0]
    with pytest.raises(RuntimeError, match="boom"), tm.safe_fetch_task() as task:
        assert task["_id"] == _id and tm.re_query(_id)["status"] == "running"
        raise RuntimeError("boom")
    t = tm.re_query(_id)
    assert t["status"] == "waiting" and t["worker"] is None and t["lease_until"] is None
    with tm.safe_fetch_task() as task:
        assert task["_id"] == _id
    with tm.safe_fetch_task() as task:
        assert task is None


@each_claim_path
def test_task_fetcher_iter_yields_each_task_once(tm):
    ids = tm.create_task([task_def(i) for i in range(4)])
    seen = []
    for task in tm.task_fetcher_iter():
        seen.append(task["_id"])
        tm.commit_task_res(task, {"ok": task["def"]["i"]})
    assert sorted(seen) == sorted(ids)
    assert tm.task_stat() == {"done": 4}


def test_query_and_re_query(tm):
    ids = tm.create_task([task_def(i) for i in range(3)])
    raw = list(tm.query({"_id": str(ids[0])}, decode=False))
    assert len(raw) == 1 and isinstance(raw[0]["def"], bytes)
    decoded = list(tm.query({"_id": {"$in": [str(i) for i in ids[1:]]}}))
    assert sorted(t["def"]["i"] for t in decoded) == [1, 2]
    assert tm.re_query(str(ids[2]))["def"] == task_def(2)
    with pytest.raises(TaskNotFoundError, match=str(ObjectId("0" * 24))):
        tm.re_query("0" * 24)
    assert to_object_id(ids[0]) == to_object_id(str(ids[0])) == to_object_id({"_id": ids[0]})


# ----------------------------------------------------------------- commit / return
@each_claim_path
def test_commit_task_res_qlib_style_and_leased(tm):
    a, b = tm.create_task([task_def(0), task_def(1)])
    # Qlib style: a task from query (not leased by this pool) is committed as is
    tm.commit_task_res(tm.re_query(a), {"score": 1.5})
    t = tm.re_query(a)
    assert t["status"] == "done" and t["res"] == {"score": 1.5}
    # a leased task is committed fenced on its attempt
    task = tm.fetch_task()
    assert task["_id"] == b
    tm.commit_task_res(task, [1, 2], status=TaskManager.STATUS_PART_DONE)
    assert tm.re_query(b)["status"] == "part_done" and tm.re_query(b)["res"] == [1, 2]
    with pytest.raises(LeaseLostError, match=str(b)):
        tm.commit_task_res(task, [3])  # the lease ended with the first commit
    assert tm.re_query(b)["res"] == [1, 2]


@each_claim_path
def test_return_task(tm):
    _id = tm.create_task([task_def(0)])[0]
    task = tm.fetch_task()
    tm.return_task(task)
    assert tm.re_query(_id)["status"] == "waiting"
    task = tm.fetch_task()
    tm.return_task(task, status=TaskManager.STATUS_PART_DONE)
    assert tm.re_query(_id)["status"] == "part_done"


def test_remove_and_task_stat(tm):
    ids = tm.create_task([task_def(i, "A" if i % 2 else "B") for i in range(6)])
    tm.commit_task_res(tm.re_query(ids[0]), 1)
    assert tm.task_stat() == {"waiting": 5, "done": 1}
    assert tm.task_stat({"filter.model.class": "A"}) == {"waiting": 3}
    assert tm.remove({"filter.model.class": "A"}) == 3
    assert tm.task_stat() == {"waiting": 2, "done": 1}
    assert tm.remove() == 3
    assert tm.task_stat() == {}


@each_claim_path
def test_reset_waiting_puts_running_tasks_back(tm):
    ids = tm.create_task([task_def(i, "A" if i % 2 else "B") for i in range(4)])
    for _ in ids:
        tm.fetch_task()
    assert tm.reset_waiting({"filter.model.class": "A"}) == 2
    assert tm.task_stat() == {"waiting": 2, "running": 2}
    assert tm.reset_waiting() == 2
    t = tm.re_query(ids[0])
    assert t["status"] == "waiting" and t["worker"] is None and t["lease_until"] is None
    # a worker that still holds one of them cannot commit any more once it is re-claimed
    assert tm.task_stat() == {"waiting": 4}


def test_reset_status(tm):
    ids = tm.create_task([task_def(i) for i in range(3)])
    assert tm.reset_status({"_id": ids[0]}, "done") == 1
    assert tm.task_stat() == {"waiting": 2, "done": 1}


def test_prioritize_unknown_task(tm):
    with pytest.raises(TaskNotFoundError):
        tm.prioritize(ObjectId(), 1)


def test_list_names_the_pools(settings, mongo_db):
    TaskManager("alpha", settings).create_task([task_def(0)])
    TaskManager("beta", settings).create_task([task_def(0)])
    assert TaskManager.list(settings) == ["alpha", "beta"]


def test_indexes_cover_claim_recover_dedup_and_batches(tm):
    info = tm.task_pool.index_information()
    keys = {tuple(k for k, _ in v["key"]): v for v in info.values()}
    assert keys[("filter_hash",)].get("unique") is True
    assert ("status", "priority") in keys
    assert ("status", "lease_until") in keys
    assert ("batch_ids", "status", "published_at") in keys  # a batch by status, and its window (qcelery.dispatch)
    assert ("status", "published_at") in keys


def test_indexes_come_back_after_the_pool_is_dropped(settings, mongo_db):
    tm = TaskManager("pool", settings)
    tm.task_pool.drop()
    tm = TaskManager("pool", settings)
    tm.create_task([task_def(0)])
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        tm.task_pool.insert_one(dict(tm.get_raw(tm.create_task([task_def(0)])[0]), _id=ObjectId()))


# -------------------------------------------------------------------------- wait
def test_wait_returns_at_once_when_nothing_is_undone(tm):
    tm.create_task([task_def(0)])
    tm.commit_task_res(tm.fetch_task(), 1)
    assert tm.wait(poll=0.05) == {"done": 1}


def test_wait_blocks_until_workers_finish_and_shows_progress(tm, capsys):
    tm.create_task([task_def(i) for i in range(3)])

    def worker():
        for task in tm.task_fetcher_iter():
            time.sleep(0.1)
            tm.commit_task_res(task, 1)

    th = threading.Thread(target=worker)
    th.start()
    try:
        assert tm.wait(poll=0.05, progress=True) == {"done": 3}
    finally:
        th.join()
    assert "3/3" in capsys.readouterr().err


def test_wait_times_out(tm):
    tm.create_task([task_def(0)])
    with pytest.raises(TimeoutError, match="1 tasks still undone"):
        tm.wait(poll=0.05, timeout=0.2, progress=False)


# --------------------------------------------------------------------- run_task
def test_run_task_runs_every_waiting_task(tm):
    tm.create_task([task_def(i) for i in range(3)])
    assert run_task(add_one, tm, inc=10) is True
    assert sorted(t["res"]["out"] for t in tm.query()) == [10, 11, 12]
    assert tm.task_stat() == {"done": 3}
    assert run_task(add_one, tm) is False


@each_claim_path
def test_run_task_two_phases_through_part_done(tm):
    ids = tm.create_task([task_def(i) for i in range(2)])
    # phase 1 reads def and leaves part_done; phase 2 reads phase 1's res
    assert run_task(add_one, tm, before_status="waiting", after_status="part_done")
    assert tm.task_stat() == {"part_done": 2}
    assert run_task(add_one, tm, query={"_id": ids[0]}, before_status="part_done", after_status="part_done", inc=5)
    assert tm.re_query(ids[0])["res"] == {"out": 6}
    assert run_task(add_one, tm, before_status="part_done", after_status="done", inc=100)
    assert [tm.re_query(i)["res"]["out"] for i in ids] == [106, 102]
    assert tm.task_stat() == {"done": 2}
    t = tm.re_query(ids[0])
    assert t["attempt"] == 3  # one claim per phase run


def test_run_task_error_returns_the_task_and_propagates(tm):
    _id = tm.create_task([{"no_i": 1}])[0]
    with pytest.raises(KeyError):
        run_task(add_one, tm)
    t = tm.re_query(_id)
    assert t["status"] == "waiting" and t["worker"] is None


def test_run_task_force_release_runs_in_a_child_process(tm):
    _id = tm.create_task([task_def(0)])[0]
    assert run_task(pid_of_runner, tm, force_release=True)
    assert tm.re_query(_id)["res"] != os.getpid()


def test_run_task_by_pool_name_reads_settings_from_environment(settings, mongo_db, monkeypatch):
    for k, v in settings.to_env().items():
        monkeypatch.setenv(k, v)
    TaskManager("named", settings).create_task([task_def(0)])
    assert run_task(add_one, "named")
    assert TaskManager("named", settings).task_stat() == {"done": 1}


# ----------------------------------------------------- leases: claim/heartbeat/fail
@pytest.mark.parametrize("strategy", ["find_one_and_update", "two_step", "auto"])
def test_claim_strategy_chooses_the_claim_path(settings, mongo_db, strategy):
    # the two-step claim stamps a token and finds its claim by it; find_one_and_update has no need of one
    tm = TaskManager("pool", with_claim_path(settings, strategy))
    a, b = tm.create_task([task_def(0), task_def(1)])
    by_id, fetched = tm.claim(a), tm.fetch_task()
    assert (by_id["_id"], fetched["_id"]) == (a, b)
    two_steps = strategy == "two_step" or (strategy == "auto" and scans_find_and_modify(settings))
    assert {"claim_token" in tm.get_raw(i) for i in (a, b)} == {two_steps}


def test_claim_strategy_is_validated_naming_the_value(settings, monkeypatch, tmp_path):
    with pytest.raises(ValidationError, match=r"claim_strategy 'findAndModify' is not one of auto, find_one_and_update, two_step"):
        with_claim_path(settings, "findAndModify")
    for key in [k for k in os.environ if k.startswith("QCELERY_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no qcelery.toml
    assert Settings().claim_strategy == "auto"
    monkeypatch.setenv("QCELERY_CLAIM_STRATEGY", "two-step")
    with pytest.raises(ValidationError, match=r"claim_strategy 'two-step' is not one of"):
        Settings()
    monkeypatch.setenv("QCELERY_CLAIM_STRATEGY", "two_step")
    assert Settings().claim_strategy == "two_step"
    # workers and beat get the settings as variables: the strategy travels with them
    assert with_claim_path(settings, "find_one_and_update").to_env()["QCELERY_CLAIM_STRATEGY"] == "find_one_and_update"


@each_claim_path
def test_fetch_task_keeps_priority_order_past_one_list_of_candidates(tm):
    # more tasks than the two-step path reads candidates at once (32), priorities interleaved
    ids = tm.create_task([task_def(i) for i in range(90)])
    for k, _id in enumerate(ids):
        tm.prioritize(_id, k % 7)

    def drain(query: dict | None) -> list[int]:
        taken = []
        while (t := tm.fetch_task(query)) is not None:
            taken.append(t["priority"])
        return taken

    # a query the server answers from the _id index, in insertion order: only the sort orders it
    first = drain({"_id": {"$in": ids[:60]}})
    assert len(first) == 60 and first == sorted(first, reverse=True)
    rest = drain(None)
    assert len(rest) == 30 and rest == sorted(rest, reverse=True)
    assert tm.task_stat() == {"running": 90}


@each_claim_path
def test_claim_by_id_sets_running_attempt_lease_and_worker(tm):
    _id = tm.create_task([task_def(0)])[0]
    before = utcnow()
    t = tm.claim(str(_id), worker="host:1", lease_seconds=30)
    assert t["status"] == "running" and t["attempt"] == 1 and t["worker"] == "host:1"
    assert before + dt.timedelta(seconds=29) < t["lease_until"] < utcnow() + dt.timedelta(seconds=31)
    assert t["def"] == task_def(0)
    assert tm.claim(_id) is None  # already running: a duplicate message does nothing


@each_claim_path
def test_claim_of_done_or_missing_task_is_none(tm):
    _id = tm.create_task([task_def(0)])[0]
    tm.commit(tm.claim(_id), 1)
    assert tm.claim(_id) is None
    assert tm.claim(ObjectId()) is None


@each_claim_path
def test_heartbeat_extends_the_lease_of_the_holder_only(tm):
    _id = tm.create_task([task_def(0)])[0]
    t = tm.claim(_id, lease_seconds=1)
    assert tm.heartbeat(_id, t["attempt"], lease_seconds=100)
    assert tm.get_raw(_id)["lease_until"] > utcnow() + dt.timedelta(seconds=90)
    assert not tm.heartbeat(_id, t["attempt"] + 1)


@each_claim_path
def test_heartbeat_thread_keeps_the_lease_and_notices_a_takeover(tm):
    _id = tm.create_task([task_def(0)])[0]
    t = tm.claim(_id, lease_seconds=1)  # the heartbeat extends it to settings.lease_seconds
    first = tm.get_raw(_id)["lease_until"]
    with Heartbeat(tm, t, interval=0.05) as hb:
        deadline = time.monotonic() + 10
        while tm.get_raw(_id)["lease_until"] == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert tm.get_raw(_id)["lease_until"] > first
        tm.recover_expired(now=far_future())
        tm.claim(_id)
        assert hb.lost.wait(10)


@each_claim_path
def test_fail_retries_until_max_attempts_then_keeps_the_traceback(settings, mongo_db):
    tm = TaskManager("pool", settings.model_copy(update={"max_attempts": 2}))
    _id = tm.create_task([task_def(0)])[0]
    try:
        raise ValueError("bad data")
    except ValueError as exc:
        error = format_exception(exc)
    assert tm.fail(tm.claim(_id), error) == "waiting"
    t = tm.re_query(_id)
    assert t["status"] == "waiting" and "bad data" in t["error"]
    assert tm.fail(tm.claim(_id), error) == "failed"
    t = tm.re_query(_id)
    assert t["status"] == "failed" and "Traceback" in t["error"] and "ValueError: bad data" in t["error"]
    assert t["finished_at"] is not None and t["attempt"] == 2
    assert tm.claim(_id) is None


@each_claim_path
def test_fail_after_lost_lease_writes_nothing(tm):
    _id = tm.create_task([task_def(0)])[0]
    stale = tm.claim(_id)
    tm.recover_expired(now=far_future())
    tm.claim(_id)
    before = tm.get_raw(_id)
    assert tm.fail(stale, "late") is None
    assert tm.get_raw(_id) == before


@each_claim_path
def test_recover_expired_puts_back_expired_leases_only(settings, mongo_db):
    tm = TaskManager("pool", settings.model_copy(update={"max_attempts": 2}))
    a, b, c = tm.create_task([task_def(i) for i in range(3)])
    tm.claim(a, lease_seconds=5)
    tm.claim(b, lease_seconds=3600)
    assert tm.recover_expired() == []  # nothing expired yet
    soon = utcnow() + dt.timedelta(seconds=60)
    assert tm.recover_expired(now=soon) == [a]
    assert tm.re_query(a)["status"] == "waiting" and tm.re_query(b)["status"] == "running"
    # a second expiry exhausts the attempts: failed, and not returned for re-publishing
    tm.claim(a, lease_seconds=5)
    assert tm.recover_expired(now=soon + dt.timedelta(seconds=60)) == []
    t = tm.re_query(a)
    assert t["status"] == "failed" and "lease expired" in t["error"]
    assert tm.re_query(c)["status"] == "waiting"


@each_claim_path
def test_recover_expired_of_a_second_phase_returns_it_to_part_done(tm):
    _id = tm.create_task([task_def(0)])[0]
    tm.commit(tm.claim(_id), {"phase": 1}, "part_done")
    tm.claim(_id, before_status="part_done")
    assert tm.recover_expired(now=far_future()) == [_id]
    t = tm.re_query(_id)
    assert t["status"] == "part_done" and t["res"] == {"phase": 1}


@each_claim_path
def test_zombie_commit_after_recovery_and_reclaim_is_rejected(settings, mongo_db):
    tm = TaskManager("pool", settings.model_copy(update={"lease_seconds": 0.5, "heartbeat_seconds": 0.1}))
    _id = tm.create_task([task_def(0)])[0]
    zombie = tm.claim(_id)
    assert tm.recover_expired(now=far_future()) == [_id]
    fresh = tm.claim(_id, worker="new:2")
    assert fresh["attempt"] == zombie["attempt"] + 1
    before = tm.get_raw(_id)
    assert tm.commit(zombie, {"stale": True}) is False
    with pytest.raises(LeaseLostError):
        tm.commit_task_res(zombie, {"stale": True})
    assert not tm.heartbeat(_id, zombie["attempt"])
    assert tm.get_raw(_id) == before
    assert tm.commit(fresh, {"fresh": True}) is True
    assert tm.re_query(_id)["res"] == {"fresh": True}


@each_claim_path
def test_retry_failed_gives_a_fresh_attempt_budget(settings, mongo_db):
    tm = TaskManager("pool", settings.model_copy(update={"max_attempts": 1}))
    _id = tm.create_task([task_def(0)])[0]
    assert tm.fail(tm.claim(_id), "err") == "failed"
    assert tm.retry_failed() == [_id]
    t = tm.re_query(_id)
    assert t["status"] == "waiting" and t["error"] is None
    assert tm.fail(tm.claim(_id), "err again") == "failed"  # one more attempt, then failed
    assert tm.retry_failed({"filter.i": 99}) == []


@each_claim_path
def test_retry_failed_returns_a_second_phase_failure_to_part_done_with_its_result(settings, mongo_db):
    tm = TaskManager("pool", settings.model_copy(update={"max_attempts": 1}))
    _id = tm.create_task([task_def(0)])[0]
    assert tm.commit(tm.claim(_id), {"phase": 1}, "part_done")
    assert tm.fail(tm.claim(_id, before_status="part_done"), "phase 2 broke") == "failed"
    assert tm.retry_failed() == [_id]
    t = tm.re_query(_id)
    assert (t["status"], t["res"], t["error"]) == ("part_done", {"phase": 1}, None)
    assert tm.claim(_id) is None  # not back to the first phase
    assert tm.commit(tm.claim(_id, before_status="part_done"), {"phase": 2})
    assert tm.re_query(_id)["status"] == "done"


# ------------------------------------------------------------------ results & GridFS
def test_big_results_go_to_gridfs_and_come_back(settings, mongo_db):
    tm = TaskManager("pool", settings.model_copy(update={"gridfs_threshold": 10_000}))
    _id = tm.create_task([task_def(0)])[0]
    big = pd.DataFrame({"score": np.arange(5000, dtype=float)})
    assert tm.commit(tm.claim(_id), big, "part_done")
    raw = tm.get_raw(_id)
    # no res field at all (Qlib's TaskManager would unpickle a None), the file under a name
    # Qlib does not decode (it unpickles every field starting with 'def' or 'res')
    assert "res" not in raw and raw["gridfs_result"] is not None
    assert not [k for k in raw if k.startswith(("def", "res")) and k not in ("def",)]
    pd.testing.assert_frame_equal(tm.re_query(_id)["res"], big)
    files = mongo_db[f"{RESULT_BUCKET}.files"]
    assert files.count_documents({}) == 1
    # a new result replaces the file; a small one lives in the document again
    assert tm.commit(tm.claim(_id, before_status="part_done"), {"small": 1})
    assert tm.re_query(_id)["res"] == {"small": 1}
    assert "gridfs_result" not in tm.get_raw(_id)
    assert files.count_documents({}) == 0
    _id2 = tm.create_task([task_def(1)])[0]
    tm.commit(tm.claim(_id2), big)
    assert files.count_documents({}) == 1
    tm.remove({"_id": _id2})
    assert files.count_documents({}) == 0


def test_a_result_file_under_the_old_field_name_is_still_read_kept_and_replaced(settings, mongo_db):
    """Pools committed before the rename keep ``res_file: <id>, res: None``: read as before,
    never collected as orphans, and rewritten under the new names by the next commit."""
    tm = TaskManager("pool", settings.model_copy(update={"gridfs_threshold": 1000}))
    _id = tm.create_task([task_def(0)])[0]
    fid = result_fs(mongo_db).put(dumps(np.arange(3_000.0)), task_id=_id, pool="pool")
    tm.task_pool.update_one({"_id": _id}, {"$set": {"status": "part_done", "res": None, "res_file": fid}})
    np.testing.assert_array_equal(tm.re_query(_id)["res"], np.arange(3_000.0))
    assert tm.drop_orphan_result_files(older_than=0) == 0

    assert tm.commit(tm.claim(_id, before_status="part_done"), {"small": 1})
    raw = tm.get_raw(_id)
    assert "res_file" not in raw and "gridfs_result" not in raw and tm.re_query(_id)["res"] == {"small": 1}
    assert mongo_db[f"{RESULT_BUCKET}.files"].count_documents({}) == 0  # the old file went with its reference


@each_claim_path
def test_a_lost_commit_leaves_no_gridfs_file(settings, mongo_db):
    tm = TaskManager("pool", settings.model_copy(update={"gridfs_threshold": 1000}))
    _id = tm.create_task([task_def(0)])[0]
    zombie = tm.claim(_id)
    tm.recover_expired(now=far_future())
    tm.claim(_id)
    assert tm.commit(zombie, np.zeros(10_000)) is False
    assert mongo_db[f"{RESULT_BUCKET}.files"].count_documents({}) == 0


def test_result_files_left_by_interrupted_commits_are_collected_once_old(settings, mongo_db):
    from qcelery.beat import BEAT_LOG, gc_results
    from qcelery.celery_app import app_for

    settings = settings.model_copy(update={"gridfs_threshold": 1000})
    tm, other = TaskManager("pool", settings), TaskManager("other", settings)
    kept, cut, foreign = tm.create_task([task_def(0), task_def(1)]) + other.create_task([task_def(2)])
    assert tm.commit(tm.claim(kept), np.ones(5_000))  # a finished task's file
    # a worker killed between writing the result file and the update that points to it
    _, orphan = tm._encode_res(np.zeros(5_000), to_object_id(cut))
    _, foreign_orphan = other._encode_res(np.zeros(5_000), to_object_id(foreign))
    files = mongo_db[f"{RESULT_BUCKET}.files"]
    assert files.count_documents({}) == 3

    assert tm.drop_orphan_result_files(older_than=3600) == 0  # its commit may still be under way
    assert tm.drop_orphan_result_files(older_than=0) == 1
    assert {f["_id"] for f in files.find()} == {tm.get_raw(kept)["gridfs_result"], foreign_orphan}
    assert orphan not in {f["_id"] for f in files.find()}
    np.testing.assert_array_equal(tm.re_query(kept)["res"], np.ones(5_000))

    # the beat job goes over every pool and logs what it did
    app = app_for(settings.model_copy(update={"result_gc_after": 0.001}))
    assert gc_results(app, beat="b1") == {"result_files_dropped": 1, "failed_pools": []}
    assert files.count_documents({}) == 1
    log = mongo_db[BEAT_LOG].find_one({"job": "gc_results"})
    assert (log["beat"], log["result_files_dropped"]) == ("b1", 1)


class Custom:
    def __init__(self, v):
        self.v = v


def test_results_of_user_classes_need_their_module_allowed(settings, mongo_db):
    _id = TaskManager("pool", settings).create_task([task_def(0)])[0]
    tm = TaskManager("pool", settings)
    tm.commit(tm.claim(_id), Custom(3))
    with pytest.raises(UnsafePickleError, match=str(_id)):
        tm.re_query(_id)
    trusted = TaskManager("pool", settings.model_copy(update={"allowed_modules": [Custom.__module__]}))
    assert trusted.re_query(_id)["res"].v == 3
