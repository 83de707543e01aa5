"""kill -9 of a worker's pool process in the middle of a task: beat recovers the task
once its lease expires (the Redis visibility timeout is 7 days, so a redelivery by the
broker cannot be what brings it back), another process runs it, and it completes
exactly once."""

from __future__ import annotations

import os
import signal

from faults_support import POOL, assert_exactly_once, enqueue_probes, probe_defs, probe_runs, wait_batch, wait_for

from qcelery.beat import BEAT_LOG
from qcelery.manage import TaskManager


def test_task_of_a_killed_worker_process_is_recovered_by_beat_and_runs_once(fsettings, cluster):
    """Fault: kill -9 of the pool process running a task. Proves: beat's recover job hands
    the task out again once its lease expires, the task function completes exactly once
    (started twice), the aggregation completes once and the worker replaces the process."""
    tm = TaskManager(POOL, fsettings)
    # two long tasks first (a kill surely lands mid-run), then short ones
    bid = enqueue_probes(probe_defs(2, "long", sleep=4.0) + probe_defs(8, sleep=0.3), fsettings)
    worker = cluster.procs[0]

    def long_task_running_in_a_child():
        started = probe_runs(fsettings)["start"]
        for t in tm.query({"status": "running"}, decode=False):
            pid = int(t["worker"].rsplit(":", 1)[1])
            key = tm.re_query(t["_id"])["def"]["key"]
            if key.startswith("long") and started[key] == 1 and pid in worker.children():
                return t, pid, key
        return None

    victim, pid, key = wait_for(long_task_running_in_a_child, what="a long task running in a pool process")
    os.kill(pid, signal.SIGKILL)  # the process dies mid-task: no commit, no fail, no heartbeat

    wait_for(lambda: tm.get_raw(victim["_id"], ["attempt"])["attempt"] == 2, timeout=60, what=f"task {key} claimed again")
    batch = wait_batch(tm, bid)

    assert_exactly_once(fsettings, tm, batch)
    runs = probe_runs(fsettings)
    assert runs["start"][key] == 2 and runs["done"][key] == 1  # the killed run never completed
    assert tm.get_raw(victim["_id"], ["attempt"])["attempt"] == 2
    # beat's recover job put it back (not Redis): a recover run re-published at least one task
    recovered = list(tm.db[BEAT_LOG].find({"job": "recover", "requeued": {"$gte": 1}}))
    assert recovered
    assert worker.alive()  # the worker replaced its pool process and went on
