"""Worker tasks: ``execute`` one task of a pool, ``aggregate`` a batch.

``execute(pool, task_id, batch_id)`` claims the task by id (one atomic update), keeps
its lease alive from a heartbeat thread, runs the batch's task function and commits,
fenced on the attempt it claimed. A message for a task that is not claimable (done,
running under a live lease, removed) is acknowledged and does nothing, so duplicated
or late messages never change a result. Failures are recorded in Mongo and retried
through the pool's ``attempt``/``max_attempts`` (never Celery's retry), so the task
function never raises out of ``execute`` and the chord is not broken by it.

``celery -A qcelery.worker worker`` finds the module-level ``app`` (settings from the
environment); ``qcelery worker --pool P`` does the same with the pool's options.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from . import batch as batches
from . import dispatch
from . import status as st
from .errors import ConfigError, DecodeError, PermanentTaskError, ResultEncodeError, TaskDefinitionError, TaskNotFoundError
from .instance import allowed_imports, check_task_names
from .lease import LeaseKeeper
from .manage import Heartbeat, TaskManager, format_exception, to_object_id, worker_name
from .qlib_bridge import ensure_qlib_init
from .serial import admit_import
from .settings import Settings

if TYPE_CHECKING:
    from .celery_app import QceleryApp

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

EXECUTE = "qcelery.execute"
AGGREGATE = "qcelery.aggregate"

_MANAGERS: dict[tuple[int, str], TaskManager] = {}


def manager(app: QceleryApp, pool: str) -> TaskManager:
    """This worker's ``TaskManager`` for ``pool`` (one per app and pool)."""
    key = (id(app), pool)
    tm = _MANAGERS.get(key)
    if tm is None:
        # open, never create: a message naming a collection qcelery does not know must not
        # make it a pool (no collection, no index); UnknownPoolError instead
        tm = _MANAGERS[key] = TaskManager.open(pool, app.qcelery_settings)
    return tm


def resolve(path: str, allowed_modules: Iterable[str] = (), what: str = "task function") -> Callable:
    """The callable named ``module.attr`` (or ``module:attr``), if the allow-list (the
    defaults plus ``allowed_modules``) admits it: a batch document is data, and must not
    name ``os.system`` (:class:`~qcelery.errors.ModuleNotAllowedError` otherwise)."""
    if isinstance(allowed_modules, str):
        allowed_modules = [allowed_modules]  # let the allow-list refuse it with its own message
    return _resolve(path, tuple(allowed_modules), what)


@functools.lru_cache(maxsize=64)
def _resolve(path: Any, allowed_modules: tuple[str, ...], what: str) -> Callable:
    if not isinstance(path, str):
        raise ConfigError(f"{what} {path!r} must be a dotted path like 'package.module.function'")
    module, sep, attr = path.replace(":", ".").rpartition(".")
    if not sep or not module:
        raise ConfigError(f"{what} {path!r} must be a dotted path like 'package.module.function'")
    try:
        func: Callable = admit_import(module, attr, allowed_modules, what=f"{what} {path!r}:")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{what} {path!r} cannot be imported: {exc}") from None
    return func


@functools.lru_cache(maxsize=64)
def _accepts(func: Callable) -> frozenset[str]:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return frozenset({"*"})
    return frozenset(p.name for p in params)


def call_task_function(func: Callable, param: Any, kwargs: dict, context: dict) -> Any:
    """``func(param, **kwargs)`` plus ``settings``/``tags`` when ``func`` takes them."""
    accepted = _accepts(func)
    extra = {k: v for k, v in context.items() if k in accepted and k not in kwargs}
    return func(param, **kwargs, **extra)


_BATCHES: dict[tuple[int, Any], dict] = {}


def _batch_spec(app: QceleryApp, tm: TaskManager, batch_id: Any) -> dict:
    """The immutable part of a batch (function, kwargs, statuses), cached per process."""
    key = (id(app), batch_id)
    if key not in _BATCHES:
        doc = batches.load(tm.db, batch_id)
        _BATCHES[key] = {k: doc.get(k) for k in ("task_func", "task_kwargs", "qlib_init", "before_status", "after_status")}
    return _BATCHES[key]


