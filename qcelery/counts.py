"""Progress counters of a batch: how many of its tasks are in each status, kept as they
move so that reading progress costs one small document whatever the batch's size.

Each batch has one document in ``qcelery_batch_counts``, keyed by the batch id::

    {_id: <batch id>,
     counts: {waiting, running, part_done, done, failed},   # the batch's distinct tasks
     moved_at,     # when a counter last moved
     checked_at,   # when the counters were last compared with a real count (its start)
     dirty,        # set by bulk operations: recount before trusting the counters
     repaired}     # how many times a real count found them wrong (a crash, a race)

Why not in the batch document: every task moves a counter twice or more, and a write
costs with the size of the document it rewrites. The batch document holds what grows
(its ``task_ids`` today, a collector's per-task summary once aggregated, and a later
batch's second phase moves the same tasks): measured on SecantusDB, claim + commit of
one task took 1.6 s with the counters in a 100,000-task batch document and 20 ms here
(bench/RESULTS.md, Progress). This document stays a few hundred bytes.

How they are kept. Each single-task transition (claim, commit, fail, recovery, return,
retry) is one conditional update of the task (DESIGN.md invariant 2); once that update
succeeded, and only then, :func:`moved` applies one ``$inc`` (-1 on the old status, +1
on the new) to every batch in the task's ``batch_ids``. Batch creation starts the
counters (:func:`start`) before its batch document is written, then adds the tasks it
tags (:func:`add`, :func:`tag`). Operations that change many tasks at once (``reset_status``,
``remove``, ``replace_task``, ``adopt``, unknown statuses) do not count each task: they
:func:`mark_dirty` the batches they touched, and the next reader recounts each once.

What may drift, and how it is repaired. The task's update and the ``$inc`` are two
writes: a process killed between them leaves the counters one move behind, and a batch
that tags an existing task while that task moves may count it in its old status. So the
counters are a fast estimate that is confirmed by a real count (one aggregation over
the batch's tasks, :func:`recount`) exactly where it matters (:func:`check_due`): when
they say the batch is finished, when they have not moved for a quiet interval (30 s,
then at doubling intervals up to 10 min while nothing moves), and when they are dirty.
A recount writes its result only if the counters did not move while it counted (the
filter names the values it read), so a recount never erases a move that landed
meanwhile; when one did, the batch stays due and a later reader tries again. The
aggregation's decision never rests on the counters: see :mod:`qcelery.batch`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from bson import ObjectId
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from . import status as st

if TYPE_CHECKING:
    from .manage import TaskManager

logger = logging.getLogger(__name__)

#: one counters document per batch, keyed by the batch id
COLLECTION = "qcelery_batch_counts"
#: a counter quiet this long (seconds) is confirmed by a real count
QUIET_SECONDS = 30.0
#: the longest interval between two confirmations of a batch whose counters do not move
MAX_CHECK_INTERVAL = 600.0


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _aware(when: _dt.datetime | None) -> _dt.datetime | None:
    """pymongo returns naive UTC datetimes unless the client is tz-aware."""
    return when.replace(tzinfo=_dt.timezone.utc) if when is not None and when.tzinfo is None else when


def zero() -> dict[str, int]:
    """Counters of an empty batch: every status present, so a recount's guard can name each."""
    return {s: 0 for s in st.ALL}


def start(db: Database[dict[str, Any]], batch_id: ObjectId) -> None:
    """Write the counters of a new batch (all zero) before any task is tagged with it and
    before its batch document exists: every move of a tagged task is then counted (a new
    task claimed before :func:`add` counted it nets out), and no reader takes the batch
    for one older than the counters. Idempotent (a creation run again keeps them)."""
    with contextlib.suppress(DuplicateKeyError):
        db[COLLECTION].insert_one({"_id": batch_id, "counts": zero(), "moved_at": _now(), "checked_at": None})


def stored(db: Database[dict[str, Any]], batch_id: ObjectId) -> dict | None:
    """The counters document of a batch, or ``None`` (a batch older than the counters)."""
    return db[COLLECTION].find_one({"_id": batch_id})


def forget(db: Database[dict[str, Any]], batch_ids: Iterable[Any]) -> None:
    """Delete the counters of removed batches."""
    ids = list(batch_ids)
    for start_at in range(0, len(ids), 100):
        db[COLLECTION].delete_many({"_id": {"$in": ids[start_at : start_at + 100]}})


