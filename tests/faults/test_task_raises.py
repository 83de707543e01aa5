"""A task that raises is retried up to ``max_attempts`` and then ``failed`` with its
traceback; one that fails once succeeds on its retry; the batch still aggregates once
and its summary lists the failure."""

from __future__ import annotations

from faults_support import POOL, assert_exactly_once, enqueue_probes, probe_defs, probe_runs, wait_batch

from qcelery.manage import TaskManager


def test_raising_task_is_retried_then_failed_and_the_batch_aggregates_listing_it(fsettings, cluster):
    """Fault: one task function always raises, another raises on its first run. Proves: the
    first is run max_attempts times then failed with its traceback, the second completes
    once on its retry, and the aggregation completes once with a summary listing the failure."""
    tm = TaskManager(POOL, fsettings)
    defs = probe_defs(8, sleep=0.05) + [{"key": "always", "fail": True}, {"key": "once", "fail_times": 1}]
    bid = enqueue_probes(defs, fsettings)

    batch = wait_batch(tm, bid)

    assert_exactly_once(fsettings, tm, batch, failed={"always"})
    runs = probe_runs(fsettings)
    assert runs["start"]["always"] == fsettings.max_attempts
    assert runs["start"]["once"] == 2 and runs["done"]["once"] == 1
    failed = next(tm.query({"status": "failed"}))
    assert failed["def"]["key"] == "always"
    assert failed["attempt"] == fsettings.max_attempts
    assert failed["error"].startswith("Traceback (most recent call last)")
    assert "RuntimeError: probe always failed on purpose (run 3)" in failed["error"]
    assert batch["summary"]["failures"] == [
        {"task_id": str(failed["_id"]), "error": "RuntimeError: probe always failed on purpose (run 3)"}
    ]
    assert tm.re_query(next(tm.query({"filter.key": "once"}))["_id"])["error"] is None