def execute_task(
    app: QceleryApp, pool: str, task_id: str, batch_id: str | None = None, before_status: str = st.WAITING, after_status: str = st.DONE
) -> dict:
    """Claim, run and commit one task; every way it can go wrong ends in Mongo.

    A failure the task could get past on another try (its function raised, the worker
    was short of something) sends it back to be claimed again while attempts remain. A
    failure no retry can mend ends it ``failed`` at once, with the reason, and nothing
    of the task runs again: a definition or batch naming a module outside the
    allow-list (checked before anything is built), a ``def`` that cannot be decoded, a
    result that cannot be pickled, a document whose own fields are corrupt."""
    settings: Settings = app.qcelery_settings
    tm = manager(app, pool)
    spec = _batch_spec(app, tm, batch_id) if batch_id else {}
    before_status = spec.get("before_status") or before_status
    after_status = spec.get("after_status") or after_status
    try:
        task = tm.claim(task_id, worker=worker_name(), before_status=before_status, decode=False)
    except OperationFailure as exc:
        # the server refused the claim's own update ($inc of an 'attempt' that is no number):
        # left as it is, the sweep would publish this task again and again
        refusal = str(exc)
        if not _outlast_outage(lambda: tm.fail_unclaimable(task_id, before_status, refusal), settings, f"task {task_id}: failing")[0]:
            raise
        logger.warning("task %s of pool %s: document corrupt (%s); failed", task_id, pool, refusal)
        return {"task_id": str(task_id), "status": st.FAILED}
    if task is None:
        logger.info("task %s of pool %s not claimable from %s; message ignored", task_id, pool, before_status)
        return {"task_id": str(task_id), "status": "skipped"}
    allowed = settings.allowed_modules
    preparing = True
    try:
        task = tm._decode_task(task)
        check_task_names(task["def"], allowed, load=True, where=f"task {task_id} in pool {pool!r}")
        func = resolve(spec.get("task_func") or settings.task_func, allowed)
        if spec.get("qlib_init"):  # once per process and config: see qcelery.qlib_bridge
            ensure_qlib_init(spec["qlib_init"], allowed, where=f"batch {batch_id} of pool {pool!r}")
        preparing = False
        param = task["def"] if before_status == st.WAITING else task["res"]
        context = {
            "settings": settings,
            "tags": {"pool": pool, "task_id": str(task["_id"]), "batch_id": str(batch_id or ""), "attempt": str(task["attempt"])},
        }
        with Heartbeat(tm, task) as hb, allowed_imports(allowed):
            res = call_task_function(func, param, dict(spec.get("task_kwargs") or {}), context)
    except (Exception, SoftTimeLimitExceeded) as exc:  # noqa: BLE001 - whatever the task function raises is its failure, traceback stored
        return _record_failure(app, tm, task, batch_id, exc, _is_permanent(exc, preparing))
    try:
        committed = not hb.lost.is_set() and _commit(tm, task, res, after_status, settings)
    except ResultEncodeError as exc:
        return _record_failure(app, tm, task, batch_id, exc, permanent=True)
    if not committed:
        logger.warning("task %s of pool %s: lease lost during the run; result dropped", task_id, pool)
        _mark_superseded(res, task)
        return {"task_id": str(task_id), "status": "lease-lost"}
    return {"task_id": str(task_id), "status": after_status}


#: tag on the MLflow run of a run whose result was not committed
SUPERSEDED_TAG = "qcelery.superseded"


def _mark_superseded(res: Any, task: dict) -> None:
    """A run that lost its lease (cut off, taken over) keeps no result; its MLflow run, if
    the result is one, is ended ``KILLED`` and tagged, so MLflow shows one ``FINISHED`` run
    per task: the committed one. Best effort: MLflow may be as unreachable as Mongo was."""
    from mlflow.exceptions import MlflowException

    from .exp import Recorder

    if not isinstance(res, Recorder):
        return
    try:
        res.set_tags(**{SUPERSEDED_TAG: f"attempt {task['attempt']} lost its lease; another attempt's result was committed"})
        res.end_run("KILLED")
    except (MlflowException, OSError) as exc:  # MLflow away too (requests' errors are OSErrors): logged, the task is settled
        logger.warning("task %s: could not mark MLflow run %s as superseded: %s", task["_id"], res.id, exc)


def _is_permanent(exc: BaseException, preparing: bool) -> bool:
    """Whether another attempt is bound to fail the same way: a refusal, a corrupt
    document, or a stored ``def``/``res`` that does not decode (unless the store was
    unreachable while reading it)."""
    if isinstance(exc, PermanentTaskError):
        return True
    return preparing and isinstance(exc, DecodeError) and not isinstance(exc.__cause__, PyMongoError)