def add(db: Database[dict[str, Any]], batch_id: ObjectId, stat_delta: Mapping[Any, int]) -> None:
    """Count tasks that were just tagged with ``batch_id``: ``stat_delta`` maps a status
    to how many of the added tasks are in it (new tasks ``waiting``, tasks already in the
    pool in the status they had when tagged: :func:`tag` does both for those). Called by
    batch creation, after :func:`start`, once per chunk it adds."""
    inc = {f"counts.{s}": int(n) for s, n in stat_delta.items() if n and s in st.ALL}
    unknown = {s: n for s, n in stat_delta.items() if n and s not in st.ALL}
    upd: dict[str, Any] = {"$set": {"moved_at": _now()}}
    if inc:
        upd["$inc"] = inc
    if unknown:  # a task whose status is none of ours: counted by a real count later
        upd["$set"]["dirty"] = True
    # no upsert: a batch whose counters were never started is counted for real by its first reader
    db[COLLECTION].update_one({"_id": batch_id}, upd)


def tag(tm: TaskManager, batch_id: ObjectId, ids: Iterable[ObjectId]) -> dict[Any, int]:
    """Tag the existing tasks ``ids`` with ``batch_id`` and count each in the batch in the
    status it had when it was tagged; returns those counts (:func:`add` done).

    Each task is tagged by an update conditioned on the status read just before, so the
    count is the status at the tagging, and a move after it reaches the batch through
    :func:`moved`: exact even while the tasks run. A task that moved between the read and
    its update is read again. Tasks tagged already (a creation run again) are not counted twice."""
    stat: dict[Any, int] = {}
    ids = list(ids)
    for start in range(0, len(ids), 100):  # small $in chunks: see manage._LOOKUP_CHUNK
        part = ids[start : start + 100]
        for _ in range(5):
            untagged: dict[Any, list] = {}
            for d in tm.task_pool.find({"_id": {"$in": part}, "batch_ids": {"$ne": batch_id}}, {"status": 1}):
                untagged.setdefault(d.get("status"), []).append(d["_id"])
            if not untagged:
                break
            for status, sids in untagged.items():
                flt = {"_id": {"$in": sids}, "status": {"$eq": status}, "batch_ids": {"$ne": batch_id}}
                n = tm.task_pool.update_many(flt, {"$addToSet": {"batch_ids": batch_id}}).modified_count
                stat[status] = stat.get(status, 0) + n
        else:  # moving all the while: tagged as they are, counted by the next reader's recount
            tm.task_pool.update_many({"_id": {"$in": part}}, {"$addToSet": {"batch_ids": batch_id}})
            mark_dirty(tm.db, [batch_id])
    add(tm.db, batch_id, stat)
    return stat


def moved(db: Database[dict[str, Any]], batch_ids: Iterable[Any] | None, old: str, new: str) -> None:
    """One task of ``batch_ids`` went from ``old`` to ``new``: move one count between
    them in each batch. Call it only after the task's own conditional update succeeded."""
    ids = list(batch_ids or ())
    if not ids or old == new:
        return
    if old not in st.ALL or new not in st.ALL:
        mark_dirty(db, ids)
        return
    upd = {"$inc": {f"counts.{old}": -1, f"counts.{new}": 1}, "$set": {"moved_at": _now()}}
    if len(ids) == 1:
        db[COLLECTION].update_one({"_id": ids[0]}, upd)
    else:
        db[COLLECTION].update_many({"_id": {"$in": ids}}, upd)


def mark_dirty(db: Database[dict[str, Any]], batch_ids: Iterable[Any]) -> None:
    """The counters of ``batch_ids`` no longer follow their tasks (a bulk operation changed
    many at once): the next reader recounts each of them once."""
    ids = list(dict.fromkeys(batch_ids))
    for start in range(0, len(ids), 100):  # small $in chunks: see manage._LOOKUP_CHUNK
        db[COLLECTION].update_many({"_id": {"$in": ids[start : start + 100]}}, {"$set": {"dirty": True, "checked_at": None}})


def batches_of(tm: TaskManager, query: Mapping[str, Any]) -> list[ObjectId]:
    """The batches the tasks matching ``query`` belong to (one aggregation; for bulk operations)."""
    rows = tm.task_pool.aggregate([{"$match": dict(query)}, {"$unwind": "$batch_ids"}, {"$group": {"_id": "$batch_ids"}}])
    return [r["_id"] for r in rows]


def current(doc: Mapping[str, Any] | None) -> dict[str, int]:
    """The counts of a counters document as ``task_stat`` shows counts: statuses with no task left out."""
    return {s: n for s, n in ((doc or {}).get("counts") or {}).items() if n}


def outstanding(stat: Mapping[str, int], final: Iterable[str]) -> int:
    """How many tasks of ``stat`` still need work for a batch whose final statuses are ``final``."""
    final = set(final)
    return sum(n for s, n in stat.items() if s not in final)


