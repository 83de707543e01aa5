"""Batches: the tasks one ``enqueue`` call sent, and their single aggregation.

A batch document lives in ``qcelery_batches`` beside the pools::

    {_id, pool, key, queue, n_tasks, n_new, found: {status: n}, chunks, cursor: {c, o}, window, task_func, task_kwargs,
     qlib_init, before_status, after_status, aggregate: {func, kwargs} | None,
     state: creating|open|aggregating|aggregated, created_at, next_check_at, aggregator,
     aggregating_since, lease_until, aggregate_runs, aggregated_at, summary}

No field grows with the batch: its tasks carry its id (``batch_ids``), and the ids still to
run wait in bounded chunk documents (:mod:`qcelery.dispatch`). The producer streams:
``begin`` (or finds the batch an interrupted producer left ``creating`` under the same
``key``), ``add_chunk`` per chunk of its input, ``finish`` (``creating -> open``).

Progress. The batch's counters (how many of its tasks are in each status, in a small
document of their own beside the batch, :mod:`qcelery.counts`) are kept as the tasks
move, so ``progress`` reads one small document whatever the batch's size. The rule that
keeps them exact:

* every single-task transition moves one count, after the task's own update succeeded;
  bulk operations mark the batches they touched dirty, and the next reader recounts them;
* readers that show progress (``qcelery status``, ``progress``) read the counters only;
* readers that wait for the batch (``qcelery wait``, ``TrainerCelery``, the re-checks of
  ``aggregate``) use :func:`watched_progress`: the counters, confirmed by one real count
  when they say the batch is finished, when they have not moved for 30 s (then at
  doubling intervals up to 10 min), or when they are dirty; a count that disagrees
  repairs them (``$set``, only if they did not move meanwhile);
* the aggregation itself never trusts them: :func:`verified_outstanding` counts the tasks
  for real before the batch is aggregated, and repairs the counters from that count.

So a counter left off by a process killed between a task's update and its ``$inc`` is
wrong for at most one quiet interval of a waiting reader, and never decides anything.

``state`` moves creating -> open -> aggregating -> aggregated, and aggregating -> open when the
aggregator's lease expired (-> aggregated, with an error, once ``max_runs`` runs began).
The aggregation is leased like a task: ``begin_aggregation`` takes an open batch,
increments ``aggregate_runs`` (the number of aggregation runs begun, and the fencing
token of the current one) and sets ``lease_until``; the aggregator's heartbeat
(``renew_aggregation``) keeps extending the lease however long the collector takes;
``finish_aggregation`` stores the summary.

Concurrency contract. Each step is one conditional update whose filter states what must
hold: ``begin`` needs ``state: open`` (of any number of copies of the aggregation
message, one wins per opening); ``renew`` and ``finish`` need ``state: aggregating`` *and*
the holder's own ``aggregate_runs``, so once a run was taken over its heartbeat reports
the lease lost and its summary is refused: the summary kept is the one the finishing
run produced. ``stalled`` reopens an aggregation only while its ``lease_until`` is past
and its run is the one it read, so a holder that renews in between keeps it, and a
reopen and a finish of the same run exclude each other. What may repeat: the collector
of a run whose holder died (kill -9, lost host) or was cut off from Mongo for longer than
the lease runs again, in full, in the next run (at most ``max_runs`` runs in all); its
side effects outside the batch document (an MLflow summary run, a report file) can then
exist twice, as for a task that is run again after its worker died. One summary is
stored, once.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Iterable
from typing import Any

from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.database import Database

from . import counts, dispatch
from . import status as st
from .errors import TaskNotFoundError
from .manage import TaskManager, to_object_id, utcnow

logger = logging.getLogger(__name__)

COLLECTION = "qcelery_batches"

CREATING, OPEN, AGGREGATING, AGGREGATED = "creating", "open", "aggregating", "aggregated"
_TAG_CHUNK = 100  # small $in chunks: see manage._LOOKUP_CHUNK


def ensure_indexes(db: Database[dict[str, Any]]) -> None:
    c = db[COLLECTION]
    c.create_index([("state", 1), ("created_at", 1)], name="state")
    c.create_index([("pool", 1), ("key", 1)], name="key")


def begin(
    manager: TaskManager,
    *,
    key: str,
    queue: str,
    task_func: str,
    task_kwargs: dict | None,
    before_status: str,
    after_status: str,
    aggregate: dict | None,
    priority: int = 0,
    qlib_init: dict | None = None,
    window: int = dispatch.MIN_WINDOW,
) -> tuple[dict, bool]:
    """The batch ``key`` names in this pool while it is being created: the one an
    interrupted producer left ``creating`` (resumed: ``True``), else a new one. ``key``
    identifies the producer's input (see :func:`qcelery.producer.enqueue`). ``qlib_init``
    (checked by the caller) is what every worker passes to ``qlib.init`` before the
    batch's tasks."""
    ensure_indexes(manager.db)
    found = manager.db[COLLECTION].find_one({"pool": manager.name, "key": key, "state": CREATING})
    if found is not None:
        return found, True
    bid = ObjectId()
    doc = {
        "_id": bid,
        "pool": manager.name,
        "key": key,
        "queue": queue,
        "n_tasks": 0,
        "n_new": 0,
        "found": {},
        "chunks": 0,
        "cursor": {"c": 0, "o": 0},
        "window": window,
        "task_func": task_func,
        "task_kwargs": task_kwargs or {},
        "qlib_init": qlib_init,
        "before_status": before_status,
        "after_status": after_status,
        "aggregate": aggregate,
        "priority": priority,
        "state": CREATING,
        "created_at": utcnow(),
        "next_check_at": None,
        "aggregator": None,
        "aggregating_since": None,
        "lease_until": None,
        "aggregated_at": None,
        "aggregate_runs": 0,
        "summary": None,
    }
    counts.start(manager.db, bid)  # first: a move of any task tagged from now on is counted
    manager.db[COLLECTION].insert_one(doc)
    return doc, False


