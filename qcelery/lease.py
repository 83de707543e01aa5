"""Leases: how a worker takes a task, keeps it, and ends its run.

Every claim (``claim`` by id for Celery, ``fetch_task`` for Qlib's pull loop) moves a
task to ``running`` under a lease held by one worker and increments ``attempt``;
``heartbeat`` (or a :class:`Heartbeat` thread) extends the lease; ``commit`` and
``fail`` are fenced on ``attempt``, so a worker whose lease was recovered can no longer
write; ``recover_expired`` hands expired leases back (or fails the task when its
attempts are used up). :class:`Leases` is a part of
:class:`~qcelery.manage.TaskManager` and uses its collection, settings and codecs.

Two claim paths, chosen by ``settings.claim_strategy`` (:func:`claims_in_two_steps`),
keep the same contract: a task moves to ``running`` for exactly one claimer, because
only one conditional write can match ``{_id, status: <claimable>}``.

* ``find_one_and_update`` (real MongoDB under ``auto``): one command; ``fetch_task``
  sorts by priority on the server, so it always takes the best task left.
* ``two_step`` (SecantusDB under ``auto``, whose findAndModify scans the collection):
  ``update_one`` by id stamping a fresh ``claim_token``, then a read by id; the claimer
  is whoever's token is in the document. ``fetch_task`` claims from a short-lived list
  of the best candidates (:meth:`Leases._candidates`), so for up to
  ``_FETCH_CACHE_SECONDS`` it may take a task of a lower priority than one set or
  created meanwhile by another process (this process' own ``prioritize`` and
  ``create_task`` drop the list).

Claims, commits and fails are journaled writes (``j: true``, :attr:`Leases._journaled`):
once acknowledged they survive a crash of the store. A server that acknowledges before
its journal is on disk (SecantusDB by default, a standalone ``mongod`` with ``w: 1``)
loses the last ~100 ms of writes to a kill -9, and a lost claim hands the same attempt
out twice while a lost commit sends a finished task back to ``running``: either way a
task would run to completion twice. Heartbeats, recoveries and publish marks stay
plain writes: losing one only delays a task (it is recovered or swept again).

Every transition here that succeeded moves one count in the progress counters of the
task's batches (:func:`qcelery.counts.moved`, after the task's update, never before):
a claimed task carries its ``batch_ids``, and the other paths read them with the status.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import functools
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, overload

import pymongo
from bson import ObjectId
from pymongo import ReturnDocument, WriteConcern
from pymongo.errors import PyMongoError

from . import counts
from . import status as st
from .errors import LeaseLostError, TaskDefinitionError
from .store import LEGACY_RESULT_FILE, RESULT_FILE, result_file, scans_find_and_modify, to_object_id

if TYPE_CHECKING:
    from pymongo.collection import Collection

    from .manage import TaskManager
    from .settings import Settings

logger = logging.getLogger(__name__)

# fetch_task on SecantusDB: how many candidates one query yields, and for how long
_FETCH_CANDIDATES = 32
_FETCH_CACHE_SECONDS = 1.0


#: ``published_at`` of a task that needs a message again (reset, recovered, prioritized):
#: older than any cutoff, so beat's sweep sends it at its next run. ``None`` means the task
#: has no message and waits in its batch's queue (:mod:`qcelery.dispatch`); a time, that
#: its message was sent then.
RESEND = _dt.datetime(1970, 1, 1)


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _is_count(value: Any) -> bool:
    """Whether a counter field holds a number (what qcelery writes there)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _attempts_used_up(doc: dict, default_max: int) -> tuple[bool, str | None]:
    """Whether ``doc`` (a claimed task) has used its last attempt of this phase, and,
    when its ``attempt_base`` / ``max_attempts`` are not numbers, why it cannot be told:
    such a task is failed rather than retried (or left to crash every recovery)."""
    attempt: Any = doc.get("attempt")
    base: Any = doc.get("attempt_base")
    cap: Any = doc.get("max_attempts")
    base = 0 if base is None else base
    cap = default_max if cap is None else cap
    corrupt = [
        f"{name} {value!r}" for name, value in (("attempt", attempt), ("attempt_base", base), ("max_attempts", cap)) if not _is_count(value)
    ]
    if corrupt:
        return True, f"the document is corrupt: {', '.join(corrupt)} is not a number"
    return attempt - base >= cap, None


