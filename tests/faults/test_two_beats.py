"""Two beats running: only the one holding the Mongo lock sends jobs (the beat log
records which beat sent every job run); when the holder stops, the other takes
over and its sweep publishes a batch whose messages were never sent."""

from __future__ import annotations

import datetime as _dt

from faults_support import (
    POOL,
    assert_exactly_once,
    beat_pid,
    unpublished_batch,
    wait_batch,
    wait_for,
)

from qcelery.beat import BEAT_LOG
from qcelery.manage import TaskManager, utcnow


def test_only_one_of_two_beats_acts_and_the_other_takes_over_when_it_stops(fsettings, cluster):
    """Fault: a second beat runs beside the first, then the lock holder is stopped (SIGTERM).
    Proves: only the lock holder ever sends jobs, the other takes over once it stops, and its
    sweep runs a never-published batch whose tasks and aggregation complete exactly once."""
    cluster.start_beat()  # the fixture started one; now there are two
    beats = {p.pid: p for p in cluster.procs if p.name.startswith("beat")}
    assert len(beats) == 2
    tm = TaskManager(POOL, fsettings)
    log = tm.db[BEAT_LOG]

    def ours(since: _dt.datetime | None = None) -> list[dict]:
        # jobs sent by this test's beats (a job message left in the shared control queue
        # by an earlier test may run here, naming a beat of that test)
        q = {"at": {"$gt": since}} if since else {}
        return [d for d in log.find(q).sort("at", 1) if d["beat"] and beat_pid(d["beat"]) in beats]

    # a window of several recover (every 1 s) and sweep (every 2 s) runs: one sender
    wait_for(lambda: len(ours()) >= 8, timeout=60, what="8 beat job runs")
    senders = {d["beat"] for d in ours()}
    assert len(senders) == 1
    holder = senders.pop()
    assert {d["job"] for d in ours()} == {"recover", "sweep"}

    stopped_at = utcnow()
    beats[beat_pid(holder)].stop()
    other = wait_for(
        lambda: next((d["beat"] for d in ours(stopped_at) if d["beat"] != holder), None), timeout=60, what="the second beat taking over"
    )
    assert beat_pid(other) in beats and other != holder

    # the new holder does the work: a batch written to Mongo whose messages were never
    # published (a producer that died) is swept, and aggregated, by it alone
    doc = unpublished_batch(tm, fsettings, 10)
    batch = wait_batch(tm, doc["_id"])
    assert_exactly_once(fsettings, tm, batch)

    # who sent what, by send time: a job the old holder sent just before it stopped may
    # run seconds later on a busy worker
    grace = _dt.timedelta(seconds=5)  # the holder stops within this of stopped_at
    # (the batch may finish inside the grace: wait for a job sent after it)
    wait_for(lambda: any(d["sent_at"] > stopped_at + grace for d in ours()), timeout=60, what="a beat job sent after the grace")
    before = {d["beat"] for d in ours() if d["sent_at"] < stopped_at}
    after = {d["beat"] for d in ours() if d["sent_at"] > stopped_at + grace}
    assert all(d["sent_at"] <= d["at"] for d in ours())
    assert before == {holder}
    assert after == {other}
    # the new holder's sweep started it: it filled the batch's window (3 messages), and
    # those messages handed their places on until the batch's queue was empty
    started = sum(d.get("topped_up", 0) for d in ours(stopped_at) if d["job"] == "sweep" and d["beat"] == other)
    assert started >= fsettings.dispatch_window
    # its chord was never published: the worker that ran the last swept task sent the
    # aggregation (worker._aggregate_if_last), so no stalled-batch re-check was needed
