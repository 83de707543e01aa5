"""A batch whose chord can no longer fire is still aggregated once, promptly (issue 11.5).

Fault injected: the whole worker (main and pool processes, kill -9) running one task of
a batch dies; its message stays unacknowledged in Redis (redelivered only after the
7-day visibility timeout), so that chord part is never counted and the chord never
fires. Property proved: beat recovers the task, another worker runs it from a message
outside the chord, and that worker sends the aggregation itself once nothing of the
batch is left: the batch is aggregated exactly once, well before beat's stalled-batch
check (set here to two minutes) could have done it, and every task completed once.
"""

from __future__ import annotations

from faults_support import POOL, assert_exactly_once, enqueue_probes, fault_settings, probe_defs, running, wait_batch, wait_for

from qcelery.beat import BEAT_LOG
from qcelery.celery_app import app_for
from qcelery.manage import TaskManager


def test_a_batch_whose_chord_lost_a_part_is_aggregated_by_the_worker_that_finishes_it(settings):
    fs = fault_settings(settings, sweep_after=120.0)  # the stalled-batch check: 120 s after the last check
    tm = TaskManager(POOL, fs)
    with running(fs) as cluster:
        doomed = cluster.start_worker(fs.default_queue, concurrency=1, name="worker-doomed")
        cluster.start_beat()
        cluster.wait_ready(app_for(fs))
        bid = enqueue_probes(probe_defs(1, "long", sleep=6.0) + probe_defs(3, sleep=0.1), fs)
        wait_for(lambda: tm.task_pool.find_one({"filter.key": "long0", "status": "running"}), what="the long task running")
        survivor = cluster.start_worker(fs.default_queue, concurrency=1, name="worker-survivor")
        cluster.wait_ready(app_for(fs), 2)
        doomed.stop(sig=9)  # the whole process group: no ack, no chord count, no commit
        batch = wait_batch(tm, bid, timeout=60)  # well inside the 120 s of the stalled check
        assert survivor.alive()

    assert_exactly_once(fs, tm, batch)
    assert tm.get_raw(next(tm.query({"filter.key": "long0"}, decode=False))["_id"], ["attempt"])["attempt"] == 2
    # not beat's stalled-batch path: no sweep re-sent the aggregation
    assert tm.db[BEAT_LOG].count_documents({"job": "sweep", "batches_rechecked": {"$gt": 0}}) == 0
