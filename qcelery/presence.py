"""Which workers exist: each worker records itself in Mongo, ``qcelery status`` reads it.

A worker's main process upserts one document in ``qcelery_workers`` (``_id`` = its
Celery node name, e.g. ``worker-cpu-1@host``) when it starts, then every
``settings.heartbeat_seconds``, and marks it ``stopped`` on a warm shutdown. A worker
killed outright stops writing: one not heard from within :data:`LOST_AFTER` of its own
intervals is shown as ``lost``.

The writes happen on a thread of their own (a Mongo outage never blocks the worker's
event loop), but only while the event loop itself ticks (a timer entry of the worker
marks each tick): a worker whose consumer is wedged goes silent and shows as lost too,
not only a dead process.

Concurrency: each write is one single-document update. Heartbeats and the stop are
conditioned on the ``pid`` that wrote the start, so a stopping process never marks its
successor under the same name (a supervisor's restart) stopped. A heartbeat that finds
the record gone or taken announces again: two live workers sharing a name (which
Celery already warns about) take turns in one record.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from celery import bootsteps
from pymongo.errors import PyMongoError

from .settings import Settings
from .store import INTERNAL_PREFIX, database

logger = logging.getLogger(__name__)

WORKERS = f"{INTERNAL_PREFIX}workers"
#: a worker is lost after this many of its heartbeat intervals without a word
LOST_AFTER = 3
ONLINE, STOPPED, LOST = "online", "stopped", "lost"
#: `status` leaves out workers not heard from for longer than this
FORGET_AFTER = _dt.timedelta(days=1)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def announce(settings: Settings, name: str, queues: Iterable[str], interval: float, processes: int = 1) -> None:
    """Record worker ``name`` (this process) as online, serving ``queues`` with up to
    ``processes`` pool processes."""
    now = _now()
    database(settings)[WORKERS].update_one(
        {"_id": name},
        {
            "$set": {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "queues": sorted(queues),
                "processes": processes,
                "state": ONLINE,
                "started_at": now,
                "last_seen": now,
                "interval": interval,
            },
            "$inc": {"starts": 1},
        },
        upsert=True,
    )


def heartbeat(settings: Settings, name: str) -> bool:
    """Refresh ``last_seen``; ``False`` when the record is no longer this process'."""
    res = database(settings)[WORKERS].update_one({"_id": name, "pid": os.getpid()}, {"$set": {"last_seen": _now(), "state": ONLINE}})
    return res.matched_count == 1


def retire(settings: Settings, name: str) -> None:
    """Mark worker ``name`` stopped (a warm shutdown), unless another process took the name."""
    database(settings)[WORKERS].update_one({"_id": name, "pid": os.getpid()}, {"$set": {"last_seen": _now(), "state": STOPPED}})


def state_of(doc: dict, now: _dt.datetime | None = None) -> str:
    """``online``, ``stopped`` or ``lost`` (online on record, but silent too long)."""
    if doc.get("state") == STOPPED:
        return STOPPED
    last = doc.get("last_seen")
    if last is None:
        return LOST
    if last.tzinfo is None:
        last = last.replace(tzinfo=_dt.timezone.utc)
    silent = ((now or _now()) - last).total_seconds()
    return LOST if silent > LOST_AFTER * float(doc.get("interval") or 1.0) else ONLINE


def workers_seen(settings: Settings, limit: int = 50) -> Iterator[dict]:
    """The workers heard from within :data:`FORGET_AFTER`, most recent first, each with
    its ``state`` as :func:`state_of` judges it now."""
    now = _now()
    cursor = database(settings)[WORKERS].find({"last_seen": {"$gte": now - FORGET_AFTER}}).sort("last_seen", -1).limit(limit)
    for doc in cursor:
        yield {**doc, "state": state_of(doc, now)}


class Presence(bootsteps.StartStopStep):
    """Worker bootstep: announce on start, heartbeat from a thread, retire on stop."""

    label = "qcelery presence"

    # after the pool: its processes are forked before this step's thread exists
    requires = ("celery.worker.components:Timer", "celery.worker.components:Pool")

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ticked = time.monotonic()

    def start(self, parent: Any) -> None:
        settings: Settings = parent.app.qcelery_settings
        name = parent.hostname
        queues = list(parent.app.amqp.queues.consume_from or parent.app.amqp.queues)
        interval = settings.heartbeat_seconds
        processes = int(getattr(parent, "max_concurrency", None) or getattr(parent, "concurrency", None) or 1)
        self._ticked = time.monotonic()
        parent.timer.call_repeatedly(interval, self._tick)
        # create this process' Mongo client here, in the main thread (no I/O yet): if the
        # thread created it, a pool process forked meanwhile (a recycled or an added one)
        # could inherit the client lock held, and hang on its first task
        database(settings)
        self._thread = threading.Thread(
            target=self._run, args=(settings, name, queues, interval, processes), name="qcelery-presence", daemon=True
        )
        self._thread.start()

    def _tick(self) -> None:
        self._ticked = time.monotonic()

    def _run(self, settings: Settings, name: str, queues: list[str], interval: float, processes: int) -> None:
        announced = False
        while not self._stop.is_set():
            if time.monotonic() - self._ticked > LOST_AFTER * interval:
                # the event loop has not run our timer: stay silent, status shows it lost
                self._stop.wait(interval)
                continue
            try:
                if not announced or not heartbeat(settings, name):
                    announce(settings, name, queues, interval, processes)
                    announced = True
            except PyMongoError as exc:
                # the store is down: the worker goes on; status will show it lost meanwhile
                logger.warning("worker %s: cannot record its presence in %s (%s)", name, WORKERS, type(exc).__name__)
            self._stop.wait(interval)

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            retire(parent.app.qcelery_settings, parent.hostname)
        except PyMongoError as exc:
            logger.warning("worker %s: cannot record its stop in %s (%s)", parent.hostname, WORKERS, type(exc).__name__)

    terminate = stop  # a cold shutdown is a stop too


def processes_serving(settings: Settings, queue: str) -> int:
    """Pool processes of the workers online now that consume ``queue`` (the most each may
    run: an autoscaled worker counts at its maximum)."""
    return sum(
        int(doc.get("processes") or 1)
        for doc in workers_seen(settings, limit=1000)
        if doc["state"] == ONLINE and queue in (doc.get("queues") or ())
    )


def queues_served(settings: Settings) -> set[str]:
    """The queues the workers online now consume (from their own records)."""
    return {q for doc in workers_seen(settings, limit=1000) if doc["state"] == ONLINE for q in doc.get("queues") or ()}
