"""Beat jobs: recover expired leases, sweep unpublished tasks, finish stalled batches,
delete result files left behind by interrupted commits.

``celery beat`` (started by ``qcelery beat``) runs the jobs below every few seconds *in
its own process*, in a thread per job, instead of sending them to the workers: a
worker whose processes are all training takes a control message only when one of them
is free, so a lost task waited behind the whole backlog (DESIGN.md invariant 7). A job
still running when it is due again is not started twice. The jobs stay registered as
Celery tasks too, for anything that sends them by name.

Every job is a set of conditional updates, safe if two copies run. On top of that
:class:`LockedScheduler` holds a lease-lock in Mongo, so when two beats are started only
one runs anything; the other takes over once the holder stops renewing. A job walks the
registered pools (:mod:`qcelery.registry`); a pool whose step fails is logged and the job
goes on with the others.
"""

from __future__ import annotations

import concurrent.futures
import datetime as _dt
import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

from celery.beat import PersistentScheduler
from pymongo.errors import ConnectionFailure, DuplicateKeyError

from . import batch as batches
from . import dispatch
from .celery_app import QceleryApp
from .errors import ConfigError
from .manage import TaskManager, utcnow
from .settings import Settings
from .store import database

logger = logging.getLogger(__name__)

RECOVER = "qcelery.recover"
SWEEP = "qcelery.sweep"
GC_RESULTS = "qcelery.gc_results"
LOCKS = "qcelery_locks"
BEAT_LOG = "qcelery_beat_log"
BEAT_LOCK = "beat"


#: the beat jobs: schedule entry, task name, and the setting holding its interval
_JOBS = (
    ("qcelery-recover", RECOVER, "recover_interval"),
    ("qcelery-sweep", SWEEP, "sweep_interval"),
    ("qcelery-gc-results", GC_RESULTS, "result_gc_interval"),
)


def schedule(settings: Settings) -> dict:
    """The beat schedule for ``settings`` (intervals in seconds); a job message not taken
    within three intervals expires."""
    from .celery_app import CONTROL_QUEUE

    out = {}
    for entry, task, interval_field in _JOBS:
        every = getattr(settings, interval_field)
        out[entry] = {"task": task, "schedule": every, "options": {"queue": CONTROL_QUEUE, "expires": max(every * 3, 5)}}
    return out


def _log_run(settings: Settings, job: str, beat: str | None, sent_at: str | None, result: dict) -> None:
    """One line of the beat log: which beat sent the job, when it was sent and when it ran."""
    sent = _dt.datetime.fromisoformat(sent_at) if sent_at else None
    database(settings)[BEAT_LOG].insert_one({"job": job, "beat": beat, "sent_at": sent, "at": utcnow(), **result})


def _each_pool(settings: Settings, job: str, step: Callable[[TaskManager], int]) -> tuple[int, list[str]]:
    """``step`` on every registered pool; the sum of what it returned and the pools whose
    step failed (each logged: one pool's trouble must not stop the others' recovery)."""
    total, failed = 0, []
    for pool in TaskManager.list(settings):
        try:
            total += step(TaskManager.open(pool, settings))
        except Exception:
            logger.exception("beat job %s: pool %r failed; going on with the other pools", job, pool)
            failed.append(pool)
    return total, failed


def recover(app: QceleryApp, beat: str | None = None, sent_at: str | None = None) -> dict:
    """Every pool: expired leases back to waiting (or failed) and re-published ahead of
    the backlog (at the top priority: a recovered task has waited already)."""
    from .celery_app import MAX_PRIORITY
    from .producer import publish

    settings: Settings = app.qcelery_settings

    def step(tm: TaskManager) -> int:
        ids = tm.recover_expired()
        return publish(app, tm.name, ids, priority=MAX_PRIORITY) if ids else 0

    requeued, failed = _each_pool(settings, "recover", step)
    result = {"requeued": requeued, "failed_pools": failed}
    _log_run(settings, "recover", beat, sent_at, result)
    return result


def sweep(app: QceleryApp, beat: str | None = None, sent_at: str | None = None) -> dict:
    """Re-publish claimable batch tasks whose last message is older than ``sweep_after``
    (a broker that lost its queue) or that need one again (reset, prioritized: marked
    ``RESEND``), refill each batch's window, and re-check batches whose chord never fired."""
    from .celery_app import CONTROL_QUEUE
    from .producer import publish, top_up
    from .worker import AGGREGATE

    settings: Settings = app.qcelery_settings

    def step(tm: TaskManager) -> int:
        # a task whose status is none of ours would keep its batch open for ever
        tm.fail_unknown_statuses()
        ids = tm.stale_waiting(settings.sweep_after)
        return publish(app, tm.name, ids) if ids else 0

    def refill(tm: TaskManager) -> int:
        # each batch's window: follow the workers serving its queue, and refill it where
        # chains of messages ended early (a worker killed outright, a message lost)
        sent = 0
        for b in list(tm.db[batches.COLLECTION].find({"pool": tm.name, "state": {"$in": [batches.CREATING, batches.OPEN]}})):
            if "cursor" not in b or dispatch.exhausted(b):
                continue
            window = dispatch.window_for(settings, b["queue"])
            if window != b.get("window"):
                tm.db[batches.COLLECTION].update_one({"_id": b["_id"]}, {"$set": {"window": window}})
                b["window"] = window
            sent += top_up(app, tm, b)
        return sent

    republished, failed = _each_pool(settings, "sweep", step)
    topped_up, failed_refill = _each_pool(settings, "sweep", refill)
    failed = sorted(set(failed) | set(failed_refill))
    rechecked = 0
    for b in batches.stalled(database(settings), max(settings.sweep_after, settings.lease_seconds), max_runs=settings.max_attempts):
        app.send_task(AGGREGATE, args=(b["pool"], str(b["_id"])), queue=CONTROL_QUEUE)
        rechecked += 1
    result = {"republished": republished, "topped_up": topped_up, "batches_rechecked": rechecked, "failed_pools": failed}
    _log_run(settings, "sweep", beat, sent_at, result)
    return result