def check_due(doc: Mapping[str, Any], final: Iterable[str], now: _dt.datetime | None = None, quiet: float = QUIET_SECONDS) -> bool:
    """Whether a waiting reader should confirm the counters ``doc`` of a batch whose final
    statuses are ``final`` with a real count now (the repair rule of the module docstring)."""
    now = now or _now()
    checked = _aware(doc.get("checked_at"))
    moved_at = _aware(doc.get("moved_at")) or now
    since_check = (now - checked).total_seconds() if checked else float("inf")
    if doc.get("dirty"):
        return since_check >= quiet  # at once after the bulk operation, then once per quiet interval
    if says_finished(doc, final):
        return True
    idle = (now - moved_at).total_seconds()
    return idle >= quiet and since_check >= min(MAX_CHECK_INTERVAL, max(quiet, idle / 2))


def says_finished(doc: Mapping[str, Any], final: Iterable[str]) -> bool:
    """Whether the counters ``doc`` say every task is final and no real count confirmed
    that since they last moved (what a waiting reader confirms before it believes it)."""
    if outstanding(current(doc), final) > 0:
        return False
    checked, moved_at = _aware(doc.get("checked_at")), _aware(doc.get("moved_at"))
    return checked is None or moved_at is None or checked < moved_at


def claim_check(db: Database[dict[str, Any]], doc: Mapping[str, Any]) -> bool:
    """Reserve the confirmation of the counters ``doc`` for this reader, so that of several
    readers polling the same batch one counts. ``False`` when another took it."""
    r = db[COLLECTION].update_one({"_id": doc["_id"], "checked_at": doc.get("checked_at")}, {"$set": {"checked_at": _now()}})
    return r.modified_count == 1


def real(tm: TaskManager, batch_id: ObjectId) -> dict[str, int]:
    """The batch's counts by status from its tasks (one aggregation on the batch index)."""
    return tm.task_stat({"batch_ids": batch_id})


def recount(tm: TaskManager, batch: Mapping[str, Any]) -> dict[str, int]:
    """Count the batch's tasks for real and set its counters to that count, unless they
    moved while it counted (then they are left, still due, for a later check). Returns
    the real count."""
    coll = tm.db[COLLECTION]
    bid = batch["_id"]
    # the count's time is when it began: a move during it is newer, and is confirmed again
    started = _now()
    seen = coll.find_one({"_id": bid})
    stat = real(tm, bid)
    counts = {**zero(), **{s: n for s, n in stat.items() if s in st.ALL}}
    # statuses none of ours (hand-edited) stay out of the counters: the sweep fails those tasks
    fields = {"counts": counts, "checked_at": started, "dirty": any(s not in st.ALL for s in stat)}
    if seen is None:  # a batch written before the counters: its first count starts them
        with contextlib.suppress(DuplicateKeyError):  # started meanwhile: a later check confirms them
            coll.insert_one({"_id": bid, **fields, "moved_at": started})
        return stat
    guard = {f"counts.{s}": (seen.get("counts") or {}).get(s) for s in st.ALL}
    upd: dict[str, Any] = {"$set": fields}
    wrong = not seen.get("dirty") and current(seen) != current({"counts": counts})
    if wrong:  # kept count of: a batch whose counters needed repair says so
        upd["$inc"] = {"repaired": 1}
    if coll.update_one({"_id": bid, **guard}, upd).modified_count == 1:
        if wrong:
            logger.warning("batch %s: counters %s repaired to the real count %s", bid, current(seen), stat)
    else:
        coll.update_one({"_id": bid}, {"$set": {"checked_at": started}})
    return stat


def read(tm: TaskManager, batch: Mapping[str, Any], *, confirm: bool, quiet: float = QUIET_SECONDS) -> dict[str, int]:
    """The counts by status of ``batch`` (its batch document) from its counters: one read
    of one small document.

    A batch without counters (written by an older qcelery) or marked dirty is recounted
    (once; one reader at a time). With ``confirm`` (readers that wait for the batch) the
    whole repair rule applies (:func:`check_due`)."""
    doc = stored(tm.db, batch["_id"])
    if doc is None:
        return recount(tm, batch)
    final = (batch.get("after_status") or st.DONE, st.DONE, st.FAILED)
    if confirm and says_finished(doc, final):
        return recount(tm, batch)  # believed only once counted (by every reader that waits on it)
    # without confirm: the counters as they are, unless a bulk operation made them dirty
    due = (confirm or bool(doc.get("dirty"))) and check_due(doc, final, quiet=quiet)
    if due and claim_check(tm.db, doc):
        return recount(tm, batch)
    return current(doc)