def add_chunk(
    manager: TaskManager, batch: dict, n: int, task_defs: list[dict], index_base: int = 0, look_up: bool = True
) -> tuple[list[ObjectId], set[ObjectId]]:
    """Chunk ``n`` of the producer's input: its tasks created (new ones born tagged with
    the batch) or tagged, the ones to run queued as the batch's chunk ``n``, and the batch's
    ``chunks`` moved to ``n + 1`` (only from ``n``: a chunk is counted once). Returns the ids
    queued, in input order, and the ids inserted now (``look_up``: as in
    :meth:`~qcelery.manage.TaskManager.create_tasks`). Every step is idempotent, so a
    producer interrupted anywhere in it can do the chunk again."""
    bid = batch["_id"]
    ids, inserted = manager.create_tasks(task_defs, batch_id=bid, index_base=index_base, look_up=look_up)
    # new tasks are born waiting (a move since is counted already: it nets out); the pool's
    # own are tagged and counted in the status they have when tagged (counts.tag)
    counts.add(manager.db, bid, {st.WAITING: len(inserted)})
    unique_ids: list[ObjectId] = list(dict.fromkeys(ids))
    old = [i for i in unique_ids if i not in inserted]
    found = counts.tag(manager, bid, old)  # tagged now, by status (not again when a chunk is redone)
    if batch.get("priority"):
        for start in range(0, len(unique_ids), _TAG_CHUNK):
            manager.task_pool.update_many(
                {"_id": {"$in": unique_ids[start : start + _TAG_CHUNK]}}, {"$max": {"priority": batch["priority"]}}
            )
    status = batch.get("before_status") or st.WAITING
    runnable = set(inserted) if status == st.WAITING else set()
    for start in range(0, len(old), _TAG_CHUNK):
        part = old[start : start + _TAG_CHUNK]
        if status != st.WAITING:  # a second phase: results of the first carry no message
            manager.task_pool.update_many({"_id": {"$in": part}, "status": status}, {"$set": {"published_at": None}})
        runnable.update(d["_id"] for d in manager.task_pool.find({"_id": {"$in": part}, "status": status}, {"_id": 1}))
    queued = [i for i in unique_ids if i in runnable]
    dispatch.write_chunk(manager.db, bid, n, queued)
    tagged = sum(found.values())
    inc = {"n_tasks": len(inserted) + tagged, "n_new": len(inserted), **{f"found.{s}": k for s, k in found.items() if isinstance(s, str)}}
    manager.db[COLLECTION].update_one({"_id": bid, "chunks": n}, {"$set": {"chunks": n + 1}, "$inc": inc})
    return queued, inserted


