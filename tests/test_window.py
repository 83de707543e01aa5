"""Issue 14 at small N: the broker holds a window of a batch, not the batch; the producer
streams and an interrupted enqueue completes on a re-run; no document grows with the batch;
``prioritize`` reaches tasks already enqueued. Real SecantusDB, Redis and worker processes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import bson
import pytest
import redis as redis_client

from qcelery import batch as batches
from qcelery import dispatch
from qcelery.beat import sweep
from qcelery.celery_app import app_for
from qcelery.cluster import Cluster
from qcelery.errors import TaskTypeError
from qcelery.manage import TaskManager
from qcelery.probes import RUNS
from qcelery.producer import enqueue
from qcelery.settings import Settings

POOL = "window"
WINDOW = 4


@pytest.fixture
def wsettings(settings) -> Settings:
    data = settings.model_dump()
    data.update(task_func="qcelery.probes.counted", default_queue=f"window-{uuid.uuid4().hex[:8]}", dispatch_window=WINDOW)
    return Settings(**data)


@pytest.fixture
def broker(wsettings):
    r = redis_client.Redis.from_url(wsettings.broker_url)
    yield r
    for key in r.keys(f"{wsettings.default_queue}*"):
        r.delete(key)
    r.close()


def queued(broker: redis_client.Redis, queue: str) -> int:
    """Messages waiting in the queue's lists (kombu keeps one list per priority)."""
    return sum(int(broker.llen(k)) for k in broker.keys(f"{queue}*") if broker.type(k) == b"list")


def wait_aggregated(tm: TaskManager, batch_id: str, timeout: float = 90.0, on_poll=None) -> dict:
    deadline = time.monotonic() + timeout
    while (doc := batches.load(tm.db, batch_id))["state"] != batches.AGGREGATED:
        assert time.monotonic() < deadline, f"batch not aggregated: {doc['state']}, {tm.task_stat({'batch_ids': doc['_id']})}"
        if on_poll:
            on_poll()
        time.sleep(0.05)
    return doc


def runs_by_key(mongo_db, event: str = "done") -> dict[str, int]:
    out: dict[str, int] = {}
    for r in mongo_db[RUNS].find({"event": event}):
        out[r["key"]] = out.get(r["key"], 0) + 1
    return out


def test_a_batch_ten_times_its_window_runs_once_each_with_the_broker_holding_the_window(wsettings, broker, mongo_db):
    """40 tasks, a window of 4, two worker processes, no beat: at no time does the broker
    hold more than the window; every task runs once; the chord (whose header is the
    window, handing its places on) fires the aggregation once by itself."""
    n = 40
    tm = TaskManager(POOL, wsettings)
    peak = 0

    def sample() -> None:
        nonlocal peak
        peak = max(peak, queued(broker, wsettings.default_queue))

    bid = enqueue([{"key": f"k{i}", "sleep": 0.05} for i in range(n)], POOL, settings=wsettings)
    sample()
    assert peak == WINDOW  # no worker yet: exactly one window waits on the broker
    with Cluster(wsettings) as cluster:
        cluster.start_worker(wsettings.default_queue, concurrency=2)
        doc = wait_aggregated(tm, bid, on_poll=sample)
    assert peak <= WINDOW
    assert doc["aggregate_runs"] == 1 and doc["summary"]["counts"] == {"done": n}
    assert runs_by_key(mongo_db) == {f"k{i}": 1 for i in range(n)}
    assert tm.task_stat({"batch_ids": doc["_id"]}) == {"done": n}


def test_prioritize_reaches_a_task_still_waiting_in_the_batch_queue(wsettings, broker, mongo_db):
    """The last of 20 tasks is still in the batch's queue in Mongo (only a window of 4 is on
    the broker) when it is prioritized: beat's sweep sends it at its new priority, and the
    worker runs it ahead of the window, once."""
    n = 20
    tm = TaskManager(POOL, wsettings)
    bid = enqueue([{"key": f"k{i}"} for i in range(n)], POOL, settings=wsettings)
    last = batches.task_ids(tm, bid)[-1]
    assert tm.re_query(last)["published_at"] is None  # no message yet: it waits in Mongo
    tm.prioritize(last, 9)
    assert sweep(app_for(wsettings))["republished"] == 1
    assert queued(broker, wsettings.default_queue) == WINDOW + 1
    with Cluster(wsettings) as cluster:
        cluster.start_worker(wsettings.default_queue, concurrency=1)
        wait_aggregated(tm, bid)
    started = sorted(tm.query({"batch_ids": batch_oid(bid)}, decode=False), key=lambda t: t["started_at"])
    assert started[0]["_id"] == last
    assert runs_by_key(mongo_db) == {f"k{i}": 1 for i in range(n)}


def batch_oid(bid: str) -> bson.ObjectId:
    return bson.ObjectId(bid)


def stream(n: int, stop_at: int | None = None, bad_at: int | None = None) -> Iterator[dict]:
    for i in range(n):
        if i == stop_at:
            raise KeyboardInterrupt  # the user's Ctrl-C, half-way through
        yield "not a dict" if i == bad_at else {"key": f"s{i}"}  # type: ignore[misc]


