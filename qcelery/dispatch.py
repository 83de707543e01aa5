"""The broker window: Mongo holds a batch's queue, the broker only a few messages of it.

A batch's tasks to run are written, as the producer streams them, into chunk documents
of ``qcelery_dispatch`` (``{_id: "<batch>:<n>", batch, n, ids: [...]}``, at most one
producer chunk each, so no document grows with the batch). The batch document keeps a
``cursor`` (``{c: chunk, o: offset}``: what was handed out so far) and ``chunks`` (how
many chunk documents are complete); :func:`take` moves the cursor with one conditional
update (compare-and-set), so concurrent takers never hand out a position twice.

A task is *dispatched* when its ``published_at`` goes from ``None`` to a time, in one
update conditioned on its status (:func:`dispatch`): a task that is no longer claimable
(finished meanwhile for another batch, or already sent) is passed over. Only a dispatched
task has a message on the broker; :data:`RESEND` (the epoch) marks a task that needs one
again (reset, recovered, prioritized): beat's sweep sends those at once, and also sends
again any dispatched task whose message is older than ``sweep_after`` (lost).

The window: a batch keeps about ``window`` messages on the broker (``settings.dispatch_window``,
or 4 per worker process serving its queue, at least :data:`MIN_WINDOW`). The producer
sends the first window as the header of the batch's chord; each header message, when its
task ends, takes the next task of the batch and replaces itself by it (Celery's
``Task.replace`` keeps its place in the chord), so the chord's header stays ``window``
long however big the batch, and its callback (the aggregation) fires once the last of
them finds the queue empty. Messages outside the chord (recovered, swept, a top-up by
beat when workers were added) take a next task only while the batch has fewer than
``window`` tasks in flight (:func:`in_flight`: dispatched-waiting plus running, both
bounded index ranges).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from bson import ObjectId
from pymongo.database import Database

from . import status as st
from .lease import RESEND, utcnow

logger = logging.getLogger(__name__)

COLLECTION = "qcelery_dispatch"
BATCHES = "qcelery_batches"  # qcelery.batch.COLLECTION (batch imports this module)
#: the smallest window of a batch (messages on the broker), whatever the workers
MIN_WINDOW = 16
#: messages per worker process when the window follows the workers
PER_PROCESS = 4

_CACHE: OrderedDict[str, list[ObjectId]] = OrderedDict()
_CACHE_SIZE = 8


def chunk_id(batch_id: Any, n: int) -> str:
    return f"{batch_id}:{n}"


def write_chunk(db: Database[dict[str, Any]], batch_id: ObjectId, n: int, ids: list[ObjectId]) -> None:
    """Chunk ``n`` of the batch's queue (idempotent: a resumed producer writes the same)."""
    db[COLLECTION].replace_one({"_id": chunk_id(batch_id, n)}, {"batch": batch_id, "n": n, "ids": ids}, upsert=True)


def drop_chunks(db: Database[dict[str, Any]], batch_id: ObjectId) -> int:
    return db[COLLECTION].delete_many({"batch": batch_id}).deleted_count


def _chunk(db: Database[dict[str, Any]], batch_id: ObjectId, n: int) -> list[ObjectId]:
    key = chunk_id(batch_id, n)
    ids = _CACHE.get(key)
    if ids is None:
        doc = db[COLLECTION].find_one({"_id": key}, {"ids": 1})
        ids = list(doc["ids"]) if doc else []
        _CACHE[key] = ids
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return ids


def take(db: Database[dict[str, Any]], batch_id: ObjectId, k: int, seen: dict | None = None) -> list[ObjectId]:
    """Up to ``k`` task ids from the head of the batch's queue (fewer at a chunk's end;
    ``[]`` once everything written so far was handed out). ``seen``: the batch document as
    just read (its ``cursor`` and ``chunks``), saving the first read."""
    for _ in range(100):  # each round either takes, moves past an empty chunk, or lost a race
        b, seen = seen or db[BATCHES].find_one({"_id": batch_id}, {"cursor": 1, "chunks": 1}), None
        if b is None or "cursor" not in b:
            return []
        c, o = b["cursor"]["c"], b["cursor"]["o"]
        if c >= (b.get("chunks") or 0):
            return []
        ids = _chunk(db, batch_id, c)
        got = ids[o : o + k]
        end = o + len(got)
        new = {"c": c + 1, "o": 0} if end >= len(ids) else {"c": c, "o": end}
        r = db[BATCHES].update_one({"_id": batch_id, "cursor.c": c, "cursor.o": o}, {"$set": {"cursor": new}})
        if r.modified_count == 1 and got:
            return got
    return []


def dispatch(db: Database[dict[str, Any]], pool: Any, batch: dict, k: int, fresh: bool = False) -> list[ObjectId]:
    """Take up to ``k`` tasks of ``batch`` that still need a message and mark them
    dispatched (``published_at`` set, conditioned on their status and on their having
    none); the caller sends their messages. Tasks that finished meanwhile, or that another
    batch sent already, are passed over. ``fresh``: ``batch`` was just read from Mongo (its
    cursor is used for the first take instead of reading it again)."""
    status = batch.get("before_status") or st.WAITING
    out: list[ObjectId] = []
    seen: dict | None = batch if fresh and "cursor" in batch else None  # just read: no need to read it again
    while len(out) < k:
        ids = take(db, batch["_id"], k - len(out), seen)
        seen = None
        if not ids:
            break
        now = utcnow()
        for i in ids:
            r = pool.update_one({"_id": i, "status": status, "published_at": None}, {"$set": {"published_at": now}})
            if r.modified_count == 1:
                out.append(i)
    return out


def in_flight(pool: Any, batch: dict) -> int:
    """Tasks of the batch with a message on the broker or a worker on them."""
    status = batch.get("before_status") or st.WAITING
    sent = pool.count_documents({"batch_ids": batch["_id"], "status": status, "published_at": {"$gt": RESEND}})
    return int(sent) + int(pool.count_documents({"batch_ids": batch["_id"], "status": st.RUNNING}))


def window_for(settings: Any, queue: str) -> int:
    """How many messages a batch on ``queue`` keeps on the broker."""
    if settings.dispatch_window:
        return int(settings.dispatch_window)
    from .presence import processes_serving

    return max(MIN_WINDOW, PER_PROCESS * processes_serving(settings, queue))


def exhausted(batch: dict) -> bool:
    """Whether everything the producer wrote so far was handed out."""
    cur = batch.get("cursor") or {"c": 0}
    return int(cur["c"]) >= int(batch.get("chunks") or 0)
