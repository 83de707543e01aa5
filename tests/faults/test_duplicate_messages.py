"""Every execute message published twice: each task still runs once, the batch
aggregates once (a duplicate finds its task no longer ``waiting`` and does nothing)."""

from __future__ import annotations

from faults_support import POOL, assert_exactly_once, probe_defs, wait_batch

from qcelery import batch as batches
from qcelery.celery_app import app_for
from qcelery.manage import TaskManager
from qcelery.producer import enqueue, publish


def test_every_message_published_twice_runs_each_task_once(fsettings, cluster):
    app = app_for(fsettings)
    bid = enqueue(probe_defs(20, sleep=0.05), POOL, settings=fsettings)
    tm = TaskManager(POOL, fsettings)
    ids = batches.load(tm.db, bid)["task_ids"]
    assert publish(app, POOL, ids, batch_id=bid) == 20

    batch = wait_batch(tm, bid)
    assert_exactly_once(fsettings, tm, batch)
    # every task was claimed once: the second message of each found it taken
    assert {t["attempt"] for t in tm.query({"batch_ids": batch["_id"]}, decode=False)} == {1}
