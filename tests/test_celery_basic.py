"""The Celery layer on its happy path: a batch runs on real worker processes and
aggregates once; messages on the broker are JSON and carry ids only; a pickled
message is refused by the worker."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import redis as redis_client

from qcelery import batch as batches
from qcelery import counts
from qcelery.broker import REFUSED
from qcelery.celery_app import CONTROL_QUEUE, app_for, redis_list
from qcelery.cluster import Cluster
from qcelery.manage import TaskManager
from qcelery.probes import RUNS
from qcelery.producer import enqueue, publish
from qcelery.settings import Settings
from qcelery.worker import AGGREGATE, EXECUTE

POOL = "basic"
#: a value only the task definitions hold: it must never show up on the broker
MARKER = "payload-stays-in-mongo-7f3a"


@pytest.fixture
def csettings(settings) -> Settings:
    """The test's settings with the probe task and a queue of its own."""
    data = settings.model_dump()
    data.update(task_func="qcelery.probes.counted", default_queue=f"basic-{uuid.uuid4().hex[:8]}")
    return Settings(**data)


@pytest.fixture
def broker(csettings):
    r = redis_client.Redis.from_url(csettings.broker_url)
    yield r
    for key in r.keys(f"{csettings.default_queue}*"):
        r.delete(key)
    r.close()


def defs(n: int) -> list[dict]:
    return [{"key": f"k{i}", "value": i, "note": MARKER} for i in range(n)]


