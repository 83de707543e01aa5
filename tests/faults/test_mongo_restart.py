"""The Mongo server restarted in the middle of a batch (on-disk storage, same port):
workers, beat and the aggregation reconnect; no task, result or batch is lost, and
every task still runs to completion exactly once."""

from __future__ import annotations

import threading
import time

from faults_support import DOWNTIME, POOL, assert_exactly_once, enqueue_probes, fault_settings, probe_defs, started, wait_batch, wait_for

from qcelery.celery_app import app_for
from qcelery.manage import TaskManager
from qcelery.worker import execute_task


def test_mongo_restart_mid_batch_loses_nothing(settings, own_mongo):
    """Fault: the Mongo server is stopped for 4.5 s and started again while workers run the
    batch. Proves: no task, result or batch is lost, each task and the aggregation complete
    exactly once, and every worker and beat process survives (reconnects)."""
    fs = fault_settings(settings, mongo_url=own_mongo.url, lease_seconds=10.0)
    tm = TaskManager(POOL, fs)
    with started(fs) as cluster:
        bid = enqueue_probes(probe_defs(20, sleep=0.3), fs)
        wait_for(lambda: tm.task_stat().get("done", 0) >= 4, what="4 tasks done")

        own_mongo.stop()
        time.sleep(DOWNTIME)
        own_mongo.start()

        batch = wait_batch(tm, bid, timeout=90)

        # a counter move is a second write after the task's own: the store going away
        # between the two loses it, and the readers' real count repairs it (qcelery.counts)
        assert_exactly_once(fs, tm, batch, counts_repaired=True)
        assert all(p.alive() for p in cluster.procs)


_OUTAGE: dict = {}


def stop_store_then_return(task_def: dict) -> dict:
    """Task function of the commit test: the work is done, then the store goes away for
    ``DOWNTIME`` seconds, just before the worker commits."""
    server = _OUTAGE["server"]
    server.stop()
    _OUTAGE["restart"] = threading.Timer(DOWNTIME, server.start)
    _OUTAGE["restart"].start()
    _OUTAGE["runs"] += 1
    return {"key": task_def["key"]}


def test_a_commit_during_a_mongo_restart_waits_it_out_and_keeps_the_result(settings, own_mongo):
    """Fault: the store goes away between the end of a task's run and its commit. Proves: the
    worker waits the outage out and commits the result it computed, without running the
    task function again."""
    # in-process execute, so the outage falls exactly between the run and its commit
    fs = fault_settings(
        settings, mongo_url=own_mongo.url, lease_seconds=10.0, task_func=f"{__name__}.stop_store_then_return", allowed_modules=[__name__]
    )
    tm = TaskManager(POOL, fs)
    [task_id] = tm.create_task([{"key": "k"}])
    _OUTAGE.update(server=own_mongo, runs=0)
    try:
        out = execute_task(app_for(fs), POOL, str(task_id))
    finally:
        if "restart" in _OUTAGE:
            _OUTAGE.pop("restart").join()

    assert out == {"task_id": str(task_id), "status": "done"}
    task = tm.re_query(task_id)
    assert (task["status"], task["attempt"], task["res"]) == ("done", 1, {"key": "k"})
    assert _OUTAGE["runs"] == 1
