"""Faults around a batch's aggregation: one that outlasts beat's stalled-batch cutoff,
a worker killed (-9) while it aggregates, and an aggregator frozen past its lease that
wakes up after another one finished. The aggregation is the counting probe
(``qcelery.probes.counted_aggregate``), so every call of it is a record in Mongo."""

from __future__ import annotations

import contextlib
import os
import signal

from faults_support import (
    AGGREGATE_PROBE,
    POOL,
    aggregation_calls,
    assert_aggregated_once,
    assert_exactly_once,
    enqueue_probes,
    probe_defs,
    started,
    wait_batch,
    wait_for,
)

from qcelery import batch as batches
from qcelery.beat import BEAT_LOG
from qcelery.celery_app import app_for
from qcelery.manage import TaskManager
from qcelery.producer import enqueue


def _pid(worker: str) -> int:
    return int(worker.rsplit(":", 1)[1])  # host:pid


def first_call(fsettings, bid) -> dict:
    """The record of the first aggregation call, once it has started."""
    return wait_for(lambda: next(iter(aggregation_calls(fsettings, bid)["start"]), None), timeout=90, what="the aggregation started")


def test_an_aggregation_longer_than_the_stalled_cutoff_runs_once(fsettings, cluster):
    """Fault: the aggregation takes 12 s, well past beat's stalled-batch cutoff
    (max(sweep_after, lease_seconds) = 5 s), while beat sweeps every 2 s. Proves: the
    aggregation function runs exactly once (one call started, one finished) and the batch
    keeps that call's summary."""
    cutoff = max(fsettings.sweep_after, fsettings.lease_seconds)
    slow = 12.0
    assert slow > 2 * cutoff
    tm = TaskManager(POOL, fsettings)
    bid = enqueue_probes(probe_defs(4, sleep=0.05), fsettings, aggregate_sleep=slow)

    batch = wait_batch(tm, bid, timeout=120)

    assert_exactly_once(fsettings, tm, batch)
    assert batch["aggregate_runs"] == 1
    # beat did sweep, repeatedly, while the aggregation ran: the case the cutoff is about
    call = aggregation_calls(fsettings, bid)
    began, ended = call["start"][0]["_id"].generation_time, call["done"][0]["_id"].generation_time
    sweeps = tm.db[BEAT_LOG].count_documents({"job": "sweep", "at": {"$gt": began, "$lt": ended}})
    assert sweeps >= 3


def test_kill9_of_the_aggregating_worker_hands_the_aggregation_to_another_worker_once(fsettings):
    """Fault: kill -9 of the whole worker (main and pool process) that is running the
    aggregation. Proves: once its lease expires another worker takes the aggregation over,
    and it completes exactly once (two calls started, one finished) with the summary of
    the worker that finished it."""
    tm = TaskManager(POOL, fsettings)
    with started(fsettings, concurrency=1) as cluster:
        cluster.start_worker(fsettings.default_queue, concurrency=1)
        cluster.wait_ready(app_for(fsettings))
        workers = [p for p in cluster.procs if p.name.startswith("worker")]
        assert len(workers) == 2
        bid = enqueue_probes(probe_defs(4, sleep=0.05), fsettings, aggregate_sleep=10.0)

        killed_pid = first_call(fsettings, bid)["pid"]
        assert _pid(batches.load(tm.db, bid)["aggregator"]) == killed_pid
        [victim] = [w for w in workers if killed_pid in w.children()]
        [survivor] = [w for w in workers if w is not victim]
        victim.stop(sig=signal.SIGKILL)  # its process group: no heartbeat, no finish, no goodbye

        batch = wait_batch(tm, bid, timeout=120)

        assert_exactly_once(fsettings, tm, batch, aggregations_started=2)
        calls = aggregation_calls(fsettings, bid)
        assert [c["run"] for c in calls["start"]] == [1, 2]
        [finished] = calls["done"]
        assert finished["run"] == 2 and finished["pid"] in survivor.children()
        assert batch["aggregate_runs"] == 2 and _pid(batch["aggregator"]) == finished["pid"]
        assert not victim.alive() and survivor.alive()


def test_a_frozen_aggregator_that_wakes_after_a_takeover_cannot_overwrite_the_summary(fsettings, cluster):
    """Fault: the pool process running the aggregation is frozen (SIGSTOP) past its lease and
    resumed after another process aggregated the batch. Proves: the aggregation is taken over
    once, the batch keeps the summary of the run that finished it, and the resumed run, whose
    collector does complete, writes nothing (its lease is found lost)."""
    tm = TaskManager(POOL, fsettings)
    worker = next(p for p in cluster.procs if p.name.startswith("worker"))
    bid = enqueue_probes(probe_defs(4, sleep=0.05), fsettings, aggregate_sleep=6.0)

    frozen = first_call(fsettings, bid)["pid"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        batch = wait_batch(tm, bid, timeout=120)
        finished = assert_aggregated_once(fsettings, batch, started=2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    assert finished["run"] == 2 and finished["pid"] != frozen

    # the frozen call wakes, completes its collector, and is refused
    wait_for(lambda: len(aggregation_calls(fsettings, bid)["done"]) == 2, timeout=60, what="the resumed aggregation call finishing")
    wait_for(
        lambda: f"batch {bid}: aggregation run 1 was taken over" in worker.log.read_text(errors="replace"),
        timeout=60,
        what="the resumed run dropping its summary",
    )
    after = batches.load(tm.db, bid)
    assert (after["state"], after["aggregate_runs"], after["aggregated_at"]) == (batches.AGGREGATED, 2, batch["aggregated_at"])
    assert after["summary"] == batch["summary"]
    assert after["summary"]["aggregate_call"] == str(finished["call"])
    assert worker.alive()


def test_an_aggregation_that_kills_its_worker_every_time_ends_after_max_attempts_runs(fsettings, cluster):
    """Fault: the aggregation function kills its own pool process (SIGKILL) on every run, like
    a collector that runs its worker out of memory. Proves: it is run max_attempts times, no
    more, and the batch then ends ``aggregated`` with the reason in ``aggregate_error``."""
    tm = TaskManager(POOL, fsettings)
    bid = enqueue(probe_defs(2, sleep=0.05), POOL, settings=fsettings, aggregate={"func": AGGREGATE_PROBE, "kwargs": {"crash": True}})

    batch = wait_batch(tm, bid, timeout=120)

    runs = fsettings.max_attempts
    assert batch["aggregate_runs"] == runs
    assert "runs exhausted" in batch["summary"]["aggregate_error"]
    # beat keeps sweeping afterwards and runs it no more
    wait_for(
        lambda: tm.db[BEAT_LOG].count_documents({"job": "sweep", "at": {"$gt": batch["aggregated_at"]}}) >= 3,
        timeout=60,
        what="three sweeps after the batch ended",
    )
    calls = aggregation_calls(fsettings, bid)
    assert ([c["run"] for c in calls["start"]], calls["done"]) == (list(range(1, runs + 1)), [])
    assert len({c["pid"] for c in calls["start"]}) == runs  # each run killed its process
    assert batches.load(tm.db, bid)["summary"] == batch["summary"]
    assert cluster.procs[0].alive()