def _record_failure(app: QceleryApp, tm: TaskManager, task: dict, batch_id: Any, exc: BaseException, permanent: bool) -> dict:
    """Record ``exc`` on the claimed ``task``: ``failed`` at once when ``permanent``, else
    back for another attempt (re-published) while attempts remain."""
    settings: Settings = app.qcelery_settings
    # a refusal's traceback says nothing its message does not; a raising task's does
    error = f"{type(exc).__name__}: {exc}" if isinstance(exc, PermanentTaskError) else format_exception(exc)
    if isinstance(exc, SoftTimeLimitExceeded):  # its own text is only "SoftTimeLimitExceeded()"; status shows the last line
        error += "soft time limit exceeded: the task ran past soft_time_limit (the setting, or its worker pool's own limit)\n"
    new, _ = _outlast_outage(lambda: tm.fail(task, error, permanent=permanent), settings, f"task {task['_id']}: recording the failure")
    logger.warning(
        "task %s of pool %s raised %s (attempt %s): now %s%s",
        task["_id"],
        tm.name,
        type(exc).__name__,
        task.get("attempt"),
        new,
        f" ({str(exc).splitlines()[0] if str(exc) else ''})" if permanent else "",
    )
    if new not in (None, st.FAILED):
        # to be run again: the message that ran it sends it (execute's hand-on)
        return {"task_id": str(task["_id"]), "status": new, "again": True}
    return {"task_id": str(task["_id"]), "status": new or "lease-lost"}


def _outlast_outage(op: Callable[[], _T], settings: Settings, what: str) -> tuple[_T, bool]:
    """``op()`` retried while Mongo is unreachable, for up to one lease; returns its value
    and whether it had to be retried. A result computed across a short outage (a restart,
    a failover) is kept instead of run again; the writes are fenced on the attempt, so
    repeating one is safe, and past the lease beat may have handed the task out again."""
    deadline = time.monotonic() + settings.lease_seconds
    retried = False
    while True:
        try:
            return op(), retried
        except ConnectionFailure as exc:
            if time.monotonic() >= deadline:
                raise
            logger.warning("%s: store unreachable (%s); retrying", what, type(exc).__name__)
            retried = True
            time.sleep(min(0.5, settings.heartbeat_seconds))


def _commit(tm: TaskManager, task: dict, res: Any, status: str, settings: Settings) -> bool:
    ok, retried = _outlast_outage(lambda: tm.commit(task, res, status), settings, f"task {task['_id']}: commit")
    if not ok and retried:
        # the write may have landed with its reply lost: then the task is ours and final
        doc = _outlast_outage(lambda: tm.get_raw(task["_id"], ["status", "attempt"]), settings, "commit check")[0]
        ok = doc is not None and doc["status"] == status and doc["attempt"] == task["attempt"]
        if ok:  # the landed write's count move was not made (commit saw it refused)
            tm._count_move(task.get("batch_ids"), st.RUNNING, status)
    return ok


def aggregate_batch(app: QceleryApp, pool: str, batch_id: str) -> dict:
    """Run the batch's aggregation once every task is final; else check again later.

    The aggregation is taken under a lease (:func:`qcelery.batch.begin_aggregation`) that
    a heartbeat thread renews while the collector runs, however long it takes; beat
    reopens it only once the renewals stop (this process killed or cut off from Mongo).
    A run whose lease was taken over drops its summary: the finish is fenced on the run."""
    settings: Settings = app.qcelery_settings
    tm = manager(app, pool)
    bid = to_object_id(batch_id)
    doc = batches.load(tm.db, bid)
    if doc["state"] != batches.OPEN:
        return {"batch_id": str(bid), "state": doc["state"]}
    # the counters say when to look (one read), a real count decides (see qcelery.batch)
    left = batches.outstanding(tm, doc)
    if left:
        left = batches.outstanding(tm, doc, batches.watched_progress(tm, doc))
    if not left:
        left = batches.verified_outstanding(tm, doc)
    if left:
        if batches.schedule_check(tm.db, bid, settings.aggregate_countdown):
            app.send_task(AGGREGATE, args=(pool, str(bid)), queue=_control_queue(), countdown=settings.aggregate_countdown)
        return {"batch_id": str(bid), "state": "waiting", "outstanding": left}
    taken = batches.begin_aggregation(tm.db, bid, worker_name(), settings.lease_seconds)
    if taken is None:
        return {"batch_id": str(bid), "state": "taken"}
    run = taken["aggregate_runs"]
    lease = LeaseKeeper(
        lambda: batches.renew_aggregation(tm.db, bid, run, settings.lease_seconds),
        settings.heartbeat_seconds,
        f"aggregation run {run} of batch {bid}",
    )
    with lease:
        try:
            summary = run_aggregation(tm, taken)
        except Exception as exc:
            # a collector that raises would raise again: record it once rather than loop
            logger.exception("batch %s: aggregation raised", bid)
            summary = {**default_summary(tm, taken), "aggregate_error": format_exception(exc)}
    if lease.lost.is_set() or not _finish_aggregation(tm, bid, run, summary, settings):
        logger.warning("batch %s: aggregation run %s was taken over (lease lost); its summary is dropped", bid, run)
        return {"batch_id": str(bid), "state": "lease-lost"}
    dispatch.drop_chunks(tm.db, bid)  # its queue was handed out long ago
    return {"batch_id": str(bid), "state": batches.AGGREGATED}