def claims_in_two_steps(settings: Settings) -> bool:
    """Whether claims take the ``two_step`` path: as ``settings.claim_strategy`` says, or
    for ``auto``, when the server is one whose findAndModify scans the collection."""
    if settings.claim_strategy == "auto":
        return scans_find_and_modify(settings)
    return settings.claim_strategy == "two_step"


def worker_name() -> str:
    """``host:pid`` of this process, stored in ``worker`` while it holds a lease."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Leases:
    """The lease operations of :class:`~qcelery.manage.TaskManager` (a mixin of it)."""

    if TYPE_CHECKING:  # what the mixin uses of TaskManager, which defines them
        settings: Settings
        name: str
        task_pool: Collection[dict[str, Any]]
        _claim_in_two_steps: bool
        _lookup_chunk: int
        _fetch_cache: tuple[dict, float, collections.deque] | None

        @overload
        def _decode_task(self, task: dict) -> dict: ...
        @overload
        def _decode_task(self, task: None) -> None: ...
        def _decode_task(self, task: dict | None) -> dict | None: ...
        def _decode_query(self, query: Any) -> dict: ...
        def _server_checks(self, query: Any) -> contextlib.AbstractContextManager[None]: ...
        def _encode_res(self, res: Any, task_id: ObjectId) -> tuple[dict, ObjectId | None]: ...
        def _drop_res_file(self, fid: Any) -> None: ...

    def _count_move(self, batch_ids: Iterable[Any] | None, old: str, new: str) -> None:
        """Move one count from ``old`` to ``new`` in the task's batches (after its update)."""
        counts.moved(self.task_pool.database, batch_ids, old, new)

    def _batch_ids(self, task: dict) -> list:
        """The batches of ``task``: from the dict when it has them (a claimed task), else read."""
        if "batch_ids" in task:
            return list(task["batch_ids"] or ())
        doc = self.task_pool.find_one({"_id": to_object_id(task)}, {"batch_ids": 1})
        return list((doc or {}).get("batch_ids") or ())

    @functools.cached_property
    def _journaled(self) -> Collection[dict[str, Any]]:
        """The pool with journaled writes, keeping the URL's ``w`` (see the module docstring)."""
        wc = self.task_pool.write_concern.document
        if wc.get("fsync") or wc.get("j") or wc.get("w") == 0:
            return self.task_pool  # synced already, or unacknowledged on purpose: the URL's choice
        return self.task_pool.with_options(write_concern=WriteConcern(**{**wc, "j": True}))

    def _claim_update(self, worker: str, lease_seconds: float | None, before_status: str) -> dict:
        now = utcnow()
        lease = lease_seconds if lease_seconds is not None else self.settings.lease_seconds
        return {
            "$set": {
                "status": st.RUNNING,
                "worker": worker,
                "claimed_from": before_status,
                "lease_until": now + _dt.timedelta(seconds=lease),
                "started_at": now,
                "updated_at": now,
            },
            "$inc": {"attempt": 1},
        }

    def claim(
        self,
        task_id: Any,
        worker: str | None = None,
        before_status: str = st.WAITING,
        lease_seconds: float | None = None,
        decode: bool = True,
    ) -> dict | None:
        """Atomically take task ``task_id`` if it is in ``before_status``: it becomes
        ``running`` under a lease held by ``worker``, with ``attempt`` incremented.
        ``None`` when the task is not claimable (done, running elsewhere, removed)."""
        if before_status not in st.CLAIMABLE:
            raise TaskDefinitionError(f"cannot claim from status {before_status!r}; expected one of {st.CLAIMABLE}")
        flt = {"_id": to_object_id(task_id), "status": before_status}
        update = self._claim_update(worker or worker_name(), lease_seconds, before_status)
        if self._claim_in_two_steps:
            doc = self._claim_two_steps(flt, update)
        else:
            doc = self._journaled.find_one_and_update(flt, update, return_document=ReturnDocument.AFTER)
            if doc is not None:
                self._count_move(doc.get("batch_ids"), before_status, st.RUNNING)
        return self._decode_task(doc) if decode else doc

    def _claim_two_steps(self, flt: dict, update: dict) -> dict | None:
        """The claim as a conditional ``update_one`` stamped with a fresh token, then a read
        of the document carrying that token. Used where the server scans the collection
        for findAndModify (SecantusDB) but answers ``update_one`` by ``_id`` from the index;
        equally atomic: only the update that matched ``flt`` wrote the token."""
        token = ObjectId()
        update = {**update, "$set": {**update["$set"], "claim_token": token}}
        if self._journaled.update_one(flt, update).modified_count != 1:
            return None
        # read by _id alone and check the token here: a second predicate makes SecantusDB
        # filter the document it found, about half the cost of the read again
        doc = self.task_pool.find_one({"_id": flt["_id"]})
        if doc is not None:  # the update moved it, whoever holds it by now
            self._count_move(doc.get("batch_ids"), flt["status"], st.RUNNING)
        return doc if doc is not None and doc.get("claim_token") == token else None

    def fetch_task(self, query: dict | None = None, status: str = st.WAITING) -> dict | None:
        """Take the highest-priority task in ``status`` matching ``query`` (Qlib's pull-loop
        fetch), now with a lease: a worker that dies leaves it to ``recover_expired``."""
        if status not in st.CLAIMABLE:
            st.check(status)
            raise TaskDefinitionError(f"fetch_task takes tasks in {st.CLAIMABLE}, not {status!r}")
        q = self._decode_query(query)
        q["status"] = status
        with self._server_checks(query):
            if not self._claim_in_two_steps:
                doc = self._journaled.find_one_and_update(
                    q,
                    self._claim_update(worker_name(), None, status),
                    sort=[("priority", pymongo.DESCENDING)],
                    return_document=ReturnDocument.AFTER,
                )
                if doc is not None:
                    self._count_move(doc.get("batch_ids"), status, st.RUNNING)
                return self._decode_task(doc)
            while True:  # pick the best candidates, claim one by id; other workers may win some
                cands = self._candidates(q)
                if not cands:
                    return None
                while cands:
                    doc = self.claim(cands.popleft(), before_status=status)
                    if doc is not None:
                        return doc
                self._fetch_cache = None

    def _candidates(self, q: dict) -> collections.deque:
        """Ids of the best claimable tasks for ``q``, in priority order (ties shuffled, so
        concurrent workers rarely race for the same task).

        SecantusDB reads every matching document to answer even a ``limit(1)`` query, so
        one query serves the fetches of the next ``_FETCH_CACHE_SECONDS``; a pull loop whose
        tasks take longer than that queries afresh each time and sees priorities exactly."""
        cache = self._fetch_cache
        if cache is not None and cache[0] == q and cache[1] > time.monotonic() and cache[2]:
            return cache[2]
        rows = list(self.task_pool.find(q, {"_id": 1, "priority": 1}, sort=[("priority", pymongo.DESCENDING)], limit=_FETCH_CANDIDATES))
        groups: dict[Any, list] = {}
        for r in rows:
            groups.setdefault(r.get("priority"), []).append(r["_id"])
        ordered: collections.deque[ObjectId] = collections.deque()
        for ids in groups.values():  # dicts keep the sorted order of the priorities
            random.shuffle(ids)
            ordered.extend(ids)
        self._fetch_cache = (q, time.monotonic() + _FETCH_CACHE_SECONDS, ordered)
        return ordered

    @contextlib.contextmanager
    def safe_fetch_task(self, query: dict | None = None, status: str = st.WAITING, *, heartbeat: bool = True) -> Iterator[dict | None]:
        """``fetch_task`` as a context manager: if the body raises (or is interrupted),
        the task goes back to ``status`` and the error propagates, as in Qlib.

        Unlike Qlib (which has no leases), a :class:`Heartbeat` keeps the task's lease
        alive for as long as the body holds it: a hand-written loop that trains for an
        hour is not taken over by beat's recovery. A process that dies stops renewing,
        and its task is recovered one lease later. (``heartbeat=False``: the caller keeps
        the lease itself, as :func:`~qcelery.manage.pull_tasks` does.)"""
        task = self.fetch_task(query=query, status=status)
        if task is None:
            yield None
            return
        keeper = Heartbeat(self, task) if heartbeat else contextlib.nullcontext()  # type: ignore[arg-type]  # Leases is a part of TaskManager
        with keeper:
            try:
                yield task
            except BaseException:
                logger.info("returning task %s to %s before raising", task["_id"], status)
                self.return_task(task, status=status)
                raise

    def task_fetcher_iter(self, query: dict | None = None) -> Iterator[dict]:
        """Fetch and yield tasks until none is left (Qlib's ``task_fetcher_iter``); each
        task's lease is kept alive while the loop body holds it (see :meth:`safe_fetch_task`)."""
        while True:
            with self.safe_fetch_task(query=query) as task:
                if task is None:
                    break
                yield task

    def heartbeat(self, task_id: Any, attempt: int, lease_seconds: float | None = None) -> bool:
        """Extend the lease of a running task held at ``attempt``; ``False`` if it was lost."""
        lease = lease_seconds if lease_seconds is not None else self.settings.lease_seconds
        r = self.task_pool.update_one(
            {"_id": to_object_id(task_id), "status": st.RUNNING, "attempt": attempt},
            {"$set": {"lease_until": utcnow() + _dt.timedelta(seconds=lease)}},
        )
        return r.matched_count == 1

    def commit(self, task: dict, res: Any, status: str = st.DONE) -> bool:
        """Store ``res`` and move the claimed ``task`` to ``status`` (``done`` or
        ``part_done``), only if it is still ``running`` at the same ``attempt``.
        ``False`` (nothing written) when the lease was lost to another worker."""
        if status not in (st.DONE, st.PART_DONE, st.WAITING):
            st.check(status)
            raise TaskDefinitionError(f"commit moves a task to done, part_done or waiting, not {status!r}")
        oid = to_object_id(task)
        # a claimed task (from claim/fetch_task, the whole document) carries its result file
        # and batch ids, which only the holder of its lease can change: no read needed on the
        # worker's hot path
        old = (
            task
            if "filter_hash" in task
            else self.task_pool.find_one({"_id": oid}, {RESULT_FILE: 1, LEGACY_RESULT_FILE: 1, "batch_ids": 1})
        )
        res_upd, fid = self._encode_res(res, oid)
        now = utcnow()
        upd: dict[str, Any] = {
            **res_upd["$set"],
            "status": status,
            "lease_until": None,
            "worker": None,
            "updated_at": now,
            "finished_at": now,
            "error": None,
            "published_at": None,
        }
        if status != st.DONE:  # a next phase gets its own attempt budget
            upd["attempt_base"] = task["attempt"]
        r = self._journaled.update_one(
            {"_id": oid, "status": st.RUNNING, "attempt": task["attempt"]}, {"$set": upd, "$unset": res_upd["$unset"]}
        )
        if r.matched_count != 1:
            self._drop_res_file(fid)
            logger.warning("task %s: commit of attempt %s refused, its lease was taken over", oid, task["attempt"])
            return False
        self._count_move((old or {}).get("batch_ids"), st.RUNNING, status)
        if old and result_file(old) is not None and result_file(old) != fid:
            self._drop_res_file(result_file(old))
        return True

    def fail(self, task: dict, error: str, permanent: bool = False) -> str | None:
        """Record a failed run of the claimed ``task``: back to the status it was claimed
        from while attempts remain, else ``failed``; ``error`` (a traceback) is kept.
        ``permanent`` (an error no retry can mend, or a corrupt counter in the document)
        fails it at once. Returns the new status, or ``None`` if the lease was lost
        (nothing written)."""
        exhausted, corrupt = _attempts_used_up(task, self.settings.max_attempts)
        if corrupt:
            error = f"{error}\nCorruptTaskError: task {task['_id']} in pool {self.name!r}: {corrupt}; failed at once"
        new = st.FAILED if permanent or exhausted else (task.get("claimed_from") or st.WAITING)
        now = utcnow()
        r = self._journaled.update_one(
            {"_id": to_object_id(task), "status": st.RUNNING, "attempt": task["attempt"]},
            {
                "$set": {
                    "status": new,
                    "error": error,
                    "lease_until": None,
                    "worker": None,
                    "updated_at": now,
                    "finished_at": now if new == st.FAILED else None,
                    "published_at": RESEND,
                }
            },
        )
        if r.matched_count != 1:
            return None
        self._count_move(self._batch_ids(task), st.RUNNING, new)
        return new

    def fail_unclaimable(self, task_id: Any, status: str, refusal: str) -> bool:
        """Fail a ``status`` task whose claim the server refused because its ``attempt``
        is not a number (so ``$inc`` cannot apply): nothing can ever claim it, and the sweep
        would publish it for ever. The write is conditioned on the document still holding
        that status and that very value (``$eq``: a value shaped like an operator stays a
        value). ``False`` when the document is not in that state: the refusal had another
        cause, for the caller to raise."""
        oid = to_object_id(task_id)
        doc = self.task_pool.find_one({"_id": oid, "status": status}, {"attempt": 1, "batch_ids": 1})
        if doc is None or "attempt" not in doc or _is_count(doc["attempt"]):
            return False
        bad = doc["attempt"]
        now = utcnow()
        error = (
            f"CorruptTaskError: task {oid} in pool {self.name!r}: its attempt is {bad!r}, not a number, so no worker can "
            f"claim it (the server said: {refusal}); failed at once. Repair the document, then reset_status it to retry."
        )
        r = self.task_pool.update_one(
            {"_id": oid, "status": status, "attempt": {"$eq": bad}},
            {
                "$set": {
                    "status": st.FAILED,
                    "error": error,
                    "lease_until": None,
                    "worker": None,
                    "updated_at": now,
                    "finished_at": now,
                    "published_at": None,
                }
            },
        )
        if r.modified_count != 1:
            return False
        self._count_move(doc.get("batch_ids"), status, st.FAILED)
        return True

    def fail_unknown_statuses(self, limit: int = 1000) -> list[ObjectId]:
        """Fail the batch tasks whose ``status`` is none of qcelery's (a hand-edited or
        corrupt document): no worker claims them and no recovery moves them, so their
        batches would never aggregate. (Tasks of no batch are left alone: nothing waits on
        them.) Each write is conditioned on the status seen. Returns the ids failed."""
        failed: list[ObjectId] = []
        q = {"status": {"$nin": list(st.ALL)}, "batch_ids.0": {"$exists": True}}
        for d in self.task_pool.find(q, {"status": 1, "batch_ids": 1}).limit(limit):
            seen = d.get("status")
            now = utcnow()
            error = (
                f"CorruptTaskError: task {d['_id']} in pool {self.name!r}: its status {seen!r} is not one of "
                f"{', '.join(st.ALL)}; failed so that its batch can aggregate. Repair the document, then reset_status it to retry."
            )
            r = self.task_pool.update_one(
                {"_id": d["_id"], "status": {"$eq": seen}},
                {"$set": {"status": st.FAILED, "error": error, "lease_until": None, "worker": None, "updated_at": now, "finished_at": now}},
            )
            if r.modified_count == 1:
                logger.warning("task %s of pool %s: unknown status %r; failed", d["_id"], self.name, seen)
                failed.append(d["_id"])
                # its counted status is unknown (it left ours by hand): its batches recount
                counts.mark_dirty(self.task_pool.database, d.get("batch_ids") or ())
        return failed

    def commit_task_res(self, task: dict, res: Any, status: str = st.DONE) -> None:
        """Qlib's commit. For a task this pool leased (it has ``attempt``) the write is
        fenced and raises :class:`LeaseLostError` when the lease was taken over."""
        status = st.DONE if status is None else st.check(status)
        if task.get("attempt") and task.get("status") == st.RUNNING:
            if not self.commit(task, res, status):
                raise LeaseLostError(
                    f"task {task['_id']} in pool {self.name!r}: lease of attempt {task['attempt']} was lost; result not committed"
                )
            return
        oid = to_object_id(task)
        res_upd, _ = self._encode_res(res, oid)
        fields = {**res_upd["$set"], "status": status, "lease_until": None, "worker": None, "updated_at": utcnow()}
        self._set_status(oid, fields, self._journaled, unset=res_upd["$unset"])

    def _set_status(self, oid: ObjectId, fields: dict, pool: Collection[dict[str, Any]] | None = None, unset: dict | None = None) -> None:
        """Set ``fields`` (a new ``status`` among them; ``unset``: fields to drop) on task ``oid``
        whatever its status, as Qlib's unleased writes do; done as a read of the status and a
        write conditioned on it, so the move is counted in the task's batches (retried if the
        task moved between)."""
        pool = pool if pool is not None else self.task_pool
        upd: dict[str, Any] = {"$set": fields, **({"$unset": unset} if unset else {})}
        for _ in range(10):
            cur = self.task_pool.find_one({"_id": oid}, {"status": 1, "batch_ids": 1})
            if cur is None:
                return
            if pool.update_one({"_id": oid, "status": {"$eq": cur.get("status")}}, upd).matched_count == 1:
                self._count_move(cur.get("batch_ids"), str(cur.get("status")), fields["status"])
                return
        pool.update_one({"_id": oid}, upd)  # moving all the while: written, its batches recount
        counts.mark_dirty(self.task_pool.database, self._batch_ids({"_id": oid}))

    def return_task(self, task: dict, status: str = st.WAITING) -> None:
        """Put a fetched task back to ``status`` (default ``waiting``), releasing its lease."""
        status = st.WAITING if status is None else st.check(status)
        oid = to_object_id(task)
        fields = {"status": status, "lease_until": None, "worker": None, "updated_at": utcnow(), "published_at": RESEND}
        if task.get("attempt") and task.get("status") == st.RUNNING:
            if self.task_pool.update_one({"_id": oid, "status": st.RUNNING, "attempt": task["attempt"]}, {"$set": fields}).matched_count:
                self._count_move(self._batch_ids(task), st.RUNNING, status)
            return
        self._set_status(oid, fields)

    # ------------------------------------------------------------------ recovery
    def recover_expired(self, now: _dt.datetime | None = None) -> list[ObjectId]:
        """Tasks ``running`` past their lease go back to the status they were claimed from
        (or ``failed`` when ``max_attempts`` is used up). Returns the ids put back, to be
        re-published. Each move is conditioned on the attempt seen, so it is safe to run
        from several processes."""
        now = now or utcnow()
        requeued: list[ObjectId] = []
        cursor = self.task_pool.find(
            {"status": st.RUNNING, "lease_until": {"$lt": now}},
            {"attempt": 1, "attempt_base": 1, "max_attempts": 1, "claimed_from": 1, "worker": 1, "lease_until": 1, "batch_ids": 1},
        )
        for d in cursor:
            # a corrupt counter fails the task here rather than crash the recovery of the pool
            exhausted, corrupt = _attempts_used_up(d, self.settings.max_attempts)
            new = st.FAILED if exhausted else (d.get("claimed_from") or st.WAITING)
            upd: dict[str, Any] = {"status": new, "lease_until": None, "worker": None, "updated_at": now, "published_at": RESEND}
            if corrupt:
                upd.update(finished_at=now, error=f"CorruptTaskError: task {d['_id']} in pool {self.name!r}: lease expired and {corrupt}")
            elif exhausted:
                used = d["attempt"] - (d.get("attempt_base") or 0)
                upd.update(
                    finished_at=now, error=f"lease expired {max(used, 1)} time(s) (last worker {d.get('worker')}); attempts exhausted"
                )
            r = self.task_pool.update_one(
                {"_id": d["_id"], "status": st.RUNNING, "attempt": {"$eq": d.get("attempt")}, "lease_until": {"$lt": now}}, {"$set": upd}
            )
            if r.modified_count == 1:
                self._count_move(d.get("batch_ids"), st.RUNNING, new)
                logger.warning("task %s: lease of %s expired, now %s", d["_id"], d.get("worker"), new)
                if not exhausted:
                    requeued.append(d["_id"])
        return requeued

    def mark_published(self, ids: Iterable[Any], when: _dt.datetime | None = None) -> None:
        """Remember when messages for ``ids`` were last published (the sweep reads it)."""
        ids = [to_object_id(i) for i in ids]
        when = when or utcnow()
        for start in range(0, len(ids), self._lookup_chunk):
            self.task_pool.update_many({"_id": {"$in": ids[start : start + self._lookup_chunk]}}, {"$set": {"published_at": when}})

    def stale_waiting(self, older_than: float, limit: int = 10_000) -> list[ObjectId]:
        """Claimable tasks of some batch whose last publish is older than ``older_than``
        seconds, or that were never re-published after a reset."""
        cutoff = utcnow() - _dt.timedelta(seconds=older_than)
        q = {
            "status": {"$in": list(st.CLAIMABLE)},
            "batch_ids.0": {"$exists": True},
            "published_at": {"$lt": cutoff},
        }
        return [d["_id"] for d in self.task_pool.find(q, {"_id": 1}).limit(limit)]