def gc_results(app: QceleryApp, beat: str | None = None, sent_at: str | None = None) -> dict:
    """Every pool: delete result files no task refers to, older than ``result_gc_after``."""
    settings: Settings = app.qcelery_settings
    dropped, failed = _each_pool(settings, "gc_results", lambda tm: tm.drop_orphan_result_files(settings.result_gc_after))
    result = {"result_files_dropped": dropped, "failed_pools": failed}
    _log_run(settings, "gc_results", beat, sent_at, result)
    return result


#: the job functions by task name
JOBS: dict[str, Callable[[QceleryApp, str | None, str | None], dict]] = {RECOVER: recover, SWEEP: sweep, GC_RESULTS: gc_results}


def register(app: QceleryApp) -> None:
    app.conf.beat_schedule = schedule(app.qcelery_settings)
    app.conf.beat_scheduler = "qcelery.beat:LockedScheduler"
    for _, name, _ in _JOBS:
        _register_job(app, name, JOBS[name])


def _register_job(app: QceleryApp, name: str, job: Callable[[QceleryApp, str | None, str | None], dict]) -> None:
    """``job(app, beat, sent_at)`` as the task ``name``; beat passes who sent it and when."""

    @app.task(name=name, bind=True, shared=False, acks_late=True)
    def run(self, beat: str | None = None, sent_at: str | None = None) -> dict:
        return job(self.app, beat, sent_at)


class BeatLock:
    """A lease-lock document in Mongo: held by one owner until it stops renewing."""

    def __init__(self, settings: Settings, name: str = BEAT_LOCK, ttl: float | None = None):
        self.db = database(settings)
        self.name = name
        self.ttl = ttl or max(3 * settings.recover_interval, 10.0)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    def acquire(self) -> bool:
        """Take or renew the lock; ``False`` while another live owner holds it."""
        now = utcnow()
        try:
            self.db[LOCKS].update_one(
                {"_id": self.name, "$or": [{"owner": self.owner}, {"expires_at": {"$lt": now}}]},
                {"$set": {"owner": self.owner, "expires_at": now + _dt.timedelta(seconds=self.ttl)}},
                upsert=True,
            )
            return True
        except DuplicateKeyError:
            return False

    def release(self) -> None:
        self.db[LOCKS].delete_one({"_id": self.name, "owner": self.owner})


class LockedScheduler(PersistentScheduler):
    """Celery beat's persistent scheduler that only sends while it holds :class:`BeatLock`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.app, QceleryApp):  # set as beat_scheduler by make_app only
            raise ConfigError(f"qcelery's beat scheduler needs an app made by qcelery.make_app, got {self.app!r}")
        self.qcelery_app: QceleryApp = self.app
        self.lock = BeatLock(self.app.qcelery_settings)
        self._held = False
        self._jobs = concurrent.futures.ThreadPoolExecutor(max_workers=len(_JOBS), thread_name_prefix="qcelery-job")
        self._running: dict[str, concurrent.futures.Future] = {}

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            held = self.lock.acquire()
        except ConnectionFailure as exc:
            # Mongo is away (restart, failover): the lock cannot be confirmed, so send
            # nothing and ask again; every job needs Mongo anyway. Raising here would end beat.
            logger.warning("beat %s: lock store unreachable (%s); sending nothing until it answers", self.lock.owner, type(exc).__name__)
            held = False
        if held != self._held:
            logger.info("beat %s %s the lock", self.lock.owner, "holds" if held else "lost")
            self._held = held
        if not held:
            return min(self.lock.ttl / 3, 5.0)
        return min(super().tick(*args, **kwargs), self.lock.ttl / 3)

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        """Run qcelery's own jobs here, in a thread each (not on the workers, where they
        would wait for a free process behind the backlog); send anything else."""
        job = JOBS.get(entry.task)
        if job is None:
            super().apply_entry(entry, producer)
            return
        previous = self._running.get(entry.task)
        if previous is not None and not previous.done():
            logger.info("beat %s: %s still running; this run skipped", self.lock.owner, entry.task)
            return
        self._running[entry.task] = self._jobs.submit(self._run_job, job, entry.task)

    def _run_job(self, job: Callable[[QceleryApp, str | None, str | None], dict], name: str) -> None:
        try:
            job(self.qcelery_app, self.lock.owner, utcnow().isoformat())
        except Exception:  # Mongo away, a broker error: logged, and the next run tries again
            logger.exception("beat %s: job %s failed", self.lock.owner, name)

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        entry.kwargs = {**(entry.kwargs or {}), "beat": self.lock.owner, "sent_at": utcnow().isoformat()}
        return super().apply_async(entry, producer, advance, **kwargs)

    def close(self) -> None:
        # the jobs end before the lock goes, so a beat taking over never overlaps them
        self._jobs.shutdown(wait=True, cancel_futures=True)
        if self._held:
            try:
                self.lock.release()
            except ConnectionFailure:  # the lock expires on its own; stopping must not fail
                logger.warning("beat %s: could not release the lock (store unreachable)", self.lock.owner)
        super().close()
