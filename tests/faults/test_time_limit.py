"""A task that exceeds the worker's hard time limit: Celery kills its pool process,
the lease expires and beat hands the task out again. A task that overran only on
its first run is ``done`` on the second; one that always overruns is ``failed``
once its attempts are used up. Either way the batch aggregates once. Over the soft
time limit the task sees ``SoftTimeLimitExceeded``: the run is a failed attempt,
retried at once while attempts remain."""

from __future__ import annotations

import pytest
from faults_support import POOL, assert_exactly_once, enqueue_probes, fault_settings, probe_defs, probe_runs, started, wait_batch

from qcelery.beat import BEAT_LOG
from qcelery.manage import TaskManager

TIME_LIMIT = 2.0


@pytest.fixture
def limited(settings):
    # two attempts and a short lease: each overrun costs the time limit plus one lease
    fs = fault_settings(settings, max_attempts=2, lease_seconds=4.0)
    with started(fs, time_limit=TIME_LIMIT) as c:
        yield fs, c


def test_task_over_the_hard_time_limit_is_recovered_and_then_done_or_failed(limited):
    """Fault: Celery kills the pool process of a task over the hard time limit (once, or on
    every attempt). Proves: beat recovers the task when its lease expires, it ends done
    (completed once) or failed after its attempts, and the aggregation completes once."""
    fs, cluster = limited
    tm = TaskManager(POOL, fs)
    defs = probe_defs(6, sleep=0.05) + [
        {"key": "overran-once", "sleep": 0.1, "slow_times": 1, "slow_sleep": 30},
        {"key": "always-over", "sleep": 30},
    ]
    bid = enqueue_probes(defs, fs)

    batch = wait_batch(tm, bid, timeout=120)

    assert_exactly_once(fs, tm, batch, failed={"always-over"})
    runs = probe_runs(fs)
    assert runs["start"]["overran-once"] == 2 and runs["done"]["overran-once"] == 1
    assert runs["start"]["always-over"] == 2 and runs["done"]["always-over"] == 0
    hung = next(tm.query({"filter.key": "always-over"}))
    assert hung["attempt"] == 2
    assert "attempts exhausted" in hung["error"]
    assert cluster.procs[0].alive()


SOFT_TIME_LIMIT = 2.0


def test_task_over_the_soft_time_limit_is_retried_then_failed_with_the_reason(settings):
    """Injects runs longer than the worker's soft time limit; proves each such run ends as
    a failed attempt recording SoftTimeLimitExceeded, retried and re-published while
    attempts remain (no lease expiry involved) and ``failed`` once they are used up."""
    # a lease far longer than the test: a retry can only come from the failure path
    fs = fault_settings(settings, max_attempts=2, lease_seconds=300.0)
    tm = TaskManager(POOL, fs)
    defs = probe_defs(4, sleep=0.05) + [
        {"key": "soft-once", "sleep": 0.1, "slow_times": 1, "slow_sleep": 30},
        {"key": "soft-always", "sleep": 30},
    ]
    with started(fs, soft_time_limit=SOFT_TIME_LIMIT) as cluster:
        bid = enqueue_probes(defs, fs)
        batch = wait_batch(tm, bid, timeout=120)
        assert cluster.procs[0].alive()

    assert_exactly_once(fs, tm, batch, failed={"soft-always"})
    runs = probe_runs(fs)
    assert (runs["start"]["soft-once"], runs["done"]["soft-once"]) == (2, 1)
    assert (runs["start"]["soft-always"], runs["done"]["soft-always"]) == (2, 0)
    always = next(tm.query({"filter.key": "soft-always"}))
    assert always["attempt"] == 2 and "SoftTimeLimitExceeded" in always["error"]
    # the line `qcelery status` shows says what happened in words
    assert always["error"].strip().splitlines()[-1].startswith("soft time limit exceeded")
    once = next(tm.query({"filter.key": "soft-once"}))
    assert (once["status"], once["attempt"], once["error"]) == ("done", 2, None)
    assert tm.db[BEAT_LOG].count_documents({"job": "recover", "requeued": {"$gt": 0}}) == 0
