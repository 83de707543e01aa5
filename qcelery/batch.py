"""Batches: the tasks one ``enqueue`` call sent, and their single aggregation.

A batch document lives in ``qcelery_batches`` beside the pools::

    {_id, pool, queue, task_ids, n_tasks, task_func, task_kwargs, before_status,
     after_status, aggregate: {func, kwargs} | None, state: open|aggregating|aggregated,
     created_at, next_check_at, aggregator, aggregating_since, aggregated_at,
     aggregate_runs, summary}

``state`` moves open -> aggregating -> aggregated, each step one conditional update,
so however many copies of the aggregation message arrive, one of them does the work.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from typing import Any

from bson import ObjectId
from pymongo import ReturnDocument
from pymongo.database import Database

from . import status as st
from .errors import TaskNotFoundError
from .manage import TaskManager, to_object_id, utcnow

COLLECTION = "qcelery_batches"

OPEN, AGGREGATING, AGGREGATED = "open", "aggregating", "aggregated"
_TAG_CHUNK = 100  # small $in chunks: see manage._LOOKUP_CHUNK


def ensure_indexes(db: Database[dict[str, Any]]) -> None:
    c = db[COLLECTION]
    c.create_index([("state", 1), ("created_at", 1)], name="state")


def create(
    manager: TaskManager,
    task_defs: list[dict],
    *,
    queue: str,
    task_func: str,
    task_kwargs: dict | None,
    before_status: str,
    after_status: str,
    aggregate: dict | None,
    priority: int = 0,
) -> tuple[dict, set[ObjectId]]:
    """Create the tasks (new ones born tagged with the batch) and the batch document;
    returns the batch and the ids that were inserted now."""
    bid = ObjectId()
    ids, inserted = manager.create_tasks(task_defs, batch_id=bid)
    unique_ids = list(dict.fromkeys(ids))
    old = [i for i in unique_ids if i not in inserted]
    for start in range(0, len(old), _TAG_CHUNK):
        manager.task_pool.update_many({"_id": {"$in": old[start : start + _TAG_CHUNK]}}, {"$addToSet": {"batch_ids": bid}})
    if priority:
        for start in range(0, len(unique_ids), _TAG_CHUNK):
            manager.task_pool.update_many({"_id": {"$in": unique_ids[start : start + _TAG_CHUNK]}}, {"$max": {"priority": priority}})
    doc = {
        "_id": bid,
        "pool": manager.name,
        "queue": queue,
        "task_ids": unique_ids,
        "n_tasks": len(unique_ids),
        "task_func": task_func,
        "task_kwargs": task_kwargs or {},
        "before_status": before_status,
        "after_status": after_status,
        "aggregate": aggregate,
        "priority": priority,
        "state": OPEN,
        "created_at": utcnow(),
        "next_check_at": None,
        "aggregator": None,
        "aggregating_since": None,
        "aggregated_at": None,
        "aggregate_runs": 0,
        "summary": None,
    }
    ensure_indexes(manager.db)
    manager.db[COLLECTION].insert_one(doc)
    return doc, inserted


def load(db: Database[dict[str, Any]], batch_id: Any) -> dict:
    doc = db[COLLECTION].find_one({"_id": to_object_id(batch_id)})
    if doc is None:
        raise TaskNotFoundError(f"no batch {batch_id} in database {db.name!r}")
    return doc


def final_statuses(batch: dict) -> tuple[str, ...]:
    """Statuses after which a batch's task needs no more work *for this batch*."""
    return tuple(dict.fromkeys((batch.get("after_status", st.DONE), st.DONE, st.FAILED)))


def progress(manager: TaskManager, batch: dict) -> dict[str, int]:
    """Counts by status of the batch's tasks (one aggregation on the batch index)."""
    return manager.task_stat({"batch_ids": batch["_id"]})


def outstanding(manager: TaskManager, batch: dict) -> int:
    stat = progress(manager, batch)
    final = final_statuses(batch)
    return sum(n for s, n in stat.items() if s not in final)


def schedule_check(db: Database[dict[str, Any]], batch_id: ObjectId, delay: float) -> bool:
    """Reserve the next re-check of an open batch; ``False`` if one is already pending,
    so duplicated aggregation messages do not multiply the polling."""
    now = utcnow()
    r = db[COLLECTION].update_one(
        {"_id": batch_id, "state": OPEN, "$or": [{"next_check_at": None}, {"next_check_at": {"$lte": now}}]},
        {"$set": {"next_check_at": now + _dt.timedelta(seconds=delay)}},
    )
    return r.modified_count == 1


def begin_aggregation(db: Database[dict[str, Any]], batch_id: ObjectId, worker: str) -> dict | None:
    """Take the batch's aggregation; ``None`` if another copy has it or it is done."""
    now = utcnow()
    return db[COLLECTION].find_one_and_update(
        {"_id": batch_id, "state": OPEN},
        {"$set": {"state": AGGREGATING, "aggregator": worker, "aggregating_since": now}},
        return_document=ReturnDocument.AFTER,
    )


def finish_aggregation(db: Database[dict[str, Any]], batch_id: ObjectId, worker: str, summary: dict) -> bool:
    r = db[COLLECTION].update_one(
        {"_id": batch_id, "state": AGGREGATING, "aggregator": worker},
        {"$set": {"state": AGGREGATED, "summary": summary, "aggregated_at": utcnow()}, "$inc": {"aggregate_runs": 1}},
    )
    return r.modified_count == 1


def stalled(db: Database[dict[str, Any]], older_than: float) -> list[dict]:
    """Batches beat should re-check, since a lost or failed chord never fires: open batches
    (any pool) created more than ``older_than`` seconds ago and not re-checked within that
    time, and aggregations whose aggregator vanished longer ago than that (reopened here)."""
    now = utcnow()
    cutoff = now - _dt.timedelta(seconds=older_than)
    stuck = list(db[COLLECTION].find({"state": AGGREGATING, "aggregating_since": {"$lt": cutoff}}, {"_id": 1}))
    for d in stuck:
        db[COLLECTION].update_one(
            {"_id": d["_id"], "state": AGGREGATING, "aggregating_since": {"$lt": cutoff}},
            {"$set": {"state": OPEN, "aggregator": None, "aggregating_since": None}},
        )
    return list(
        db[COLLECTION].find(
            {"state": OPEN, "created_at": {"$lt": cutoff}, "$or": [{"next_check_at": None}, {"next_check_at": {"$lt": cutoff}}]},
            {"_id": 1, "pool": 1},
        )
    )


def list_batches(db: Database[dict[str, Any]], pool: str | None = None, limit: int = 50) -> Iterable[dict]:
    q = {"pool": pool} if pool else {}
    return db[COLLECTION].find(q, {"task_ids": 0}).sort("created_at", -1).limit(limit)  # type: ignore[no-any-return]  # pymongo's Cursor.sort returns typing.Self, absent from the 3.10 target
