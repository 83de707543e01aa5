"""Trainers that run on Celery workers: :class:`TrainerCelery`, :class:`DelayTrainerCelery`.

``train`` enqueues the tasks as one batch (``qcelery.producer.enqueue``), waits until
every task of the batch is final and returns the recorders in task order, like
Qlib's ``TrainerRM``; the work itself is done by ``qcelery worker`` processes on any
machine. The batch's aggregation (the built-in summary, or the collector passed as
``aggregate``) runs on a worker once the batch is complete; ``last_batch_id`` names it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from . import batch as batches
from . import status as st
from .canonical import filter_hash, normalize
from .errors import ConfigError, TaskTypeError
from .exp import Recorder
from .settings import Settings
from .trainer import TrainerRM, _as_list, _experiment, begin_task_train, end_task_train, task_train


def _dotted(func: Callable | str) -> str:
    """The import path a worker resolves ``func`` by (messages carry names, not code)."""
    if isinstance(func, str):
        return func
    module, name = getattr(func, "__module__", None), getattr(func, "__qualname__", "")
    if not module or "<" in name or module == "__main__":
        raise TaskTypeError(
            f"train function {func!r} must be importable by the workers (a module-level function); pass it as 'package.module.function'"
        )
    return f"{module}.{name}"


def wait_batch(tm: Any, batch_id: Any, *, poll: float = 0.5, timeout: float | None = None, aggregated: bool = False) -> dict:
    """Block until every task of the batch is final for it (``after_status``, ``done`` or
    ``failed``), and with ``aggregated`` until its aggregation has run; returns the batch.
    Each poll reads the batch's counters (one document), confirmed by a real count when
    they say it is finished (:func:`qcelery.batch.watched_progress`)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    doc = batches.load(tm.db, batch_id)
    while True:
        if doc["state"] == batches.CREATING:  # its producer is still writing it
            doc = batches.load(tm.db, batch_id)
        elif batches.outstanding(tm, doc, batches.watched_progress(tm, doc)) == 0:
            if not aggregated:
                return doc
            doc = batches.load(tm.db, batch_id)
            if doc["state"] == batches.AGGREGATED:
                return doc
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"batch {batch_id} of pool {tm.name!r} not finished after {timeout}s: "
                f"{batches.progress(tm, doc)}, aggregation {doc['state']}"
            )
        time.sleep(poll)


