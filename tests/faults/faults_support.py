"""Helpers of the fault tests: fault settings, probe batches, waiting on Mongo and the
exactly-once check. Imported by the tests as ``faults_support`` (like ``cli_support``).

Every scenario runs batches of the ``qcelery.probes.counted`` probe, which records
each start and each completed run in the ``qcelery_probe_runs`` collection, aggregated
by ``qcelery.probes.counted_aggregate`` (``enqueue_probes``), which records each call of
the aggregation in ``qcelery_probe_aggregations``. So "ran to completion exactly once"
is checked by side effects in Mongo, not in a worker's memory or qcelery's own counters.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from qcelery import batch as batches
from qcelery import counts
from qcelery.celery_app import app_for
from qcelery.cluster import Cluster
from qcelery.manage import TaskManager
from qcelery.probes import AGGREGATIONS, RUNS
from qcelery.producer import enqueue
from qcelery.settings import Settings
from qcelery.store import database

PROBE = "qcelery.probes.counted"
AGGREGATE_PROBE = "qcelery.probes.counted_aggregate"
POOL = "probes"

#: the issue's short settings: a dead worker's task is back within lease + recover interval
FAULT_SETTINGS = dict(
    lease_seconds=5.0,
    heartbeat_seconds=1.0,
    recover_interval=1.0,
    sweep_interval=2.0,
    sweep_after=3.0,
    aggregate_countdown=0.5,
    max_attempts=3,
    task_func=PROBE,
    # the claim path real MongoDB takes, forced on SecantusDB too (correctness, not speed)
    claim_strategy="find_one_and_update",
    # a window smaller than the tests' batches: every fault meets messages handing their
    # places on, top-ups and refills (qcelery.dispatch), not a header holding the batch
    dispatch_window=3,
)


#: how long the Mongo fault tests keep the server down: longer than the client's
#: server-selection timeout (3 s), so operations in flight fail instead of waiting for it
DOWNTIME = 4.5


def fault_settings(base: Settings, **overrides: Any) -> Settings:
    """``base`` (the per-test database and run dir) with the fault settings, a queue of
    its own (a message left over by one test never reaches the next test's workers)
    and ``overrides``; validated like any settings object."""
    data = base.model_dump()
    data.update(FAULT_SETTINGS)
    data["default_queue"] = f"faults-{uuid.uuid4().hex[:8]}"
    data.update(overrides)
    return Settings(**data)


@contextlib.contextmanager
def running(settings: Settings) -> Iterator[Cluster]:
    """A :class:`Cluster` for ``settings`` whose processes are killed (whole process
    groups, SIGKILL) when the block ends: the scenario is over, and a warm shutdown
    would cost seconds per test."""
    cluster = Cluster(settings)
    try:
        yield cluster
    finally:
        for proc in reversed(cluster.procs):
            proc.stop(timeout=10, sig=signal.SIGKILL)
        cluster.procs.clear()


@contextlib.contextmanager
def started(settings: Settings, concurrency: int = 2, **worker_options: Any) -> Iterator[Cluster]:
    """:func:`running` with one worker on the settings' queue (``concurrency`` pool
    processes; ``worker_options`` such as ``time_limit`` go to ``start_worker``) and one
    beat, both started and ready."""
    with running(settings) as cluster:
        cluster.start_worker(settings.default_queue, concurrency=concurrency, **worker_options)
        cluster.start_beat()
        cluster.wait_ready(app_for(settings))
        yield cluster


def probe_defs(n: int, prefix: str = "t", **knobs: Any) -> list[dict]:
    """``n`` distinct probe task definitions keyed ``prefix0..``; ``knobs`` (sleep, fail,
    fail_times) go into every definition."""
    return [{"key": f"{prefix}{i}", **knobs} for i in range(n)]


def counted_aggregation(sleep: float = 0.0) -> dict:
    """The ``aggregate`` spec of a batch aggregated by the counting probe (``sleep`` s long)."""
    return {"func": AGGREGATE_PROBE, "kwargs": {"sleep": sleep}}


def enqueue_probes(task_defs: list[dict], settings: Settings, *, aggregate_sleep: float = 0.0, **options: Any) -> str:
    """``enqueue`` the probe definitions into the probe pool as one batch aggregated by the
    counting probe; ``options`` go to ``enqueue``. Returns the batch id."""
    return enqueue(task_defs, POOL, settings=settings, aggregate=counted_aggregation(aggregate_sleep), **options)


def unpublished_batch(tm: TaskManager, settings: Settings, n: int) -> dict:
    """A batch of ``n`` short probes written to Mongo whose messages were never published
    (its producer died): only a live beat's sweep can start it. Aggregated by the counting
    probe; returns the batch document."""
    doc, _ = batches.create(
        tm, probe_defs(n, sleep=0.05), queue=settings.default_queue, task_func=PROBE, task_kwargs=None,
        before_status="waiting", after_status="done", aggregate=counted_aggregation(),
    )  # fmt: skip
    return doc


def beat_pid(owner: str) -> int:
    """The pid in a beat lock's owner (``host:pid:token``)."""
    return int(owner.split(":")[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, poll: float = 0.1, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(poll)


def wait_batch(tm: TaskManager, batch_id: Any, timeout: float = 90.0, poll: float = 0.2) -> dict:
    """Poll Mongo until the batch is aggregated; return its document. On timeout the
    assertion says where the batch stood."""
    deadline = time.monotonic() + timeout
    while True:
        doc = batches.load(tm.db, batch_id)
        if doc["state"] == batches.AGGREGATED:
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"batch {batch_id} not aggregated after {timeout:.0f}s: state {doc['state']}, "
                f"tasks {tm.task_stat({'batch_ids': doc['_id']})}"
            )
        time.sleep(poll)


def probe_runs(settings: Settings) -> dict[str, Counter]:
    """Per event (``start``/``done``), how many times each probe key ran."""
    out: dict[str, Counter] = {"start": Counter(), "done": Counter()}
    for d in database(settings)[RUNS].find({}, {"key": 1, "event": 1}):
        out[d["event"]][d["key"]] += 1
    return out


def aggregation_calls(settings: Settings, batch_id: Any) -> dict[str, list[dict]]:
    """Per event (``start``/``done``), the recorded calls of the counting aggregation for the
    batch, in the order they were recorded (each with ``call``, ``run`` and ``pid``)."""
    out: dict[str, list[dict]] = {"start": [], "done": []}
    for d in database(settings)[AGGREGATIONS].find({"batch_id": batches.load(database(settings), batch_id)["_id"]}).sort("_id", 1):
        out[d["event"]].append(d)
    return out


def assert_aggregated_once(settings: Settings, batch: dict, *, started: int = 1) -> dict:
    """The batch is aggregated by exactly one call of the counting aggregation that ran to
    completion, ``started`` calls began (more than one only where an aggregator was killed
    mid-run) and the summary stored is the finishing call's. Returns that call's record."""
    assert batch["state"] == batches.AGGREGATED
    calls = aggregation_calls(settings, batch["_id"])
    assert len(calls["done"]) == 1, f"aggregation completed {len(calls['done'])} times: {calls['done']}"
    assert len(calls["start"]) == started, f"aggregation started {len(calls['start'])} times, expected {started}: {calls['start']}"
    assert batch["summary"]["aggregate_call"] == str(calls["done"][0]["call"])
    return calls["done"][0]


def task_statuses(tm: TaskManager, batch_id: Any) -> dict[str, str]:
    """Probe key -> status of every task of the batch."""
    return {t["def"]["key"]: t["status"] for t in tm.query({"batch_ids": batches.load(tm.db, batch_id)["_id"]})}


def assert_counts_exact(tm: TaskManager, batch_id: Any, *, repaired: bool = False) -> None:
    """The batch's progress counters equal a real count of its tasks and, unless
    ``repaired`` (a scenario where a count move may be lost), they were kept exact by the
    tasks' transitions themselves: no real count ever had to repair them."""
    bid = batches.load(tm.db, batch_id)["_id"]
    kept = counts.stored(tm.db, bid)
    real = tm.task_stat({"batch_ids": bid})
    assert counts.current(kept) == real, f"batch {bid}: counters {kept}, real count {real}"
    if not repaired:
        assert not (kept or {}).get("repaired"), f"batch {bid}: counters were repaired {(kept or {}).get('repaired')} time(s)"


def assert_exactly_once(
    settings: Settings,
    tm: TaskManager,
    batch: dict,
    *,
    failed: Iterable[str] = (),
    aggregations_started: int = 1,
    counts_repaired: bool = False,
) -> None:
    """The issue's end condition: every task of ``batch`` done (or failed, for the keys in
    ``failed``), each done task's function completed exactly once and, for a batch of
    ``enqueue_probes``, the aggregation function completed exactly once (both counted by
    their records in Mongo; see :func:`assert_aggregated_once`), its summary listing the
    failures, and the batch's progress counters exact (:func:`assert_counts_exact`)."""
    failed = set(failed)
    assert batch["state"] == batches.AGGREGATED
    if (batch.get("aggregate") or {}).get("func") == AGGREGATE_PROBE:
        assert_aggregated_once(settings, batch, started=aggregations_started)
    # a batch without the counting aggregation has no aggregation side effect to count:
    # enqueue fault batches with enqueue_probes
    statuses = task_statuses(tm, batch["_id"])
    assert len(statuses) == batch["n_tasks"]
    assert statuses == {k: ("failed" if k in failed else "done") for k in statuses}
    runs = probe_runs(settings)
    done_keys = sorted(k for k in statuses if k not in failed)
    assert {k: runs["done"][k] for k in done_keys} == {k: 1 for k in done_keys}
    assert {k: runs["done"][k] for k in failed} == {k: 0 for k in failed}
    assert batch["summary"]["counts"] == {s: n for s, n in Counter(statuses.values()).items()}
    failed_ids = {str(t["_id"]) for t in tm.query({"batch_ids": batch["_id"], "status": "failed"}, decode=False)}
    assert {f["task_id"] for f in batch["summary"]["failures"]} == failed_ids
    assert_counts_exact(tm, batch["_id"], repaired=counts_repaired)


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q ARGS`` against the local server; its standard output."""
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60).stdout