def _finish_aggregation(tm: TaskManager, bid: Any, run: int, summary: dict, settings: Settings) -> bool:
    """Store the summary of run ``run``, waiting out a short Mongo outage (a summary that
    took long to compute is kept rather than computed again; the write is fenced on the
    run, so repeating it is safe)."""
    ok, retried = _outlast_outage(lambda: batches.finish_aggregation(tm.db, bid, run, summary), settings, f"batch {bid}: summary")
    if not ok and retried:
        # the write may have landed with its reply lost: then the batch is aggregated by this run
        doc = _outlast_outage(
            lambda: tm.db[batches.COLLECTION].find_one({"_id": bid}, {"state": 1, "aggregate_runs": 1}),
            settings,
            f"batch {bid}: summary check",
        )[0]
        ok = doc is not None and doc["state"] == batches.AGGREGATED and doc["aggregate_runs"] == run
    return ok


def run_aggregation(tm: TaskManager, batch: dict) -> dict:
    """The batch's collector: the one named in its ``aggregate`` spec, else a summary of
    counts, durations and failures."""
    spec = batch.get("aggregate") or {}
    base = default_summary(tm, batch)
    if spec.get("func"):
        func = resolve(spec["func"], tm.settings.allowed_modules, what="aggregate function")
        extra = call_task_function(func, tm, dict(spec.get("kwargs") or {}), {"settings": tm.settings, "batch": batch, "summary": base})
        if isinstance(extra, dict):
            base.update(extra)
    return base


