"""A batch's progress counters (``qcelery.counts``): every transition moves them, bulk
operations have them recounted, a skewed counter is repaired by the readers that wait
and by the aggregation, and reading progress reads the batch document only.

Each check compares the counters with a real count of the batch's tasks (``task_stat``)."""

from __future__ import annotations

import datetime as _dt

import pytest
from pymongo import MongoClient, monitoring

from qcelery import batch as batches
from qcelery import counts
from qcelery import status as st
from qcelery.celery_app import app_for
from qcelery.cli.tasks import follow
from qcelery.manage import TaskManager, utcnow
from qcelery.trainer_celery import wait_batch
from qcelery.worker import aggregate_batch


@pytest.fixture
def tm(settings, mongo_db):
    return TaskManager("counted", settings)


def new_batch(tm: TaskManager, keys: list[str], after_status: str = st.DONE) -> dict:
    doc, _ = batches.create(
        tm,
        [{"key": k} for k in keys],
        queue="q",
        task_func="qcelery.probes.noop",
        task_kwargs=None,
        before_status=st.WAITING,
        after_status=after_status,
        aggregate=None,
    )
    return doc


def task(tm: TaskManager, key: str) -> dict:
    return tm.task_pool.find_one({"filter.key": key})


def real(tm: TaskManager, doc: dict) -> dict[str, int]:
    return tm.task_stat({"batch_ids": doc["_id"]})


def assert_exact(tm: TaskManager, *docs: dict) -> None:
    for doc in docs:
        kept = counts.stored(tm.db, doc["_id"])
        assert counts.current(kept) == real(tm, doc), f"counters {kept} != real {real(tm, doc)}"
        assert not kept.get("dirty") and not kept.get("repaired")


def test_every_single_task_transition_moves_the_counters_of_each_of_its_batches(tm):
    first = new_batch(tm, ["a", "b", "c", "d", "e"])
    assert batches.progress(tm, first) == {st.WAITING: 5}
    # a second batch takes in three of them (and a new one): each is counted in both
    second = new_batch(tm, ["a", "b", "c", "f"])
    assert_exact(tm, first, second)
    # tagging them again (a creation run a second time) counts nothing twice
    assert counts.tag(tm, second["_id"], [task(tm, k)["_id"] for k in "abc"]) == {}
    assert_exact(tm, first, second)

    a = tm.claim(task(tm, "a")["_id"])
    assert_exact(tm, first, second)
    assert tm.commit(a, {"ok": 1})  # running -> done
    b = tm.claim(task(tm, "b")["_id"], decode=False)
    assert tm.fail(b, "boom") == st.WAITING  # attempts left: back
    b = tm.claim(task(tm, "b")["_id"], decode=False)
    assert tm.fail(b, "boom", permanent=True) == st.FAILED
    assert_exact(tm, first, second)
    assert tm.retry_failed({"_id": b["_id"]}) == [b["_id"]]  # failed -> waiting
    c = tm.claim(task(tm, "c")["_id"], lease_seconds=-1)  # a lease that has expired already
    assert tm.recover_expired() == [c["_id"]]  # running -> waiting
    fetched = tm.fetch_task({"filter.key": "d"})  # Qlib's pull loop: waiting -> running
    tm.return_task(fetched)  # -> waiting
    tm.commit_task_res(tm.fetch_task({"filter.key": "e"}), "res", st.PART_DONE)
    tm.commit_task_res({"_id": task(tm, "f")["_id"]}, "res")  # Qlib's unleased commit: waiting -> done
    assert_exact(tm, first, second)
    assert batches.progress(tm, first) == {st.DONE: 1, st.WAITING: 3, st.PART_DONE: 1}
    assert batches.progress(tm, second) == {st.DONE: 2, st.WAITING: 2}

    stale = tm.claim(task(tm, "d")["_id"], decode=False)
    tm.reset_waiting({"_id": stale["_id"]})
    assert not tm.commit(stale, "late")  # a refused commit moves nothing
    assert batches.progress(tm, first) == real(tm, first)


def test_admin_operations_leave_counters_that_the_next_read_recounts_once(tm):
    doc = new_batch(tm, [f"k{i}" for i in range(6)])
    other = new_batch(tm, ["x"])
    tm.reset_status({"filter.key": {"$in": ["k0", "k1"]}}, st.DONE)
    assert counts.stored(tm.db, doc["_id"])["dirty"] and not counts.stored(tm.db, other["_id"]).get("dirty")  # only the batch it touched
    assert batches.progress(tm, doc) == {st.DONE: 2, st.WAITING: 4}  # recounted by this read
    assert_exact(tm, doc, other)

    tm.reset_status({"filter.key": "k2"}, st.FAILED)
    assert tm.retry_failed({"filter.key": "k2"})
    tm.reset_status({"filter.key": "k3"}, st.RUNNING)
    tm.reset_waiting({"filter.key": "k3"})
    assert tm.remove({"filter.key": "k4"}) == 1
    k5 = task(tm, "k5")
    tm.replace_task(k5, {**k5, "status": st.PART_DONE})
    assert batches.progress(tm, doc) == {st.DONE: 2, st.WAITING: 2, st.PART_DONE: 1}
    assert_exact(tm, doc, other)


