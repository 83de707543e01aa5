"""Autoscale: a worker started with ``--autoscale 3,1`` grows to three pool processes
under a queue of slow tasks and shrinks back to one when idle, as ``celery inspect``
reports it; the batch still completes exactly once."""

from __future__ import annotations

import pytest
from faults_support import POOL, assert_exactly_once, enqueue_probes, probe_defs, running, wait_batch, wait_for

from qcelery.celery_app import app_for
from qcelery.manage import TaskManager


@pytest.fixture
def autoscaled(fsettings):
    with running(fsettings) as c:
        # Celery keeps surplus processes for AUTOSCALE_KEEPALIVE seconds (default 30)
        c.extra_env["AUTOSCALE_KEEPALIVE"] = "1"
        c.start_worker(fsettings.default_queue, autoscale="3,1")
        c.start_beat()
        [hostname] = c.wait_ready(app_for(fsettings))
        yield c, hostname


def test_autoscaled_worker_grows_under_slow_tasks_and_shrinks_when_idle(fsettings, autoscaled):
    """Fault: the pool grows from one to three processes under load and shrinks back while
    the batch runs. Proves: the autoscaler follows the load as Celery reports it, and each
    task and the aggregation still complete exactly once (counted by their records)."""
    _, hostname = autoscaled
    inspect = app_for(fsettings).control.inspect(destination=[hostname], timeout=2.0)

    def processes() -> int | None:
        """The pool size the autoscaler reports. (The pool's own list of pids lags behind
        a shrink: billiard's stopped process may wait up to half a minute in a blocking
        read before it exits and is reaped.)"""
        stats = (inspect.stats() or {}).get(hostname)
        return stats["autoscaler"]["current"] if stats else None

    assert wait_for(lambda: processes() == 1, timeout=30, what="one process when idle")
    tm = TaskManager(POOL, fsettings)
    bid = enqueue_probes(probe_defs(9, sleep=1.5), fsettings)

    def running_tasks() -> int:
        return len((inspect.active() or {}).get(hostname, []))

    seen = []
    wait_for(lambda: seen.append(processes()) or seen[-1] == 3, timeout=60, what="three processes under load")
    assert len(inspect.stats()[hostname]["pool"]["processes"]) == 3
    wait_for(lambda: running_tasks() >= 2, timeout=30, what="several tasks running at once")

    batch = wait_batch(tm, bid, timeout=90)
    assert_exactly_once(fsettings, tm, batch)
    assert wait_for(lambda: processes() == 1, timeout=60, what="back to one process when idle")
    assert max(p for p in seen if p) == 3