def test_an_interrupted_streaming_enqueue_completes_the_same_batch_when_run_again(wsettings, broker, mongo_db):
    """A generator of 230 tasks, 50 per chunk, interrupted after 120: the batch is left
    ``creating`` with its two whole chunks; running the same enqueue again resumes that
    batch, creates nothing twice, and the batch then runs each task once. No document
    holds the batch's task list."""
    tm = TaskManager(POOL, wsettings)
    with pytest.raises(KeyboardInterrupt):
        enqueue(stream(230, stop_at=120), POOL, settings=wsettings, chunk_size=50)
    [half] = list(mongo_db[batches.COLLECTION].find())
    assert (half["state"], half["chunks"], half["n_tasks"]) == (batches.CREATING, 2, 100)
    assert tm.task_pool.count_documents({}) == 100

    bid = enqueue(stream(230), POOL, settings=wsettings, chunk_size=50)
    assert bid == str(half["_id"])
    doc = batches.load(tm.db, bid)
    assert (doc["state"], doc["chunks"], doc["n_tasks"]) == (batches.OPEN, 5, 230)
    assert tm.task_pool.count_documents({}) == 230
    # bounded documents: the batch holds no ids; each chunk at most one producer chunk
    assert len(bson.encode(doc)) < 2048
    chunks = list(mongo_db[dispatch.COLLECTION].find({"batch": doc["_id"]}))
    assert len(chunks) == 5 and max(len(c["ids"]) for c in chunks) == 50
    assert sum(len(c["ids"]) for c in chunks) == 230

    with Cluster(wsettings) as cluster:
        cluster.start_worker(wsettings.default_queue, concurrency=2)
        done = wait_aggregated(tm, bid)
    assert done["aggregate_runs"] == 1 and done["summary"]["counts"] == {"done": 230}
    assert runs_by_key(mongo_db) == {f"s{i}": 1 for i in range(230)}


def test_a_bad_definition_deep_in_a_stream_is_named_by_its_position(wsettings, mongo_db):
    """A stream is checked chunk by chunk: the bad definition is named by its position in the
    whole input, and its chunk writes nothing."""
    tm = TaskManager(POOL, wsettings)
    with pytest.raises(TaskTypeError, match=r"task definition #130 must be a dict"):
        enqueue(stream(230, bad_at=130), POOL, settings=wsettings, chunk_size=50)
    assert tm.task_pool.count_documents({}) == 100  # the two chunks before it; a re-run resumes


def test_a_list_with_a_bad_definition_writes_nothing(wsettings, mongo_db):
    tm = TaskManager(POOL, wsettings)
    defs = [{"key": f"l{i}"} for i in range(120)]
    defs[110] = ["not", "a", "dict"]  # type: ignore[call-overload]
    with pytest.raises(TaskTypeError, match=r"task definition #110"):
        enqueue(defs, POOL, settings=wsettings, chunk_size=50)
    assert tm.task_pool.count_documents({}) == 0
    assert mongo_db[batches.COLLECTION].count_documents({}) == 0


PRODUCER = """
import sys, time
from qcelery.producer import enqueue
from qcelery.settings import Settings

settings = Settings.model_validate_json(sys.argv[1])

def stream():
    for i in range(600):
        if i >= 300:
            time.sleep(0.05)  # slow after six chunks: the test kills it here
        yield {"key": f"c{i}"}

enqueue(stream(), "window", settings=settings, chunk_size=50)
"""


def test_a_producer_killed_mid_stream_leaves_a_batch_the_same_enqueue_completes(wsettings, broker, mongo_db, tmp_path):
    """kill -9 of a producer process half-way through a stream (inside a chunk, between
    its writes): running the same enqueue again finds the batch it left ``creating``,
    completes it and creates no task twice."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    proc = subprocess.Popen([sys.executable, str(script), wsettings.model_dump_json()])
    try:
        deadline = time.monotonic() + 60
        while (b := mongo_db[batches.COLLECTION].find_one()) is None or b["chunks"] < 6:
            assert proc.poll() is None and time.monotonic() < deadline, "the producer did not write six chunks"
            time.sleep(0.05)
        time.sleep(0.3)  # into the seventh chunk's generation
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    half = mongo_db[batches.COLLECTION].find_one()
    assert half["state"] == batches.CREATING and 6 <= half["chunks"] < 12

    def stream() -> Iterator[dict]:
        yield from ({"key": f"c{i}"} for i in range(600))

    bid = enqueue(stream(), POOL, settings=wsettings, chunk_size=50)
    assert bid == str(half["_id"])
    tm = TaskManager(POOL, wsettings)
    doc = batches.load(tm.db, bid)
    assert (doc["state"], doc["chunks"], doc["n_tasks"]) == (batches.OPEN, 12, 600)
    assert tm.task_pool.count_documents({}) == 600
    assert tm.task_pool.count_documents({"batch_ids": doc["_id"]}) == 600