def skew(tm: TaskManager, doc: dict, counters: dict[str, int], quiet_for: float = 0.0) -> None:
    """Write ``counters`` into the batch as if moves had been lost, last moved ``quiet_for`` s
    ago and not confirmed since."""
    moved_at = utcnow() - _dt.timedelta(seconds=quiet_for)
    tm.db[counts.COLLECTION].update_one(
        {"_id": doc["_id"]}, {"$set": {"counts": {**counts.zero(), **counters}, "moved_at": moved_at, "checked_at": None}}
    )


def test_counters_that_say_finished_too_early_are_confirmed_and_repaired_by_wait_and_the_aggregation(settings, tm):
    doc = new_batch(tm, ["a", "b"])
    tm.commit(tm.claim(task(tm, "a")["_id"]), 1)
    skew(tm, doc, {st.DONE: 2})  # a lost move: b is still waiting
    assert batches.progress(tm, doc) == {st.DONE: 2}  # status reads the counters as they are
    assert batches.watched_progress(tm, doc) == {st.DONE: 1, st.WAITING: 1}  # a waiting reader confirms
    assert counts.current(counts.stored(tm.db, doc["_id"])) == {st.DONE: 1, st.WAITING: 1}

    skew(tm, doc, {st.DONE: 2})
    out = aggregate_batch(app_for(settings), tm.name, str(doc["_id"]))
    assert (out["state"], out["outstanding"]) == ("waiting", 1)  # the real count decides, not the counters
    kept = counts.stored(tm.db, doc["_id"])
    assert (batches.load(tm.db, doc["_id"])["state"], counts.current(kept), kept["repaired"]) == (batches.OPEN, real(tm, doc), 2)


def test_counters_stuck_short_of_finished_are_repaired_once_quiet_and_the_batch_aggregates(settings, tm):
    doc = new_batch(tm, ["a", "b"])
    for key in ("a", "b"):
        tm.commit(tm.claim(task(tm, key)["_id"]), 1)
    skew(tm, doc, {st.DONE: 1, st.RUNNING: 1}, quiet_for=5)  # b's commit was not counted
    assert batches.watched_progress(tm, doc) == {st.DONE: 1, st.RUNNING: 1}  # moved 5 s ago: trusted yet
    skew(tm, doc, {st.DONE: 1, st.RUNNING: 1}, quiet_for=counts.QUIET_SECONDS + 1)
    assert wait_batch(tm, doc["_id"], timeout=10)["_id"] == doc["_id"]  # confirmed, repaired, finished
    assert counts.current(counts.stored(tm.db, doc["_id"])) == {st.DONE: 2}

    skew(tm, doc, {st.DONE: 1, st.RUNNING: 1}, quiet_for=counts.QUIET_SECONDS + 1)
    assert follow(settings, batches.load(tm.db, doc["_id"]), timeout=10, poll=0.1, aggregation=False) == {st.DONE: 2}

    skew(tm, doc, {st.DONE: 1, st.RUNNING: 1}, quiet_for=counts.QUIET_SECONDS + 1)
    assert aggregate_batch(app_for(settings), tm.name, str(doc["_id"]))["state"] == batches.AGGREGATED
    assert batches.load(tm.db, doc["_id"])["summary"]["counts"] == {st.DONE: 2}
    assert counts.current(counts.stored(tm.db, doc["_id"])) == {st.DONE: 2}


def test_a_quiet_batch_is_confirmed_at_growing_intervals():
    now = utcnow()

    def due(idle: float, checked_ago: float | None) -> bool:
        doc = {
            "counts": {**counts.zero(), st.RUNNING: 1},
            "moved_at": now - _dt.timedelta(seconds=idle),
            "checked_at": None if checked_ago is None else now - _dt.timedelta(seconds=checked_ago),
        }
        return counts.check_due(doc, (st.DONE, st.FAILED), now)

    assert not due(10, None) and due(31, None)  # quiet 30 s: the first confirmation
    assert not due(50, 20) and due(61, 31)  # then when idle doubled since the last one
    assert not due(3000, 500) and due(3000, 601)  # at most every 10 minutes


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.sent.append((event.command_name, event.command.get(event.command_name)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_progress_reads_the_batch_counters_only_whatever_the_batch_size(settings, tm):
    doc = new_batch(tm, [f"k{i}" for i in range(50)])
    for i in range(5):
        tm.commit(tm.claim(task(tm, f"k{i}")["_id"]), i)
    listener = Commands()
    client: MongoClient = MongoClient(settings.mongo_url, event_listeners=[listener])
    try:
        watched = TaskManager("counted", settings)
        watched.db = client[settings.mongo_db]
        watched.task_pool = watched.db["counted"]
        listener.sent.clear()
        assert batches.progress(watched, doc) == {st.DONE: 5, st.WAITING: 45}
        assert batches.watched_progress(watched, doc) == {st.DONE: 5, st.WAITING: 45}
        assert batches.outstanding(watched, doc) == 45
        sent = list(listener.sent)
    finally:
        client.close()
    assert sent == [("find", counts.COLLECTION)] * 3  # the counters' document, nothing of the tasks


def test_a_batch_written_before_the_counters_is_counted_once_by_its_first_reader(tm):
    doc = new_batch(tm, ["a", "b"])
    tm.commit(tm.claim(task(tm, "a")["_id"]), 1)
    tm.db[counts.COLLECTION].delete_one({"_id": doc["_id"]})
    assert batches.progress(tm, doc) == {st.DONE: 1, st.WAITING: 1}
    assert_exact(tm, doc)
