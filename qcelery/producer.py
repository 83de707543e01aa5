"""Producer: stream task definitions into a batch and send its Celery chord.

``enqueue`` writes the tasks to Mongo chunk by chunk (deduplicated, in bulk; each chunk's
ids to run queued in the batch, :mod:`qcelery.dispatch`) and publishes the batch's chord:
a header of one window of ``execute`` messages, which hand their places on to the batch's
next tasks as they end, and an ``aggregate`` body. Messages hold ids only. Tasks already
``done`` are not run again (Qlib's dedup) but belong to the batch and to its aggregation.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from celery.canvas import Signature
from celery.utils import uuid

from . import batch as batches
from . import dispatch
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


def _publish_slots(app: QceleryApp, pool: str, task_ids: list, batch_id: Any, queue: str, priority: int, body: Signature) -> None:
    """Publish the batch's chord: one ``execute`` message per id of the first window, then
    ``body`` once all of them have run. Each header message hands its place on to the
    batch's next task when it ends (:mod:`qcelery.dispatch`), so the header is the window,
    not the batch.

    This is what ``chord(header)(body)`` sends on a Redis result backend, built for a big
    header: the chord size goes to the backend first, then every header message carries
    the group id, its index and the body, and the messages go out through one producer in
    kombu publish batches (a Redis pipeline per ``PUBLISH_BATCH`` messages)."""
    group_id = uuid()
    body.freeze(group_id=group_id)
    app.backend.set_chord_size(group_id, len(task_ids))
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
        for index, task_id in enumerate(task_ids):
            _send_execute(app, producer, pool, task_id, batch_id, queue, priority, group_id=group_id, group_index=index, chord=body)


def send_plain(app: QceleryApp, pool: str, task_ids: Iterable[Any], batch_id: Any, queue: str, priority: int) -> int:
    """``execute`` messages outside the chord for tasks already marked dispatched."""
    n = 0
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
        for task_id in task_ids:
            _send_execute(app, producer, pool, task_id, batch_id, queue, priority)
            n += 1
    return n


def top_up(app: QceleryApp, tm: TaskManager, batch: dict) -> int:
    """Send the batch's next tasks, as messages outside its chord, while fewer than its
    window are in flight (a producer still streaming; beat, after workers joined or a
    chain of messages was lost); the number sent."""
    want = int(batch.get("window") or dispatch.MIN_WINDOW) - dispatch.in_flight(tm.task_pool, batch)
    if want <= 0:
        return 0
    ids = dispatch.dispatch(tm.db, tm.task_pool, batch, want)
    return send_plain(app, tm.name, ids, batch["_id"], batch["queue"], int(batch.get("priority") or 0)) if ids else 0


#: tasks per producer chunk: what the producer holds at once, and one chunk document
CHUNK = 1000


def _batch_key(pool: str, spec: dict, first: list[dict]) -> str:
    """What identifies a producer's input: the batch's settings and its first chunk's tasks.
    The same call run again (after an interruption) finds the batch it left ``creating``."""
    from .canonical import canonical_json, filter_hash, hash_text, normalize

    return hash_text(canonical_json({"pool": pool, **spec, "first": [filter_hash(normalize(t)) for t in first]}))


def _chunks(task_defs: Iterable[dict], size: int) -> Iterator[list[dict]]:
    it = iter(task_defs)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def enqueue(
    task_defs: Iterable[dict],
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
    batch_key: str | None = None,
    chunk_size: int = CHUNK,
) -> str:
    """Create ``task_defs`` in ``pool`` and run them on the workers of ``queue``.

    ``task_defs`` is a list or any iterable: a generator streams, the producer holding one
    chunk of ``chunk_size`` tasks at a time whatever the batch's size. A list is checked
    whole before anything is written; a stream chunk by chunk, so a bad definition far into
    it stops the enqueue there, naming its position, with the batch left ``creating``.
    An enqueue interrupted half-way (an error, Ctrl-C, a crash) is completed by running it
    again with the same input: the batch is found by ``batch_key`` (default: a hash of the
    pool, the batch's settings and the first chunk's tasks), its written chunks are skipped
    and nothing is created twice. Workers start on the first chunk while the rest is
    written; the broker holds the batch's window, not the batch (:mod:`qcelery.dispatch`).

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
    app = app or app_for(settings)
    spec: dict[str, Any] = {
        "queue": queue,
        "task_func": func,
        "task_kwargs": task_kwargs,
        "before_status": before_status,
        "after_status": after_status,
        "aggregate": aggregate,
        "priority": priority,
        "qlib_init": qlib_init,
    }
    is_list = isinstance(task_defs, Sequence) and not isinstance(task_defs, (str, bytes))
    if is_list:
        tm.check_defs(task_defs)  # a list: all of it checked before the first write
    chunks = _chunks(task_defs, chunk_size)
    first = next(chunks, [])
    if not first:
        raise TaskDefinitionError(f"no task definitions to enqueue in pool {pool!r}")
    # a pool empty before this batch holds only what this producer wrote: no need to ask,
    # chunk by chunk, which of its tasks exist (the unique index catches repeats)
    fresh_pool = tm.task_pool.find_one({}, {"_id": 1}) is None
    key = batch_key or _batch_key(pool, spec, first)
    doc, resumed = batches.begin(tm, key=key, window=dispatch.window_for(settings, queue), **spec)
    bid = doc["_id"]
    if resumed:
        logger.warning("batch %s: resuming its creation at chunk %d (%d tasks so far)", bid, doc["chunks"], doc["n_tasks"])
    body = app.signature(AGGREGATE, args=(pool, str(bid)), queue=CONTROL_QUEUE, immutable=True, ignore_result=True)
    chord_sent = resumed  # a resumed batch's chord went out before the interruption
    slots: list = []  # the chord's header: the first window of tasks, sent once it is full
    for n, part in enumerate(itertools.chain([first], chunks)):
        if n < doc["chunks"]:
            continue  # written before the interruption
        # (a stream's chunk is checked whole by create_tasks before its first write)
        queued, _ = batches.add_chunk(tm, doc, n, part, index_base=n * chunk_size, look_up=not fresh_pool)
        if not queued:
            continue
        if chord_sent:
            top_up(app, tm, doc)
            continue
        slots += dispatch.dispatch(tm.db, tm.task_pool, doc, int(doc["window"]) - len(slots))
        if len(slots) >= int(doc["window"]):
            _publish_slots(app, pool, slots, bid, queue, priority, body)
            chord_sent = True
    if slots and not chord_sent:
        _publish_slots(app, pool, slots, bid, queue, priority, body)
        chord_sent = True
    if resumed:
        top_up(app, tm, doc)  # its chord's messages may have ended meanwhile
    doc = batches.finish(tm, doc, resumed)
    if not chord_sent or batches.outstanding(tm, doc) == 0:
        # nothing to run (all done already), or it all ran while the batch was being
        # created (the aggregation then found it still creating): aggregate now
        body.apply_async()
    logger.info("batch %s: %d tasks in %d chunks, queue %s, window %d", bid, doc["n_tasks"], doc["chunks"], queue, doc["window"])
    return str(bid)


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
            if priority is None:  # a task prioritized above its batch keeps its own
                prio = max(int(prio or 0), int(d.get("priority") or 0))
            prio = max(0, min(MAX_PRIORITY, int(prio if prio is not None else d.get("priority") or 0)))
            _send_execute(app, producer, pool, d["_id"], bid, q, prio)
            sent += 1
    tm.mark_published(ids)
    return sent
