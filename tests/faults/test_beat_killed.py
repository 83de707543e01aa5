"""kill -9 of the beat holding the lock, with a second beat waiting: the lock is not
released, so the second beat sends nothing until the lock expires and takes over within
one more poll of it; its sweep then finishes a batch whose messages were never sent."""

from __future__ import annotations

import datetime as _dt
import signal

from faults_support import (
    POOL,
    assert_exactly_once,
    beat_pid,
    unpublished_batch,
    wait_batch,
    wait_for,
)

from qcelery.beat import BEAT_LOCK, BEAT_LOG, LOCKS, BeatLock
from qcelery.manage import TaskManager


def test_beat_killed_holding_the_lock_is_replaced_once_the_lock_expires(fsettings, cluster):
    """Injects SIGKILL of the lock-holding beat; proves the other beat sends nothing while
    the dead holder's lock is live, takes over within the lock's expiry plus one poll, and
    does the dead beat's work (a never-published batch runs once)."""
    cluster.start_beat()  # the fixture started one; now there are two
    beats = {p.pid: p for p in cluster.procs if p.name.startswith("beat")}
    assert len(beats) == 2
    tm = TaskManager(POOL, fsettings)
    log, locks = tm.db[BEAT_LOG], tm.db[LOCKS]
    ttl = BeatLock(fsettings).ttl

    def ours() -> list[dict]:
        # jobs sent by this test's beats (a job left in the shared control queue by an
        # earlier test may run here, naming a beat of that test)
        return [d for d in log.find().sort("sent_at", 1) if d["beat"] and beat_pid(d["beat"]) in beats]

    wait_for(lambda: len(ours()) >= 6, timeout=60, what="6 beat job runs")
    senders = {d["beat"] for d in ours()}
    assert len(senders) == 1
    holder = senders.pop()

    beats[beat_pid(holder)].stop(sig=signal.SIGKILL)
    lock = locks.find_one({"_id": BEAT_LOCK})
    assert lock["owner"] == holder  # a crash releases nothing: the lock must expire
    expires_at = lock["expires_at"]

    # a batch whose messages were never published (its producer died): only a live
    # beat's sweep can start it
    doc = unpublished_batch(tm, fsettings, 8)

    def takeover() -> dict | None:
        return next((d for d in ours() if d["beat"] != holder), None)

    first = wait_for(takeover, timeout=ttl + 60, what="the second beat taking over")
    successor = first["beat"]
    assert beat_pid(successor) in beats and successor != holder
    # the successor waited for the dead holder's lock to expire, then took it at its next
    # poll (every ttl/3 while idle); a second ttl is slack for a loaded machine
    assert expires_at <= first["sent_at"] < expires_at + _dt.timedelta(seconds=ttl)
    assert locks.find_one({"_id": BEAT_LOCK})["owner"] == successor

    batch = wait_batch(tm, doc["_id"])
    assert_exactly_once(fsettings, tm, batch)
    senders_after = {d["beat"] for d in ours() if d["sent_at"] >= expires_at}
    assert senders_after == {successor}
    # the successor's sweep started it, filling the batch's window (3 messages) for the
    # messages to hand their places on
    assert sum(d.get("topped_up", 0) for d in ours() if d["beat"] == successor) >= fsettings.dispatch_window