def wait_aggregated(tm: TaskManager, batch_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while (doc := batches.load(tm.db, batch_id))["state"] != batches.AGGREGATED:
        assert time.monotonic() < deadline, f"batch not aggregated: {doc['state']}, {tm.task_stat()}"
        time.sleep(0.2)
    return doc


def test_batch_runs_on_worker_processes_and_aggregates_once_without_beat(csettings, broker, mongo_db):
    tm = TaskManager(POOL, csettings)
    with Cluster(csettings) as cluster:
        cluster.start_worker(csettings.default_queue, concurrency=2)
        cluster.wait_ready(app_for(csettings))
        bid = enqueue(defs(10), POOL, settings=csettings)
        batch = wait_aggregated(tm, bid)  # the chord fires the aggregation; no beat runs

    assert batch["aggregate_runs"] == 1
    assert batch["summary"]["counts"] == {"done": 10} and batch["summary"]["failures"] == []
    results = {t["def"]["key"]: t["res"] for t in tm.query({"batch_ids": batch["_id"]})}
    assert {k: r["value"] for k, r in results.items()} == {f"k{i}": i for i in range(10)}
    # two processes shared the work, and every task ran once
    assert len({r["pid"] for r in results.values()}) == 2
    assert mongo_db[RUNS].count_documents({"event": "done"}) == 10
    assert {t["attempt"] for t in tm.query({}, decode=False)} == {1}
    # the progress counters followed every task on the workers, with nothing to repair
    assert batches.progress(tm, batch) == {"done": 10} and not counts.stored(tm.db, batch["_id"]).get("repaired")


def test_messages_on_the_broker_are_json_and_carry_only_ids(csettings, broker):
    bid = enqueue(defs(3), POOL, settings=csettings)  # no worker yet: the messages wait in Redis
    task_ids = [str(i) for i in batches.task_ids(TaskManager(POOL, csettings), bid)]

    raw = broker.lrange(redis_list(csettings.default_queue), 0, -1)
    assert len(raw) == 3
    seen, groups, indexes = [], set(), []
    for message in raw:
        assert MARKER.encode() not in message
        envelope = json.loads(message)
        assert envelope["content-type"] == "application/json"
        assert envelope["properties"]["body_encoding"] == "base64"
        args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
        assert envelope["headers"]["task"] == EXECUTE
        assert kwargs == {}
        pool, task_id, batch_id = args
        assert (pool, batch_id) == (POOL, bid)
        seen.append(task_id)
        # the chord's body rides along: the aggregation, again ids only
        body = embed["chord"]
        assert (body["task"], body["args"], body["kwargs"]) == (AGGREGATE, [POOL, bid], {})
        assert body["options"]["queue"] == CONTROL_QUEUE
        # one chord: every header message names its group and its place in it
        groups.add(envelope["headers"]["group"])
        indexes.append(envelope["headers"]["group_index"])
        assert body["options"]["group_id"] == envelope["headers"]["group"]
    assert sorted(seen) == sorted(task_ids)
    [group_id] = groups
    assert sorted(indexes) == [0, 1, 2]
    # the backend knows the chord's size before any part can finish
    backend = app_for(csettings).backend
    assert int(backend.client.get(backend.get_key_for_group(group_id, ".s"))) == 3


def test_a_header_of_several_publish_batches_reaches_the_broker_whole(csettings, broker):
    from qcelery.producer import PUBLISH_BATCH

    n = 2 * PUBLISH_BATCH + 7  # two full Redis pipelines and a partial one
    wide = csettings.model_copy(update={"dispatch_window": n})  # a window that wide: the whole header at once
    tm = TaskManager(POOL, wide)
    bid = enqueue([{"key": f"b{i}"} for i in range(n)], POOL, settings=wide)
    task_ids = {str(i) for i in batches.task_ids(tm, bid)}

    def queued() -> list[tuple[str, int]]:
        out = []
        for message in broker.lrange(redis_list(csettings.default_queue), 0, -1):
            envelope = json.loads(message)
            args, _, _ = json.loads(base64.b64decode(envelope["body"]))
            out.append((args[1], envelope["headers"]["group_index"]))
        return out

    first = queued()
    assert len(first) == n and {t for t, _ in first} == task_ids
    assert sorted(i for _, i in first) == list(range(n))

    # a re-publish (recovery, sweep) goes through the same batches: one message per task
    broker.delete(redis_list(csettings.default_queue))
    assert publish(app_for(csettings), POOL, sorted(task_ids)) == n
    again = queued()
    assert len(again) == n and {t for t, _ in again} == task_ids
    assert {i for _, i in again} == {None}  # outside the chord: the sweep re-checks the batch


def test_a_pickled_message_is_refused_by_the_worker(csettings, broker, mongo_db):
    tm = TaskManager(POOL, csettings)
    pickled_id, json_id = (str(i) for i in tm.create_task(defs(2)))
    app = app_for(csettings)
    # a producer that pickles: the worker only accepts JSON
    app.send_task(EXECUTE, args=(POOL, pickled_id, None), queue=csettings.default_queue, serializer="pickle")
    [message] = broker.lrange(csettings.default_queue, 0, -1)  # sent without a priority: the first list
    assert json.loads(message)["content-type"] == "application/x-python-serialize"
    publish(app, POOL, [json_id])  # queued behind it

    with Cluster(csettings) as cluster:
        worker = cluster.start_worker(csettings.default_queue, concurrency=1)
        cluster.wait_ready(app)
        deadline = time.monotonic() + 60
        while tm.get_raw(json_id, ["status"])["status"] != "done":
            assert time.monotonic() < deadline, "the JSON message behind the pickled one never ran"
            time.sleep(0.2)
        log = worker.log.read_text(errors="replace")

    # the pickled message was dropped unopened: its task never ran, nothing is left queued
    refused = tm.get_raw(pickled_id, ["status", "attempt"])
    assert (refused["status"], refused["attempt"]) == ("waiting", 0)
    assert mongo_db[RUNS].count_documents({"key": "k0"}) == 0
    assert broker.llen(csettings.default_queue) == 0
    [line] = [ln for ln in log.splitlines() if REFUSED in ln]  # one line, no traceback
    assert "content type 'application/x-python-serialize' is not accepted" in line
    assert "Traceback" not in log
