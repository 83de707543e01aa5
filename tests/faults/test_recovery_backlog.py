"""A lost task is recovered while every worker process is busy, and runs ahead of the
backlog (issue 11.2, DESIGN.md invariant 7).

Fault injected: a task left ``running`` by a worker that vanished (its lease about to
expire) while the only worker process is in the middle of a long task and more long
tasks are queued. Property proved: beat puts the task back to ``waiting`` before that
busy process frees up (recovery does not wait for a worker), and the recovered task is
the next one the worker runs, ahead of the queued backlog; everything runs to
completion exactly once (counted by the probe's own records in Mongo).
"""

from __future__ import annotations

import datetime as dt

from faults_support import POOL, probe_defs, probe_runs, started, wait_batch, wait_for

from qcelery.beat import BEAT_LOG
from qcelery.manage import TaskManager
from qcelery.producer import enqueue


def test_lost_task_is_recovered_while_workers_are_busy_and_runs_before_the_backlog(fsettings):
    with started(fsettings, concurrency=1):
        tm = TaskManager(POOL, fsettings)
        bid = enqueue(probe_defs(4, "backlog", sleep=3.0), POOL, settings=fsettings)
        first = wait_for(lambda: tm.task_pool.find_one({"status": "running"}), what="the worker busy with a backlog task")

        # the state a worker that died (machine lost) leaves behind: running, lease running out
        [lost] = tm.create_task([{"key": "lost"}])
        expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.5)
        tm.task_pool.update_one({"_id": lost}, {"$set": {"status": "running", "attempt": 1, "lease_until": expires, "worker": "gone:1"}})

        wait_for(lambda: tm.get_raw(lost, ["status"])["status"] == "done", timeout=60, what="the lost task done")
        wait_batch(tm, bid)

    first_done = tm.get_raw(first["_id"], ["finished_at"])["finished_at"]
    recovered = tm.db[BEAT_LOG].find_one({"job": "recover", "requeued": {"$gte": 1}}, sort=[("at", 1)])
    assert recovered is not None
    # put back while the only process was still inside the backlog task it held
    assert recovered["at"] < first_done, (recovered["at"], first_done)
    # ...and run next: before every backlog task that had not started yet
    lost_started = tm.get_raw(lost, ["started_at"])["started_at"]
    later = [d["started_at"] for d in tm.task_pool.find({"batch_ids": {"$exists": True, "$ne": []}, "_id": {"$ne": first["_id"]}})]
    assert len(later) == 3 and all(lost_started < s for s in later), (lost_started, later)
    runs = probe_runs(fsettings)
    assert runs["done"] == {"lost": 1, **{f"backlog{i}": 1 for i in range(4)}}
    assert runs["start"]["lost"] == 1  # the vanished worker's run was never the probe's
