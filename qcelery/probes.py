"""Small task functions for benchmarks, fault tests and smoke checks.

Each takes the task definition (a dict) and reads its own knobs from it, so a batch
of probes is an ordinary batch. ``counted`` records every start and completed run in
the ``qcelery_probe_runs`` collection, and the aggregation probe ``counted_aggregate``
every call in ``qcelery_probe_aggregations``, so exactly-once can be checked in Mongo,
by side effects, rather than in a worker's memory or in qcelery's own counters.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bson import ObjectId
from pymongo.errors import ConnectionFailure, DuplicateKeyError

from .settings import Settings
from .store import database

if TYPE_CHECKING:
    from .manage import TaskManager

RUNS = "qcelery_probe_runs"
AGGREGATIONS = "qcelery_probe_aggregations"


def noop(task_def: dict) -> dict:
    """Return at once: measures the framework's own cost."""
    return {"ok": True}


def counted(task_def: dict, settings: Settings, tags: dict | None = None) -> dict:
    """Sleep ``task_def['sleep']`` seconds (``task_def['slow_sleep']`` instead while fewer
    than ``task_def['slow_times']`` runs started before: a run that overruns a time limit
    only the first times), raise if ``task_def['fail']`` is set (or while
    ``task_def['fail_times']`` earlier runs have failed), recording each start and each
    completion in Mongo."""
    runs = database(settings)[RUNS]
    key = str(task_def.get("key", task_def))

    def record(event: str) -> None:
        # a fixed _id makes a retried insert idempotent (the first may have landed)
        doc = {"_id": ObjectId(), "key": key, "event": event, "pid": os.getpid(), "tags": tags or {}}
        with contextlib.suppress(DuplicateKeyError):
            _patiently(lambda: runs.insert_one(doc))

    started = _patiently(lambda: runs.count_documents({"key": key, "event": "start"}))
    record("start")
    slow = started < int(task_def.get("slow_times", 0))
    time.sleep(float(task_def.get("slow_sleep" if slow else "sleep", 0)))
    if task_def.get("fail") or started < int(task_def.get("fail_times", 0)):
        raise RuntimeError(f"probe {key} failed on purpose (run {started + 1})")
    record("done")
    return {"key": key, "value": task_def.get("value"), "pid": os.getpid()}


def counted_aggregate(tm: TaskManager, sleep: float = 0.0, crash: bool = False, *, batch: dict) -> dict:
    """A batch aggregation that records each call's start and end in Mongo (one document
    each, sharing a ``call`` id, with the batch id, the aggregation run and the pid) and
    sleeps ``sleep`` seconds in between, like a slow collector; with ``crash`` it kills its
    own process (SIGKILL) right after the start, like a collector that runs its worker out
    of memory. Its summary fields name the call, so a test can tell which call's summary
    the batch kept."""
    calls = tm.db[AGGREGATIONS]
    call = ObjectId()
    base = {"call": call, "batch_id": batch["_id"], "run": batch.get("aggregate_runs"), "pid": os.getpid()}

    def record(event: str) -> None:
        # a fixed _id makes a retried insert idempotent (the first may have landed)
        doc = {"_id": ObjectId(), **base, "event": event}
        with contextlib.suppress(DuplicateKeyError):
            _patiently(lambda: calls.insert_one(doc))

    record("start")
    if crash:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(sleep)
    record("done")
    return {"aggregate_call": str(call), "aggregate_pid": os.getpid()}


def recorded(task_def: dict, settings: Settings, tags: dict | None = None) -> Any:
    """A training stand-in with an MLflow run, as ``task_train`` has: opens a run in
    experiment ``task_def['experiment']`` tagged with the task's tags and this host, sleeps
    ``task_def['sleep']`` seconds inside it, ends it ``FINISHED`` and returns its recorder
    (the task's result)."""
    import socket

    from .exp import Recorder, get_experiment

    exp = get_experiment(str(task_def.get("experiment", "probes")), settings)
    rec = exp.create_recorder(tags={**(tags or {}), "hostname": socket.gethostname(), "key": str(task_def.get("key", ""))})
    time.sleep(float(task_def.get("sleep", 0)))
    rec.end_run(Recorder.STATUS_FI)
    return rec


def _patiently(op: Callable[[], Any], patience: float = 60.0) -> Any:
    """``op()``, waiting out a Mongo outage (fault tests restart the server): the probe's
    records must survive it, or the tests would measure the probe instead of qcelery."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return op()
        except ConnectionFailure:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def busy(task_def: dict) -> dict:
    """Spin the CPU for ``task_def['seconds']`` seconds (parallel-efficiency checks)."""
    end = time.perf_counter() + float(task_def.get("seconds", 1.0))
    n = 0
    while time.perf_counter() < end:
        n += 1
    return {"iterations": n}