def default_summary(tm: TaskManager, batch: dict) -> dict:
    """Counts by status, run durations and the first line of each failure (one pass over
    the batch's tasks, which counts them for real as well)."""
    stat: dict[str, int] = {}
    durations, failures = [], []
    for d in tm.task_pool.find({"batch_ids": batch["_id"]}, {"status": 1, "started_at": 1, "finished_at": 1, "error": 1}):
        stat[d["status"]] = stat.get(d["status"], 0) + 1
        if d.get("started_at") and d.get("finished_at") and d["finished_at"] >= d["started_at"]:
            durations.append((d["finished_at"] - d["started_at"]).total_seconds())
        if d["status"] == st.FAILED:
            err = (d.get("error") or "").strip().splitlines()
            failures.append({"task_id": str(d["_id"]), "error": err[-1] if err else ""})
    durations.sort()
    return {
        "counts": stat,
        "n_tasks": batch["n_tasks"],
        "duration_s": {
            "total": round(sum(durations), 3),
            "median": round(durations[len(durations) // 2], 3) if durations else None,
            "max": round(durations[-1], 3) if durations else None,
        },
        "failures": failures,
    }


def _control_queue() -> str:
    from .celery_app import CONTROL_QUEUE

    return CONTROL_QUEUE


def _aggregate_if_last(app: QceleryApp, pool: str, batch_id: str) -> None:
    """After a task that ran from a message outside its batch's chord (re-published by
    recovery, the sweep or an admin command), send the batch's aggregation if nothing of
    it is left to do. The chord cannot fire for such a batch when the part it replaced was
    never counted (its worker killed outright, or cut off from the result backend); beat's
    stalled-batch check would aggregate it, but only a cutoff later. Reading the batch's
    counters after the commit (whose count moved before this read) makes this safe against
    a race: of two tasks finishing at once, the one that reads last sees both done; a
    count lost to a crash is caught by beat's re-check and the aggregation's rule (see
    :mod:`qcelery.batch`). A duplicate aggregation message is harmless (the batch's state
    machine runs the aggregation once)."""
    tm = manager(app, pool)
    doc = batches.load(tm.db, to_object_id(batch_id))
    # a batch whose queue still holds tasks is not finished: no need to count it
    if doc["state"] != batches.OPEN or not dispatch.exhausted(doc):
        return
    left = batches.outstanding(tm, doc)
    if left and dispatch.in_flight(tm.task_pool, doc) == 0:
        # nothing queued, sent or running, yet the counters say some task is left: they
        # may be behind (a move lost to a store outage); one real count decides
        left = batches.verified_outstanding(tm, doc)
    if left == 0:
        logger.info("batch %s: its last task ran outside the chord; aggregation sent", batch_id)
        app.send_task(AGGREGATE, args=(pool, str(batch_id)), queue=_control_queue())


def _hand_on(task: Any, pool: str, batch_id: str, result: dict) -> Any:
    """After a message of a batch ran (or passed over) its task, give its place to the
    batch's next one (:mod:`qcelery.dispatch`): the signature to replace a chord message by
    (it keeps the chord's place, so the header stays one window long), or ``None`` when a
    message outside the chord was sent instead or nothing is left to send.

    A task to be run again (it raised, attempts remain) goes first, by the same message. A
    chord message always hands on; one outside the chord (recovered, swept, a top-up) only
    if it ran its task and the batch has fewer than its window in flight, so re-sent
    messages never make the window grow."""
    app: QceleryApp = task.app
    from .celery_app import wire_priority
    from .producer import send_plain

    tm = manager(app, pool)
    bid = to_object_id(batch_id)
    in_chord = bool(task.request.chord)
    doc = tm.db[batches.COLLECTION].find_one(
        {"_id": bid}, {"queue": 1, "priority": 1, "window": 1, "cursor": 1, "chunks": 1, "before_status": 1, "state": 1}
    )
    if doc is None:
        return None
    queue = doc.get("queue") or app.qcelery_settings.default_queue
    priority = int(doc.get("priority") or 0)
    if result.get("again"):
        ids = [to_object_id(result["task_id"])]
        tm.mark_published(ids)
    else:
        if not in_chord and result["status"] not in (st.DONE, st.PART_DONE, st.FAILED, "lease-lost"):
            return None  # a duplicate or a refusal: the message that holds the place goes on
        if "cursor" not in doc or dispatch.exhausted(doc):
            return None
        if not in_chord and dispatch.in_flight(tm.task_pool, doc) >= int(doc.get("window") or dispatch.MIN_WINDOW):
            return None
        ids = dispatch.dispatch(tm.db, tm.task_pool, doc, 1, fresh=True)
        if not ids:
            return None
    if not in_chord:
        send_plain(app, pool, ids, bid, queue, priority)
        return None
    return app.signature(
        EXECUTE,
        args=(pool, str(ids[0]), str(bid)),
        queue=queue,
        priority=wire_priority(app, priority),
        immutable=True,
        ignore_result=True,
    )


class _Refused(dict):
    """What a task returns for a message naming what does not exist."""


@contextlib.contextmanager
def _refusing(name: str, *args: Any) -> Iterator[_Refused]:
    """Turn a message that names an unknown pool, task or batch (or an id that is no id)
    into one log line and a ``refused`` result instead of a traceback: such a message
    cannot become valid by retrying, and nothing was written for it."""
    refused = _Refused(status="refused")
    try:
        yield refused
    except (TaskNotFoundError, TaskDefinitionError) as exc:
        refused["error"] = str(exc)
        logger.warning("%s%r refused: %s", name, args, exc)


def register(app: QceleryApp) -> None:
    """Register ``execute`` and ``aggregate`` on ``app``."""

    @app.task(name=EXECUTE, bind=True, shared=False, acks_late=True, reject_on_worker_lost=True)
    def execute(
        self, pool: str, task_id: str, batch_id: str | None = None, before_status: str = st.WAITING, after_status: str = st.DONE
    ) -> dict:
        with _refusing(EXECUTE, pool, task_id, batch_id) as refused:
            result = execute_task(self.app, pool, task_id, batch_id, before_status, after_status)
            if not batch_id:
                if result.get("again"):
                    from .producer import publish

                    publish(self.app, pool, [task_id])
                return result
            nxt = _hand_on(self, pool, batch_id, result)
            if nxt is not None:
                self.replace(nxt)  # raises Ignore: this message's place in the chord goes to the next task
            if not self.request.chord and result["status"] in (st.DONE, st.PART_DONE, st.FAILED):
                _aggregate_if_last(self.app, pool, batch_id)
            return result
        return refused

    @app.task(name=AGGREGATE, bind=True, shared=False, acks_late=True)
    def aggregate(self, pool: str, batch_id: str) -> dict:
        with _refusing(AGGREGATE, pool, batch_id) as refused:
            return aggregate_batch(self.app, pool, batch_id)
        return refused


def _module_app() -> QceleryApp:
    from .celery_app import make_app
    from .settings import load_settings

    return make_app(load_settings())


def __getattr__(name: str) -> Any:
    # `celery -A qcelery.worker` asks for `app`; build it (from the environment) only then
    if name in ("app", "celery"):
        globals()["app"] = globals()["celery"] = _module_app()
        return globals()["app"]
    raise AttributeError(name)
