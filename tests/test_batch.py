"""Batch documents: which batches beat's sweep re-checks, and the leased, fenced aggregation
steps (directly, and through ``aggregate_batch`` in this process against the real store)."""

from __future__ import annotations

import datetime as _dt
import threading
import time

import pytest

from qcelery import batch as batches
from qcelery import status as st
from qcelery.celery_app import app_for
from qcelery.manage import TaskManager, utcnow
from qcelery.probes import AGGREGATIONS
from qcelery.worker import aggregate_batch


@pytest.fixture
def tm(settings, mongo_db):
    return TaskManager("batches", settings)


def new_batch(tm: TaskManager, key: str, *, age: float = 0.0, **fields) -> dict:
    doc, _ = batches.create(
        tm,
        [{"key": key}],
        queue="q",
        task_func="qcelery.probes.noop",
        task_kwargs=None,
        before_status=st.WAITING,
        after_status=st.DONE,
        aggregate=None,
    )
    fields["created_at"] = utcnow() - _dt.timedelta(seconds=age)
    tm.db[batches.COLLECTION].update_one({"_id": doc["_id"]}, {"$set": fields})
    return batches.load(tm.db, doc["_id"])


def stalled_ids(tm: TaskManager, older_than: float, max_runs: int | None = None) -> set:
    return {d["_id"] for d in batches.stalled(tm.db, older_than, max_runs)}


def test_a_new_batch_is_not_stalled_until_it_is_older_than_the_cutoff(tm):
    young = new_batch(tm, "young", age=1)
    old = new_batch(tm, "old", age=120)
    assert stalled_ids(tm, 60) == {old["_id"]}
    assert stalled_ids(tm, 0.5) == {young["_id"], old["_id"]}


def test_a_recent_or_pending_check_keeps_an_old_batch_off_the_list(tm):
    now = utcnow()
    checked = new_batch(tm, "checked", age=300, next_check_at=now - _dt.timedelta(seconds=10))
    pending = new_batch(tm, "pending", age=300, next_check_at=now + _dt.timedelta(seconds=30))
    forgotten = new_batch(tm, "forgotten", age=300, next_check_at=now - _dt.timedelta(seconds=200))
    assert stalled_ids(tm, 60) == {forgotten["_id"]}
    assert checked["_id"] not in stalled_ids(tm, 60) and pending["_id"] not in stalled_ids(tm, 60)


def expire_lease(tm: TaskManager, batch_id) -> None:
    """The holder stopped renewing (killed, cut off) and its lease ran out."""
    tm.db[batches.COLLECTION].update_one({"_id": batch_id}, {"$set": {"lease_until": utcnow() - _dt.timedelta(seconds=1)}})


def test_a_live_aggregation_is_never_reopened_however_long_it_has_run(tm):
    b = new_batch(tm, "slow", age=3600)
    batches.begin_aggregation(tm.db, b["_id"], "w1", lease_seconds=30)
    # began ten minutes ago, far past any cutoff, but its holder keeps renewing
    tm.db[batches.COLLECTION].update_one({"_id": b["_id"]}, {"$set": {"aggregating_since": utcnow() - _dt.timedelta(minutes=10)}})
    assert stalled_ids(tm, 1) == set()
    assert batches.load(tm.db, b["_id"])["state"] == batches.AGGREGATING
    assert batches.renew_aggregation(tm.db, b["_id"], 1, lease_seconds=30)


