"""Producer: turn task definitions into a batch and one Celery chord.

``enqueue`` writes the tasks (deduplicated, in bulk) and a batch document to Mongo,
then publishes one ``execute`` message per task that still needs work and an
``aggregate`` body. Messages hold ids only. Tasks already ``done`` are not run again
(Qlib's dedup) but belong to the batch and to its aggregation.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from celery import Celery, chord
from celery.canvas import Signature

from . import batch as batches
from . import status as st
from .celery_app import CONTROL_QUEUE, MAX_PRIORITY, app_for
from .errors import TaskDefinitionError, TaskTypeError
from .manage import TaskManager, to_object_id
from .settings import Settings, load_settings
from .worker import AGGREGATE, EXECUTE, resolve

logger = logging.getLogger(__name__)


def _execute_sig(app: Celery, pool: str, task_id: Any, batch_id: Any, queue: str, priority: int) -> Signature:
    return app.signature(EXECUTE, args=(pool, str(task_id), str(batch_id) if batch_id else None),
                         queue=queue, priority=priority, immutable=True, ignore_result=True)


def enqueue(
    task_defs: list[dict],
    pool: str,
    *,
    settings: Settings | None = None,
    queue: str | None = None,
    priority: int = 0,
    aggregate: dict | str | None = None,
    task_func: str | None = None,
    task_kwargs: dict | None = None,
    before_status: str = st.WAITING,
    after_status: str = st.DONE,
    app: Celery | None = None,
) -> str:
    """Create ``task_defs`` in ``pool`` and run them on the workers of ``queue``.

    ``aggregate`` names the batch collector: a dotted function path or
    ``{"func": path, "kwargs": {...}}``, called once when every task is final; ``None``
    keeps the built-in summary. ``task_func`` (dotted path; default ``settings.task_func``)
    is called as ``task_func(def, **task_kwargs)``. For a second phase pass
    ``before_status="part_done"``. Returns the batch id at once.
    """
    settings = settings or load_settings()
    queue = queue or settings.default_queue
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        raise TaskDefinitionError(f"priority must be an int from 0 to {MAX_PRIORITY}, got {priority!r}")
    if before_status not in st.CLAIMABLE:
        raise TaskDefinitionError(f"before_status must be one of {st.CLAIMABLE}, got {before_status!r}")
    if after_status not in (st.DONE, st.PART_DONE):
        raise TaskDefinitionError(f"after_status must be 'done' or 'part_done', got {after_status!r}")
    if task_kwargs is not None and not isinstance(task_kwargs, dict):
        raise TaskTypeError(f"task_kwargs must be a dict of JSON values, got {type(task_kwargs).__name__}")
    func = task_func or settings.task_func
    resolve(func)  # fail now, naming the function, rather than on every worker
    if isinstance(aggregate, str):
        aggregate = {"func": aggregate, "kwargs": {}}
    if aggregate is not None:
        if not isinstance(aggregate, dict) or not isinstance(aggregate.get("func"), str):
            raise TaskTypeError(f"aggregate must be a dotted path or {{'func': path, 'kwargs': {{...}}}}, got {aggregate!r}")
        resolve(aggregate["func"])

    tm = TaskManager(pool, settings)
    doc, inserted = batches.create(tm, task_defs, queue=queue, task_func=func, task_kwargs=task_kwargs,
                                   before_status=before_status, after_status=after_status,
                                   aggregate=aggregate, priority=priority)
    app = app or app_for(settings)
    if before_status == st.WAITING and len(inserted) == doc["n_tasks"]:
        todo = doc["task_ids"]  # all new: no need to ask Mongo which are waiting
    else:
        todo = [d["_id"] for d in tm.task_pool.find({"batch_ids": doc["_id"], "status": before_status}, {"_id": 1})]
    header = [_execute_sig(app, pool, i, doc["_id"], queue, priority) for i in todo]
    body = app.signature(AGGREGATE, args=(pool, str(doc["_id"])), queue=CONTROL_QUEUE, immutable=True,
                         ignore_result=True)
    if header:
        _release(app, chord(header)(body))
    else:
        body.apply_async()
    tm.mark_published([i for i in todo if i not in inserted])
    logger.info("batch %s: %d tasks (%d to run) published to queue %s", doc["_id"], doc["n_tasks"], len(todo), queue)
    return str(doc["_id"])


def _release(app: Celery, result: Any) -> None:
    """Unsubscribe from the chord's results. Building the header's ``GroupResult``
    subscribes the Redis backend's result consumer to every header task; the producer
    never waits on them, and left subscribed they are dropped during interpreter
    shutdown, when Redis may no longer be reached (a traceback on exit)."""
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is None:  # a backend without a result consumer subscribes to nothing
        return
    for r in [result, *(getattr(result.parent, "results", None) or [])]:
        consumer.cancel_for(r.id)


def publish(app: Celery, pool: str, task_ids: Iterable[Any], *, batch_id: Any = None, queue: str | None = None,
            priority: int | None = None) -> int:
    """Publish ``execute`` messages for ``task_ids`` again (recovery, sweep, retries).

    Each task goes to its batch's queue (its latest batch when it has several)."""
    ids = [to_object_id(i) for i in task_ids]
    if not ids:
        return 0
    tm = TaskManager(pool, app.qcelery_settings)
    by_batch: dict[Any, dict] = {}
    sent = 0
    docs = [d for start in range(0, len(ids), 100)
            for d in tm.task_pool.find({"_id": {"$in": ids[start:start + 100]}}, {"batch_ids": 1, "priority": 1})]
    for d in docs:
        bid = batch_id or (d.get("batch_ids") or [None])[-1]
        q, prio = queue, priority
        if bid is not None and (q is None or prio is None):
            if bid not in by_batch:
                b = tm.db[batches.COLLECTION].find_one({"_id": to_object_id(bid)}, {"queue": 1, "priority": 1})
                by_batch[bid] = b or {}
            q = q or by_batch[bid].get("queue")
            prio = prio if prio is not None else by_batch[bid].get("priority", 0)
        q = q or app.qcelery_settings.default_queue
        prio = max(0, min(MAX_PRIORITY, int(prio if prio is not None else d.get("priority") or 0)))
        _execute_sig(app, pool, d["_id"], bid, q, prio).apply_async()
        sent += 1
    tm.mark_published(ids)
    return sent
