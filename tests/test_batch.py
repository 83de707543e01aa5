"""Batch documents: which batches beat's sweep re-checks, and the one-shot aggregation steps."""

from __future__ import annotations

import datetime as _dt

import pytest

from qcelery import batch as batches
from qcelery import status as st
from qcelery.manage import TaskManager, utcnow


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


def stalled_ids(tm: TaskManager, older_than: float) -> set:
    return {d["_id"] for d in batches.stalled(tm.db, older_than)}


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


def test_an_aggregation_whose_aggregator_vanished_is_reopened(tm):
    now = utcnow()
    lost = new_batch(tm, "lost", age=300, state=batches.AGGREGATING, aggregator="w1", aggregating_since=now - _dt.timedelta(seconds=120))
    busy = new_batch(tm, "busy", age=300, state=batches.AGGREGATING, aggregator="w2", aggregating_since=now - _dt.timedelta(seconds=5))
    done = new_batch(tm, "done", age=300, state=batches.AGGREGATED)
    assert stalled_ids(tm, 60) == {lost["_id"]}
    reopened = batches.load(tm.db, lost["_id"])
    assert (reopened["state"], reopened["aggregator"]) == (batches.OPEN, None)
    assert batches.load(tm.db, busy["_id"])["state"] == batches.AGGREGATING
    assert batches.load(tm.db, done["_id"])["state"] == batches.AGGREGATED
    # the reopened batch can be taken by exactly one new aggregator
    assert batches.begin_aggregation(tm.db, lost["_id"], "w3") is not None
    assert batches.begin_aggregation(tm.db, lost["_id"], "w4") is None