def test_an_expired_aggregation_is_reopened_once_and_its_old_run_can_no_longer_write(tm):
    b = new_batch(tm, "lost", age=300, next_check_at=utcnow())
    first = batches.begin_aggregation(tm.db, b["_id"], "w1", lease_seconds=30)
    assert (first["state"], first["aggregate_runs"], first["aggregator"]) == (batches.AGGREGATING, 1, "w1")
    assert batches.begin_aggregation(tm.db, b["_id"], "w2", lease_seconds=30) is None  # a duplicate message
    expire_lease(tm, b["_id"])

    assert stalled_ids(tm, 60) == {b["_id"]}  # reopened and re-checked in the same sweep
    reopened = batches.load(tm.db, b["_id"])
    assert (reopened["state"], reopened["aggregator"], reopened["lease_until"]) == (batches.OPEN, None, None)
    assert stalled_ids(tm, 60) == {b["_id"]}  # still open: nothing more to reopen, nothing counted twice
    assert batches.load(tm.db, b["_id"])["aggregate_runs"] == 1

    second = batches.begin_aggregation(tm.db, b["_id"], "w3", lease_seconds=30)
    assert second["aggregate_runs"] == 2
    assert batches.begin_aggregation(tm.db, b["_id"], "w4", lease_seconds=30) is None
    # the superseded run: its heartbeat finds the lease lost, its summary is refused
    assert not batches.renew_aggregation(tm.db, b["_id"], 1, lease_seconds=30)
    assert not batches.finish_aggregation(tm.db, b["_id"], 1, {"by": "w1"})
    assert batches.finish_aggregation(tm.db, b["_id"], 2, {"by": "w3"})
    assert not batches.finish_aggregation(tm.db, b["_id"], 1, {"by": "w1"})
    done = batches.load(tm.db, b["_id"])
    assert (done["state"], done["summary"], done["aggregate_runs"]) == (batches.AGGREGATED, {"by": "w3"}, 2)
    assert stalled_ids(tm, 0.001) == set()


def test_a_renewal_after_expiry_but_before_the_reopen_keeps_the_aggregation(tm):
    b = new_batch(tm, "late", age=300)
    batches.begin_aggregation(tm.db, b["_id"], "w1", lease_seconds=30)
    expire_lease(tm, b["_id"])
    assert batches.renew_aggregation(tm.db, b["_id"], 1, lease_seconds=30)
    assert stalled_ids(tm, 60) == set()
    assert batches.finish_aggregation(tm.db, b["_id"], 1, {"by": "w1"})


def test_an_aggregation_whose_lease_expired_max_runs_times_ends_with_the_reason_instead_of_running_again(tm):
    b = new_batch(tm, "crashing", age=300)
    for run in (1, 2):
        assert batches.begin_aggregation(tm.db, b["_id"], f"w{run}", lease_seconds=30)["aggregate_runs"] == run
        expire_lease(tm, b["_id"])
        assert stalled_ids(tm, 60, max_runs=2) == ({b["_id"]} if run == 1 else set())
    ended = batches.load(tm.db, b["_id"])
    assert (ended["state"], ended["aggregate_runs"], ended["lease_until"]) == (batches.AGGREGATED, 2, None)
    assert ended["summary"] == {
        "n_tasks": 1,
        "aggregate_error": "aggregation lease expired 2 time(s) (last aggregator w2); runs exhausted (max 2)",
    }
    assert batches.begin_aggregation(tm.db, b["_id"], "w3", lease_seconds=30) is None


def test_an_aggregation_begun_by_an_older_version_without_a_lease_is_reopened_by_its_age(tm):
    now = utcnow()
    lost = new_batch(tm, "lost", age=300, state=batches.AGGREGATING, aggregator="w1", aggregating_since=now - _dt.timedelta(seconds=120))
    busy = new_batch(tm, "busy", age=300, state=batches.AGGREGATING, aggregator="w2", aggregating_since=now - _dt.timedelta(seconds=5))
    done = new_batch(tm, "done", age=300, state=batches.AGGREGATED)
    tm.db[batches.COLLECTION].update_many({}, {"$unset": {"lease_until": ""}})
    assert stalled_ids(tm, 60) == {lost["_id"]}
    assert batches.load(tm.db, lost["_id"])["state"] == batches.OPEN
    assert batches.load(tm.db, busy["_id"])["state"] == batches.AGGREGATING
    assert batches.load(tm.db, done["_id"])["state"] == batches.AGGREGATED


# ---------------------------------------------------------------- aggregate_batch in-process