def finish(manager: TaskManager, batch: dict, resumed: bool) -> dict:
    """The batch complete: ``open`` (its aggregation may now run). A resumed batch counts
    its tasks again, since a chunk redone after an interruption tagged no task twice."""
    upd: dict[str, Any] = {"state": OPEN}
    if resumed:
        upd["n_tasks"] = manager.task_pool.count_documents({"batch_ids": batch["_id"]})
    doc = manager.db[COLLECTION].find_one_and_update(
        {"_id": batch["_id"], "state": CREATING}, {"$set": upd}, return_document=ReturnDocument.AFTER
    )
    return doc or load(manager.db, batch["_id"])


def create(manager: TaskManager, task_defs: list[dict], *, chunk: int = 1000, **spec: Any) -> tuple[dict, set[ObjectId]]:
    """A whole batch from a list at once (``begin``, a chunk per ``chunk`` tasks, ``finish``),
    without publishing anything: the open batch and the ids inserted. The list is checked
    whole first: bad input writes nothing."""
    manager.check_defs(task_defs)
    doc, _ = begin(manager, key=str(ObjectId()), **spec)
    inserted: set[ObjectId] = set()
    for n, start in enumerate(range(0, len(task_defs), chunk)):
        inserted |= add_chunk(manager, doc, n, task_defs[start : start + chunk])[1]
    return finish(manager, doc, resumed=False), inserted


def task_ids(manager: TaskManager, batch_id: Any) -> list[ObjectId]:
    """Every task of the batch, oldest first: for small batches (tests, tools); large ones
    read the tasks by their ``batch_ids`` with a cursor."""
    return [d["_id"] for d in manager.task_pool.find({"batch_ids": to_object_id(batch_id)}, {"_id": 1}).sort("_id", 1)]


def load(db: Database[dict[str, Any]], batch_id: Any) -> dict:
    doc = db[COLLECTION].find_one({"_id": to_object_id(batch_id)})
    if doc is None:
        raise TaskNotFoundError(f"no batch {batch_id} in database {db.name!r}")
    return doc


def final_statuses(batch: dict) -> tuple[str, ...]:
    """Statuses after which a batch's task needs no more work *for this batch*."""
    return tuple(dict.fromkeys((batch.get("after_status", st.DONE), st.DONE, st.FAILED)))


def progress(manager: TaskManager, batch: dict) -> dict[str, int]:
    """Counts by status of the batch's tasks, from its counters: one read of the batch
    document, whatever its size (see the module docstring for when they are recounted)."""
    return counts.read(manager, batch, confirm=False)


def watched_progress(manager: TaskManager, batch: dict, quiet: float = counts.QUIET_SECONDS) -> dict[str, int]:
    """:func:`progress` for a reader that polls until the batch is finished: the counters,
    confirmed by a real count when they say finished or have been quiet for ``quiet`` s."""
    return counts.read(manager, batch, confirm=True, quiet=quiet)


def outstanding(manager: TaskManager, batch: dict, stat: dict[str, int] | None = None) -> int:
    """How many of the batch's tasks still need work, by its counters (or by ``stat``)."""
    return counts.outstanding(progress(manager, batch) if stat is None else stat, final_statuses(batch))


def verified_outstanding(manager: TaskManager, batch: dict) -> int:
    """:func:`outstanding` from a real count of the batch's tasks, which repairs the
    counters when they disagree: what the aggregation decides on."""
    return counts.outstanding(counts.recount(manager, batch), final_statuses(batch))


def schedule_check(db: Database[dict[str, Any]], batch_id: ObjectId, delay: float) -> bool:
    """Reserve the next re-check of an open batch; ``False`` if one is already pending,
    so duplicated aggregation messages do not multiply the polling."""
    now = utcnow()
    r = db[COLLECTION].update_one(
        {"_id": batch_id, "state": OPEN, "$or": [{"next_check_at": None}, {"next_check_at": {"$lte": now}}]},
        {"$set": {"next_check_at": now + _dt.timedelta(seconds=delay)}},
    )
    return r.modified_count == 1