_Keeper = TypeVar("_Keeper", bound="LeaseKeeper")


class LeaseKeeper:
    """Keeps a lease alive from a daemon thread: every ``interval`` seconds it calls
    ``renew()``, which extends the lease and returns ``False`` once this holder no longer
    has it (taken over elsewhere). Then ``lost`` is set and renewing stops: the holder
    must not commit. A renewal that cannot reach the store is retried on the next tick
    (the lease has slack for that). ``what`` names the lease in logs.
    """

    def __init__(self, renew: Callable[[], bool], interval: float, what: str):
        self.renew, self.interval, self.what = renew, interval, what
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{what}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.renew():
                    logger.warning("%s: lease lost to another holder; no longer renewed", self.what)
                    self.lost.set()
                    return
            except PyMongoError as exc:  # the store is briefly away: the lease has slack, try again
                logger.warning("heartbeat for %s failed: %s", self.what, exc)

    def __enter__(self: _Keeper) -> _Keeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Heartbeat(LeaseKeeper):
    """Keeps the lease of a claimed task alive (:meth:`Leases.heartbeat` at its attempt).

    ``lost`` is set when an extension finds the task no longer held at this attempt
    (recovered and re-claimed elsewhere): the holder must not commit then.
    """

    def __init__(self, manager: TaskManager, task: dict, interval: float | None = None):
        self.manager, self.task_id, self.attempt = manager, task["_id"], task["attempt"]
        super().__init__(
            lambda: manager.heartbeat(self.task_id, self.attempt),
            interval or manager.settings.heartbeat_seconds,
            f"task {self.task_id}",
        )