@pytest.fixture
def short_lease(settings):
    """A one-second aggregation lease renewed every 0.2 s: a 3 s aggregation outlives it."""
    return settings.model_copy(update={"lease_seconds": 1.0, "heartbeat_seconds": 0.2})


def finished_batch(settings, *, sleep: float) -> tuple[TaskManager, dict]:
    """A batch whose tasks are all done, aggregated by the counting probe (``sleep`` s)."""
    tm = TaskManager("agg", settings)
    doc, _ = batches.create(
        tm,
        [{"key": "a"}, {"key": "b"}],
        queue="q",
        task_func="qcelery.probes.noop",
        task_kwargs=None,
        before_status=st.WAITING,
        after_status=st.DONE,
        aggregate={"func": "qcelery.probes.counted_aggregate", "kwargs": {"sleep": sleep}},
    )
    tm.reset_status({"batch_ids": doc["_id"]}, st.DONE)
    return tm, doc


def aggregating_in_a_thread(settings, doc) -> tuple[threading.Thread, dict]:
    out: dict = {}
    app = app_for(settings)
    t = threading.Thread(target=lambda: out.update(aggregate_batch(app, "agg", str(doc["_id"]))), daemon=True)
    t.start()
    return t, out


def calls(tm: TaskManager, batch_id) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"start": [], "done": []}
    for d in tm.db[AGGREGATIONS].find({"batch_id": batch_id}):
        out[d["event"]].append(d)
    return out


def test_an_aggregation_longer_than_its_lease_keeps_it_while_beat_sweeps_and_runs_once(short_lease, mongo_db):
    tm, doc = finished_batch(short_lease, sleep=3.0)
    thread, out = aggregating_in_a_thread(short_lease, doc)
    reopened = set()
    for _ in range(600):  # beat's sweep every 0.05 s, cutoff 0.5 s, for as long as the aggregation runs
        reopened |= stalled_ids(tm, 0.5)
        thread.join(0.05)
        if not thread.is_alive():
            break
    assert not thread.is_alive()

    assert reopened == set()
    assert out == {"batch_id": str(doc["_id"]), "state": batches.AGGREGATED}
    batch = batches.load(tm.db, doc["_id"])
    assert (batch["state"], batch["aggregate_runs"]) == (batches.AGGREGATED, 1)
    c = calls(tm, doc["_id"])
    assert (len(c["start"]), len(c["done"])) == (1, 1)
    assert batch["summary"]["aggregate_call"] == str(c["done"][0]["call"])
    assert batch["summary"]["counts"] == {"done": 2}


def test_an_aggregator_whose_run_was_taken_over_stops_renewing_and_drops_its_summary(short_lease, mongo_db):
    tm, doc = finished_batch(short_lease, sleep=3.0)
    thread, out = aggregating_in_a_thread(short_lease, doc)
    for _ in range(200):
        if calls(tm, doc["_id"])["start"]:
            break
        time.sleep(0.05)
    # what beat and a second worker do to a holder that stopped renewing (a paused process):
    # the expired aggregation is reopened and taken by run 2, which finishes first
    coll = tm.db[batches.COLLECTION]
    assert coll.update_one({"_id": doc["_id"], "aggregate_runs": 1}, {"$set": {"state": batches.OPEN}}).modified_count == 1
    assert batches.begin_aggregation(tm.db, doc["_id"], "other", lease_seconds=30)["aggregate_runs"] == 2
    assert batches.finish_aggregation(tm.db, doc["_id"], 2, {"by": "run 2"})
    thread.join(60)
    assert not thread.is_alive()

    assert out == {"batch_id": str(doc["_id"]), "state": "lease-lost"}
    batch = batches.load(tm.db, doc["_id"])
    assert (batch["state"], batch["summary"]) == (batches.AGGREGATED, {"by": "run 2"})
    c = calls(tm, doc["_id"])
    assert (len(c["start"]), len(c["done"])) == (1, 1)  # run 1's collector did finish; its summary was dropped