def begin_aggregation(db: Database[dict[str, Any]], batch_id: ObjectId, worker: str, lease_seconds: float) -> dict | None:
    """Take the batch's aggregation for ``worker`` under a lease of ``lease_seconds``; the
    batch as taken (its ``aggregate_runs`` is this run's token), or ``None`` if another copy
    of the message has it or it is done."""
    now = utcnow()
    return db[COLLECTION].find_one_and_update(
        {"_id": batch_id, "state": OPEN},
        {
            "$set": {
                "state": AGGREGATING,
                "aggregator": worker,
                "aggregating_since": now,
                "lease_until": now + _dt.timedelta(seconds=lease_seconds),
            },
            "$inc": {"aggregate_runs": 1},
        },
        return_document=ReturnDocument.AFTER,
    )


def renew_aggregation(db: Database[dict[str, Any]], batch_id: ObjectId, run: int, lease_seconds: float) -> bool:
    """Extend the lease of aggregation run ``run``; ``False`` once that run was taken over."""
    r = db[COLLECTION].update_one(
        {"_id": batch_id, "state": AGGREGATING, "aggregate_runs": run},
        {"$set": {"lease_until": utcnow() + _dt.timedelta(seconds=lease_seconds)}},
    )
    return r.matched_count == 1


def finish_aggregation(db: Database[dict[str, Any]], batch_id: ObjectId, run: int, summary: dict) -> bool:
    """Store ``summary`` and mark the batch aggregated, only if aggregation run ``run`` still
    holds it; ``False`` (nothing written) when the run was taken over."""
    r = db[COLLECTION].update_one(
        {"_id": batch_id, "state": AGGREGATING, "aggregate_runs": run},
        {"$set": {"state": AGGREGATED, "summary": summary, "aggregated_at": utcnow(), "lease_until": None}},
    )
    return r.modified_count == 1


def stalled(db: Database[dict[str, Any]], older_than: float, max_runs: int | None = None) -> list[dict]:
    """Batches beat should re-check, since a lost or failed chord never fires: open batches
    (any pool) created more than ``older_than`` seconds ago and not re-checked within that
    time, and aggregations whose holder stopped renewing its lease (reopened here, each
    one conditional update; a live aggregation is never reopened, however long it runs).

    An expired aggregation that already began ``max_runs`` runs is not reopened but ended:
    ``aggregated`` with a summary whose ``aggregate_error`` says so, as a task is ``failed``
    when its attempts are used up, so a collector that kills its worker every time (out of
    memory, a hard time limit) is not run forever."""
    now = utcnow()
    cutoff = now - _dt.timedelta(seconds=older_than)
    expired = {
        "state": AGGREGATING,
        # a batch an older qcelery began has no lease: its start time stands in for one
        "$or": [{"lease_until": {"$lt": now}}, {"lease_until": None, "aggregating_since": {"$lt": cutoff}}],
    }
    for d in list(db[COLLECTION].find(expired, {"aggregate_runs": 1, "aggregator": 1, "n_tasks": 1})):
        runs = d.get("aggregate_runs") or 0
        if max_runs is not None and runs >= max_runs:
            error = f"aggregation lease expired {runs} time(s) (last aggregator {d.get('aggregator')}); runs exhausted (max {max_runs})"
            upd = {
                "state": AGGREGATED,
                "lease_until": None,
                "aggregated_at": now,
                "summary": {"n_tasks": d.get("n_tasks"), "aggregate_error": error},
            }
        else:
            upd = {"state": OPEN, "aggregator": None, "aggregating_since": None, "lease_until": None, "next_check_at": None}
        r = db[COLLECTION].update_one({**expired, "_id": d["_id"], "aggregate_runs": d.get("aggregate_runs")}, {"$set": upd})
        if r.modified_count == 1:
            logger.warning("batch %s: lease of aggregation run %s (%s) expired; now %s", d["_id"], runs, d.get("aggregator"), upd["state"])
    return list(
        db[COLLECTION].find(
            {"state": OPEN, "created_at": {"$lt": cutoff}, "$or": [{"next_check_at": None}, {"next_check_at": {"$lt": cutoff}}]},
            {"_id": 1, "pool": 1},
        )
    )


def list_batches(db: Database[dict[str, Any]], pool: str | None = None, limit: int = 50) -> Iterable[dict]:
    q = {"pool": pool} if pool else {}
    return db[COLLECTION].find(q).sort("created_at", -1).limit(limit)  # type: ignore[no-any-return]  # pymongo's Cursor.sort returns typing.Self, absent from the 3.10 target
