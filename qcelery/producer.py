"""Producer: turn task definitions into a batch and one Celery chord.

``enqueue`` writes the tasks (deduplicated, in bulk) and a batch document to Mongo,
then publishes one ``execute`` message per task that still needs work and an
``aggregate`` body. Messages hold ids only. Tasks already ``done`` are not run again
(Qlib's dedup) but belong to the batch and to its aggregation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from celery.canvas import Signature
from celery.utils import uuid

from . import batch as batches
from . import status as st
from .celery_app import CONTROL_QUEUE, MAX_PRIORITY, QceleryApp, app_for, check_queue_name, wire_priority
from .errors import TaskDefinitionError, TaskTypeError
from .manage import TaskManager, to_object_id
from .qlib_bridge import check_qlib_init
from .settings import Settings, load_settings
from .worker import AGGREGATE, EXECUTE, resolve

logger = logging.getLogger(__name__)


#: messages buffered per Redis pipeline round trip while publishing (kombu's publish batch)
PUBLISH_BATCH = 1000


def _send_execute(
    app: QceleryApp, producer: Any, pool: str, task_id: Any, batch_id: Any, queue: str, priority: int, **chord_part: Any
) -> None:
    """Publish one id-only ``execute`` message through ``producer``.

    ``app.send_task`` builds the same protocol-2 message a signature's ``apply_async``
    does, without the canvas work (cloning and freezing a signature per task), which was
    most of the cost of a large header."""
    args = (pool, str(task_id), str(batch_id) if batch_id else None)
    # the message's argsrepr (shown by Flower): three short strings need no saferepr
    app.send_task(
        EXECUTE,
        args=args,
        argsrepr=repr(args),
        kwargsrepr="{}",
        queue=queue,
        priority=wire_priority(app, priority),
        ignore_result=True,
        producer=producer,
        add_to_parent=False,
        **chord_part,
    )


def _publish_chord(app: QceleryApp, pool: str, task_ids: list, batch_id: Any, queue: str, priority: int, body: Signature) -> None:
    """Publish a chord: one ``execute`` message per task, then ``body`` once all have run.

    This is what ``chord(header)(body)`` sends on a Redis result backend, built for a
    header of thousands of tasks: the chord size goes to the backend first, then every
    header message carries the group id, its index and the body, and the messages go out
    through one producer in kombu publish batches (a Redis pipeline per
    ``PUBLISH_BATCH`` messages; AMQP publishes each at once, without waiting for the
    broker). 10,000 messages take about 3 s on Redis instead of 11 (bench/RESULTS.md, Publish)."""
    group_id = uuid()
    body.freeze(group_id=group_id)
    app.backend.set_chord_size(group_id, len(task_ids))
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
        for index, task_id in enumerate(task_ids):
            _send_execute(app, producer, pool, task_id, batch_id, queue, priority, group_id=group_id, group_index=index, chord=body)


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
    qlib_init: dict | None = None,
    before_status: str = st.WAITING,
    after_status: str = st.DONE,
    app: QceleryApp | None = None,
) -> str:
    """Create ``task_defs`` in ``pool`` and run them on the workers of ``queue``.

    ``aggregate`` names the batch collector: a dotted function path or
    ``{"func": path, "kwargs": {...}}``, called once when every task is final; ``None``
    keeps the built-in summary. ``task_func`` (dotted path; default ``settings.task_func``)
    is called as ``task_func(def, **task_kwargs)``. ``qlib_init`` (a workflow's
    ``qlib_init:``, the keyword arguments of ``qlib.init``) travels with the batch: each
    worker process initialises Qlib with it once before its first task of the batch
    (:func:`qcelery.qlib_bridge.ensure_qlib_init`). For a second phase pass
    ``before_status="part_done"``. Returns the batch id at once.
    """
    settings = settings or load_settings()
    queue = check_queue_name(queue or settings.default_queue)
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        raise TaskDefinitionError(f"priority must be an int from 0 to {MAX_PRIORITY}, got {priority!r}")
    if before_status not in st.CLAIMABLE:
        raise TaskDefinitionError(f"before_status must be one of {st.CLAIMABLE}, got {before_status!r}")
    if after_status not in (st.DONE, st.PART_DONE):
        raise TaskDefinitionError(f"after_status must be 'done' or 'part_done', got {after_status!r}")
    if task_kwargs is not None and not isinstance(task_kwargs, dict):
        raise TaskTypeError(f"task_kwargs must be a dict of JSON values, got {type(task_kwargs).__name__}")
    func = task_func or settings.task_func
    resolve(func, settings.allowed_modules)  # fail now, naming the function, rather than on every worker
    if isinstance(aggregate, str):
        aggregate = {"func": aggregate, "kwargs": {}}
    if aggregate is not None:
        if not isinstance(aggregate, dict) or not isinstance(aggregate.get("func"), str):
            raise TaskTypeError(f"aggregate must be a dotted path or {{'func': path, 'kwargs': {{...}}}}, got {aggregate!r}")
        resolve(aggregate["func"], settings.allowed_modules, what="aggregate function")
    if qlib_init is not None:
        qlib_init = check_qlib_init(qlib_init, settings.allowed_modules, where=f"batch for pool {pool!r}")

    tm = TaskManager(pool, settings)
    doc, inserted = batches.create(
        tm,
        task_defs,
        queue=queue,
        task_func=func,
        task_kwargs=task_kwargs,
        before_status=before_status,
        after_status=after_status,
        aggregate=aggregate,
        priority=priority,
        qlib_init=qlib_init,
    )
    app = app or app_for(settings)
    if before_status == st.WAITING and len(inserted) == doc["n_tasks"]:
        todo = doc["task_ids"]  # all new: no need to ask Mongo which are waiting
    else:
        todo = [d["_id"] for d in tm.task_pool.find({"batch_ids": doc["_id"], "status": before_status}, {"_id": 1})]
    body = app.signature(AGGREGATE, args=(pool, str(doc["_id"])), queue=CONTROL_QUEUE, immutable=True, ignore_result=True)
    if todo:
        _publish_chord(app, pool, todo, doc["_id"], queue, priority, body)
    else:
        body.apply_async()
    tm.mark_published([i for i in todo if i not in inserted])
    logger.info("batch %s: %d tasks (%d to run) published to queue %s", doc["_id"], doc["n_tasks"], len(todo), queue)
    return str(doc["_id"])


def publish(
    app: QceleryApp, pool: str, task_ids: Iterable[Any], *, batch_id: Any = None, queue: str | None = None, priority: int | None = None
) -> int:
    """Publish ``execute`` messages for ``task_ids`` again (recovery, sweep, retries).

    Each task goes to its batch's queue (its latest batch when it has several)."""
    ids = [to_object_id(i) for i in task_ids]
    if not ids:
        return 0
    tm = TaskManager.open(pool, app.qcelery_settings)
    by_batch: dict[Any, dict] = {}
    sent = 0
    docs = [
        d
        for start in range(0, len(ids), 100)
        for d in tm.task_pool.find({"_id": {"$in": ids[start : start + 100]}}, {"batch_ids": 1, "priority": 1})
    ]
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
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
            _send_execute(app, producer, pool, d["_id"], bid, q, prio)
            sent += 1
    tm.mark_published(ids)
    return sent