class TrainerCelery(TrainerRM):
    """Train tasks on Celery workers (qcelery's twin of ``TrainerRM``).

    ``train_func`` must be importable by the workers (a dotted path or a module-level
    function). ``queue`` picks the worker pool (default ``settings.default_queue``),
    ``aggregate`` the batch collector (dotted path or ``{"func", "kwargs"}``).
    ``wait_aggregated`` makes ``train`` also wait for the batch's aggregation.
    ``qlib_init`` (``qlib.init``'s keyword arguments) travels with each batch: every
    worker process initialises Qlib with it before its first task of the batch.
    """

    def __init__(
        self,
        experiment_name: str | None = None,
        task_pool: Any = None,
        train_func: Callable | str = task_train,
        *,
        queue: str | None = None,
        priority: int = 0,
        aggregate: dict | str | None = None,
        wait_aggregated: bool = False,
        timeout: float | None = None,
        settings: Settings | None = None,
        qlib_init: dict | None = None,
    ):
        # a dotted path too: the workers import it, this process never calls it
        super().__init__(experiment_name, task_pool, train_func, settings=settings, qlib_init=qlib_init)  # type: ignore[arg-type]
        self.queue, self.priority, self.aggregate = queue, priority, aggregate
        self.wait_aggregated, self.timeout = wait_aggregated, timeout
        self.last_batch_id: str | None = None

    def _run_batch(
        self, tm: Any, task_defs: list[dict], train_func: Callable | str, experiment_name: str, before_status: str, after_status: str
    ) -> list:
        from .producer import enqueue

        _experiment(experiment_name, self.settings)  # once, before workers race to create it
        self.last_batch_id = enqueue(
            list(task_defs),
            tm.name,
            settings=self.settings,
            queue=self.queue,
            priority=self.priority,
            aggregate=self.aggregate,
            task_func=_dotted(train_func),
            task_kwargs={"experiment_name": experiment_name},
            qlib_init=self.qlib_init,
            before_status=before_status,
            after_status=after_status,
        )
        wait_batch(tm, self.last_batch_id, timeout=self.timeout, aggregated=self.wait_aggregated)
        # the tasks' ids in the order given (the batch keeps no list of them)
        hashes = [filter_hash(normalize(t)) for t in task_defs]
        by_hash = tm._ids_by_hash(set(hashes))
        return [by_hash[h] for h in hashes]

    # [override]: no before_status/after_status/default_rec_name, the batch's statuses follow is_delay()
    def train(  # type: ignore[override]
        self, tasks: list | dict, train_func: Callable | str | None = None, experiment_name: str | None = None, **kwargs: Any
    ) -> list[Recorder]:
        """Enqueue ``tasks`` as one batch, wait, and return their recorders in task order.

        Raises :class:`~qcelery.trainer.TrainingFailedError` listing the failed tasks
        (after every other task finished)."""
        if kwargs:
            raise TaskTypeError(
                f"TrainerCelery.train takes no extra keyword arguments (got {sorted(kwargs)}): "
                "task functions get experiment_name, settings and tags from the worker"
            )
        tasks = _as_list(tasks, Mapping)
        if not tasks:
            return []
        experiment_name = experiment_name or self.experiment_name
        if not experiment_name:
            raise ConfigError("TrainerCelery needs an experiment_name")
        tm = self.manager(experiment_name)
        ids = self._run_batch(
            tm, tasks, train_func or self.train_func, experiment_name, st.WAITING, st.PART_DONE if self.is_delay() else st.DONE
        )
        return self._recorders(tm, ids, self.STATUS_BEGIN)

    def worker(self, *args: Any, **kwargs: Any) -> int:
        raise NotImplementedError("TrainerCelery's workers are Celery workers: run `qcelery worker --pool <queue>`")

    def has_worker(self) -> bool:
        return False


class DelayTrainerCelery(TrainerCelery):
    """Two phases on Celery workers (qcelery's twin of ``DelayTrainerRM``): ``train``
    records every task (pool status ``part_done``), ``end_train`` trains them."""

    def __init__(
        self,
        experiment_name: str | None = None,
        task_pool: Any = None,
        train_func: Callable | str = begin_task_train,
        end_train_func: Callable | str = end_task_train,
        **kwargs: Any,
    ):
        super().__init__(experiment_name, task_pool, train_func, **kwargs)
        self.end_train_func = end_train_func
        self.delay = True

    def end_train(
        self, recs: list | Recorder, end_train_func: Callable | str | None = None, experiment_name: str | None = None, **kwargs: Any
    ) -> list[Recorder]:
        """Train, on the workers, the tasks whose first phase made ``recs``; returns the
        recorders in the same order."""
        recs = _as_list(recs, Recorder)
        if not recs:
            return []
        experiment_name = experiment_name or self.experiment_name
        if not experiment_name:
            raise ConfigError("DelayTrainerCelery needs an experiment_name")
        tm = self.manager(experiment_name)
        task_defs = []
        for rec in recs:
            task_id = rec.list_tags().get(self.TM_ID)
            if not task_id:
                raise ConfigError(f"recorder {rec.id} has no {self.TM_ID!r} tag: it was not made by DelayTrainerCelery.train")
            task_defs.append(tm.re_query(task_id)["def"])  # the same definitions: same tasks, a new batch
        ids = self._run_batch(tm, task_defs, end_train_func or self.end_train_func, experiment_name, st.PART_DONE, st.DONE)
        return self._recorders(tm, ids, self.STATUS_END)
