"""Every execute message published twice, and the aggregation message three more times:
each task still runs once, the batch aggregates once (a duplicate finds its task no
longer ``waiting``, or its batch no longer ``open``, and does nothing)."""

from __future__ import annotations

from faults_support import POOL, assert_exactly_once, enqueue_probes, probe_defs, wait_batch

from qcelery import batch as batches
from qcelery.celery_app import CONTROL_QUEUE, app_for
from qcelery.manage import TaskManager
from qcelery.producer import publish
from qcelery.worker import AGGREGATE


def test_every_message_published_twice_runs_each_task_once(fsettings, cluster):
    """Fault: every task message is delivered twice and the aggregation message four times.
    Proves: each task function and the aggregation function complete exactly once."""
    app = app_for(fsettings)
    bid = enqueue_probes(probe_defs(20, sleep=0.05), fsettings)
    tm = TaskManager(POOL, fsettings)
    ids = batches.task_ids(tm, bid)
    assert publish(app, POOL, ids, batch_id=bid) == 20
    for _ in range(3):  # early ones re-schedule the check, late ones find the batch taken or done
        app.send_task(AGGREGATE, args=(POOL, str(bid)), queue=CONTROL_QUEUE)

    batch = wait_batch(tm, bid)
    assert_exactly_once(fsettings, tm, batch)
    # every task was claimed once: the second message of each found it taken
    assert {t["attempt"] for t in tm.query({"batch_ids": batch["_id"]}, decode=False)} == {1}
