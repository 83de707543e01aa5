"""Training tasks: ``task_train`` and Qlib's trainers (``qlib.model.trainer``).

``task_train(task, experiment_name)`` runs one task in one MLflow run: it logs the
task (flattened as parameters, whole as the ``task`` artifact), builds the dataset
(its handler from the GridFS handler cache), fits the model, saves it
(``params.pkl``) and the dataset, then runs the task's records with ``<MODEL>`` and
``<DATASET>`` filled in. ``begin_task_train`` / ``end_task_train`` split the same
work in two phases (the pool's ``part_done`` in between).

Trainers, as in Qlib: :class:`TrainerR` / :class:`DelayTrainerR` train in this
process; :class:`TrainerRM` / :class:`DelayTrainerRM` put the tasks in a task pool
and train them with pull-loop workers (``worker()``, from any process or machine).

Differences from Qlib:

* no global ``R``: ``settings`` (Mongo database, MLflow tracking URI, allowed modules)
  is passed in, or built once from the environment when omitted;
* recorders carry tags ``pool`` and ``task_id`` (and Qlib's ``_id in TaskManager``),
  plus ``model`` and ``test_start`` / ``test_end``, so a run leads back to its task;
* a run whose training raised ends ``FAILED`` with tag ``qcelery.error``; a record
  that raises is reported as :class:`~qcelery.records.RecordError` naming it;
* records are built by Qlib's rule (``recorder=`` the task's recorder, ``model`` /
  ``dataset`` to those that take them); one without ``module_path`` is Qlib's
  (``qlib.workflow.record_temp``) in a task whose model or dataset is Qlib's, else
  qcelery's (:mod:`qcelery.records`). Qlib's own records (``SignalRecord``,
  ``SigAnaRecord``, ``PortAnaRecord`` with its backtest) run unchanged on qcelery's recorder;
* the pull loop of :class:`TrainerRM` records a task that raises as failed (retried
  up to ``settings.max_attempts``, then ``failed`` with its traceback in ``error``)
  and goes on with the next task, where Qlib's ``run_task`` stops the worker with the
  task back in ``waiting``; ``train`` then raises :class:`TrainingFailedError` listing
  the failed tasks, after the others finished.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from . import status as st
from .data import HandlerCache, replace_task_handler_with_cache
from .errors import ConfigError, RecordError, TaskTypeError, TrainingFailedError
from .exp import Experiment, Recorder, get_experiment
from .instance import accepted_kwargs, allowed_imports, check_task_names, fill_placeholder, flatten_dict, init_instance_by_config
from .qlib_bridge import check_qlib_init, ensure_qlib_init, qlib_run
from .settings import Settings, load_settings

log = logging.getLogger(__name__)

__all__ = [
    "task_train",
    "begin_task_train",
    "end_task_train",
    "Trainer",
    "TrainerR",
    "DelayTrainerR",
    "TrainerRM",
    "DelayTrainerRM",
    "TrainingFailedError",
]

#: tag set on a run whose training raised (the first line of the error)
ERROR_TAG = "qcelery.error"
#: where Qlib's ``task_train`` looks for a record config's class without ``module_path``
_QLIB_RECORDS = "qlib.workflow.record_temp"


# --------------------------------------------------------------------- tasks
def _task_tags(task_config: Mapping[str, Any]) -> dict[str, str]:
    """Tags that make runs searchable by model and test window."""
    tags: dict[str, str] = {}
    model = task_config.get("model")
    if isinstance(model, Mapping):
        klass = model.get("class")
        klass = klass.rpartition(".")[2] if isinstance(klass, str) else getattr(klass, "__name__", None)
        label = model.get("name") or klass
        if label:
            tags["model"] = str(label)
    try:
        test = task_config["dataset"]["kwargs"]["segments"]["test"]
        tags["test_start"], tags["test_end"] = (str(t)[:10] if t is not None else "" for t in test)
    except (KeyError, TypeError, ValueError):
        pass
    return tags


def _check_task(task_config: Any) -> None:
    if not isinstance(task_config, Mapping):
        raise TaskTypeError(f"a task is a dict with model / dataset / record, got {type(task_config).__name__}")
    missing = [k for k in ("model", "dataset") if k not in task_config]
    if missing:
        raise ConfigError(f"task has no {' and no '.join(repr(m) for m in missing)} section (keys: {sorted(task_config)})")


def _log_task_info(rec: Recorder, task_config: Mapping[str, Any]) -> None:
    rec.log_params(**flatten_dict(task_config))
    rec.save_objects(task=dict(task_config))  # the original, with its types
    rec.set_tags(hostname=socket.gethostname())


def _build(section: str, config: Any, **kwargs: Any) -> Any:
    try:
        return init_instance_by_config(config, **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"task {section}: {exc}") from exc


def _exe_task(rec: Recorder, task_config: Mapping[str, Any], settings: Settings) -> None:
    # task data is never code: every class the task names is checked before any is built,
    # and whatever qcelery builds from it meanwhile stays within the allow-list
    check_task_names(task_config, settings.allowed_modules, load=True, where=f"task of run {rec.id}")
    # Qlib's R, when Qlib is initialised here, is this task's run while it trains
    with allowed_imports(settings.allowed_modules), qlib_run(rec):
        _build_and_train(rec, task_config, settings)


def _build_and_train(rec: Recorder, task_config: Mapping[str, Any], settings: Settings) -> None:
    from .data import DatasetH
    from .models import Model

    task = replace_task_handler_with_cache(task_config, HandlerCache(settings))
    model = _build("model", task["model"], accept_types=Model)
    dataset = _build("dataset", task["dataset"], accept_types=DatasetH)
    model.fit(dataset, **accepted_kwargs(model.fit, {"reweighter": task.get("reweighter")}))
    rec.save_objects(**{"params.pkl": model})
    rec.save_objects(dataset=dataset)  # pickles the handler's config, not its data
    filled = fill_placeholder(task, {"<MODEL>": model, "<DATASET>": dataset})
    records = filled.get("record") or []
    if isinstance(records, Mapping):
        records = [records]
    default_module = _default_record_module(task_config)
    for i, record in enumerate(records):
        name = record.get("class", "?") if isinstance(record, Mapping) else type(record).__name__
        try:
            # Qlib's rule: recorder always, model and dataset to the records that take them
            r = init_instance_by_config(
                record, default_module=default_module, recorder=rec, try_kwargs={"model": model, "dataset": dataset}
            )
            r.generate()
        except Exception as exc:
            raise RecordError(f"record #{i} {name} of run {rec.id} raised {type(exc).__name__}: {exc}") from exc


def _default_record_module(task_config: Mapping[str, Any]) -> str:
    """Where a record config without ``module_path`` is looked up: Qlib's records (Qlib's own
    default) for a task whose model or dataset is Qlib's, qcelery's otherwise. Decided by the
    task alone, so a task resolves the same on every worker, whatever ran there before."""
    for section in ("model", "dataset"):
        config = task_config.get(section)
        if isinstance(config, Mapping):
            klass, module = config.get("class"), config.get("module_path")
            named = module if isinstance(module, str) and module else klass.rpartition(".")[0] if isinstance(klass, str) else ""
            if named == "qlib" or str(named).startswith("qlib."):
                return _QLIB_RECORDS
    return "qcelery.records"


def _fail_run(rec: Recorder, exc: BaseException) -> None:
    message = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    try:
        rec.set_tags(**{ERROR_TAG: message})
        rec.end_run(Recorder.STATUS_FA)
    except Exception:  # the store is away too: the original error is what matters
        log.exception("could not mark run %s failed", rec.id)


@contextlib.contextmanager
def _failing_run_on_error(rec: Recorder) -> Iterator[None]:
    """Whatever raises inside (Ctrl-C included) ends ``rec`` FAILED, then propagates."""
    try:
        yield
    except BaseException as exc:
        _fail_run(rec, exc)
        raise


def _experiment(experiment_name: str | None, settings: Settings) -> Experiment:
    if not experiment_name:
        raise ConfigError("experiment_name is required (the MLflow experiment the task's run goes to)")
    return get_experiment(experiment_name, settings)


def _task_run(
    task_config: Any,
    experiment_name: str,
    recorder_name: str | None,
    settings: Settings | None,
    tags: Mapping[str, Any] | None,
    *,
    train: bool,
) -> Recorder:
    """A new run of ``experiment_name`` tagged for ``task_config`` and holding it
    (parameters, ``task`` artifact); with ``train`` the task is trained and its records
    run in it, and the run ends ``FINISHED``, else it ends ``SCHEDULED``."""
    _check_task(task_config)
    settings = settings or load_settings()
    rec = _experiment(experiment_name, settings).create_recorder(recorder_name, tags={**_task_tags(task_config), **dict(tags or {})})
    with _failing_run_on_error(rec):
        _log_task_info(rec, task_config)
        if train:
            _exe_task(rec, task_config, settings)
    rec.end_run(Recorder.STATUS_FI if train else Recorder.STATUS_S)
    return rec


def task_train(
    task_config: dict,
    experiment_name: str,
    recorder_name: str | None = None,
    *,
    settings: Settings | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Recorder:
    """Train one task in a new run of ``experiment_name``; return its finished recorder.

    ``tags`` are added to the run (the Celery worker passes ``pool`` and ``task_id``).
    The run ends ``FINISHED``, or ``FAILED`` (tag ``qcelery.error``) when anything
    raises; the error propagates.
    """
    return _task_run(task_config, experiment_name, recorder_name, settings, tags, train=True)


def begin_task_train(
    task_config: dict,
    experiment_name: str,
    recorder_name: str | None = None,
    *,
    settings: Settings | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Recorder:
    """First phase: a run holding the task (parameters and ``task`` artifact), left
    ``SCHEDULED`` for :func:`end_task_train`."""
    return _task_run(task_config, experiment_name, recorder_name, settings, tags, train=False)


def end_task_train(
    rec: Recorder,
    experiment_name: str | None = None,
    *,
    settings: Settings | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Recorder:
    """Second phase: resume ``rec``, train the task it holds and run its records."""
    if not isinstance(rec, Recorder):
        raise TaskTypeError(f"end_task_train takes the Recorder begin_task_train returned, got {type(rec).__name__}")
    settings = settings or load_settings()
    rec.start_run()
    with _failing_run_on_error(rec):
        if tags:
            rec.set_tags(**tags)
        task_config = rec.load_object("task", allowed_modules=settings.allowed_modules)
        _exe_task(rec, task_config, settings)
    rec.end_run(Recorder.STATUS_FI)
    return rec


# ------------------------------------------------------------------ trainers
class Trainer:
    """Trains a list of tasks and returns their models (recorders), as in Qlib:
    ``train`` then ``end_train``; a delayed trainer does the real work in ``end_train``."""

    def __init__(self) -> None:
        self.delay = False

    def train(self, tasks: list, *args: Any, **kwargs: Any) -> list:
        raise NotImplementedError

    # positional only: the subclasses keep Qlib's names for it (``models``, ``recs``)
    def end_train(self, models: list, /, *args: Any, **kwargs: Any) -> list:
        return models

    def is_delay(self) -> bool:
        return self.delay

    def __call__(self, *args: Any, **kwargs: Any) -> list:
        return self.end_train(self.train(*args, **kwargs))

    def has_worker(self) -> bool:
        return False

    def worker(self) -> int:
        """Run tasks of the trainer's pool until none is left; returns how many ran."""
        raise NotImplementedError(f"{type(self).__name__} has no worker")


def _as_list(items: Any, kind: type | tuple[type, ...]) -> list:
    return [items] if isinstance(items, kind) else list(items)


def _with_context(func: Callable, kwargs: dict, settings: Settings, tags: Mapping[str, Any] | None = None) -> dict:
    """``kwargs`` plus ``settings`` (and ``tags``) when ``func`` takes them and the
    caller did not give them (a Qlib train function takes neither)."""
    extra: dict[str, Any] = {"settings": settings}
    if tags is not None:
        extra["tags"] = dict(tags)
    return {**kwargs, **{k: v for k, v in accepted_kwargs(func, extra).items() if k not in kwargs}}


def _in_qlib(qlib_init: Mapping[str, Any] | None, allowed_modules: list[str], func: Callable, *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` after Qlib is initialised with ``qlib_init`` in this process
    (once per process and config, :func:`qcelery.qlib_bridge.ensure_qlib_init`); module
    level, so a child process of ``call_in_subproc`` can run it too."""
    if qlib_init is not None:
        ensure_qlib_init(qlib_init, allowed_modules, where="trainer")
    return func(*args, **kwargs)


def _call_in_subprocess(func: Callable, *args: Any, **kwargs: Any) -> Any:
    with concurrent.futures.ProcessPoolExecutor(max_workers=1) as pool:
        return pool.submit(func, *args, **kwargs).result()


class TrainerR(Trainer):
    """Trains tasks one after the other in this process (Qlib's ``TrainerR``).

    ``call_in_subproc=True`` runs each task in a child process (memory is released).
    ``qlib_init`` (a workflow's ``qlib_init:``, the keyword arguments of ``qlib.init``)
    initialises Qlib in the training process before its first task, once per process and
    config, as a Celery worker does for a batch; checked against the allow-list first.
    """

    STATUS_KEY = "train_status"
    STATUS_BEGIN = "begin_task_train"
    STATUS_END = "end_task_train"

    def __init__(
        self,
        experiment_name: str | None = None,
        train_func: Callable = task_train,
        call_in_subproc: bool = False,
        default_rec_name: str | None = None,
        *,
        settings: Settings | None = None,
        qlib_init: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.experiment_name = experiment_name
        self.train_func = train_func
        self.default_rec_name = default_rec_name
        self._call_in_subproc = call_in_subproc
        self.settings = settings or load_settings()
        self.qlib_init = None if qlib_init is None else check_qlib_init(qlib_init, self.settings.allowed_modules, where=type(self).__name__)

    def train(
        self, tasks: list | dict, train_func: Callable | None = None, experiment_name: str | None = None, **kwargs: Any
    ) -> list[Recorder]:
        tasks = _as_list(tasks, Mapping)
        train_func = train_func or self.train_func
        experiment_name = experiment_name or self.experiment_name
        recs = []
        for task in tasks:
            call_kwargs = _with_context(train_func, {"recorder_name": self.default_rec_name, **kwargs}, self.settings)
            run = (self.qlib_init, self.settings.allowed_modules, train_func, task, experiment_name)
            rec = _call_in_subprocess(_in_qlib, *run, **call_kwargs) if self._call_in_subproc else _in_qlib(*run, **call_kwargs)
            rec.set_tags(**{self.STATUS_KEY: self.STATUS_BEGIN})
            recs.append(rec)
        return recs

    def end_train(self, models: list | Recorder, **kwargs: Any) -> list[Recorder]:
        models = _as_list(models, Recorder)
        for rec in models:
            rec.set_tags(**{self.STATUS_KEY: self.STATUS_END})
        return models


class DelayTrainerR(TrainerR):
    """``train`` only records the tasks (:func:`begin_task_train`); ``end_train`` fits
    them (:func:`end_task_train`), skipping recorders already ended (Qlib's ``DelayTrainerR``)."""

    def __init__(
        self,
        experiment_name: str | None = None,
        train_func: Callable = begin_task_train,
        end_train_func: Callable = end_task_train,
        **kwargs: Any,
    ):
        super().__init__(experiment_name, train_func, **kwargs)
        self.end_train_func = end_train_func
        self.delay = True

    def end_train(
        self, models: list | Recorder, end_train_func: Callable | None = None, experiment_name: str | None = None, **kwargs: Any
    ) -> list[Recorder]:
        models = _as_list(models, Recorder)
        end_train_func = end_train_func or self.end_train_func
        experiment_name = experiment_name or self.experiment_name
        for rec in models:
            if rec.list_tags().get(self.STATUS_KEY) == self.STATUS_END:
                continue
            call_kwargs = _with_context(end_train_func, kwargs, self.settings)
            _in_qlib(self.qlib_init, self.settings.allowed_modules, end_train_func, rec, experiment_name, **call_kwargs)
            rec.set_tags(**{self.STATUS_KEY: self.STATUS_END})
        return models


def work_on_pool(
    task_func: Callable,
    manager: Any,
    query: dict | None = None,
    before_status: str = st.WAITING,
    after_status: str = st.DONE,
    *,
    qlib_init: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> int:
    """The pull loop of :class:`TrainerRM` workers; returns how many tasks it ran.

    :func:`qcelery.manage.run_task`'s loop (leased fetch, heartbeat, fenced commit),
    but a task that raises is recorded with :meth:`TaskManager.fail` (back to
    ``before_status`` while attempts remain, else ``failed``) and the loop goes on.
    ``task_func`` also gets ``settings`` and ``tags`` (``pool``, ``task_id``) when it
    takes them. With ``qlib_init``, Qlib is initialised in this process before the first
    task (once per process and config, as a Celery worker does for a batch); a provider
    that is not there raises before any task is fetched.
    """
    from .manage import pull_tasks

    if qlib_init is not None:
        ensure_qlib_init(qlib_init, manager.settings.allowed_modules, where=f"worker of pool {manager.name!r}")

    def task_kwargs(task: dict) -> dict:
        tags = {"pool": manager.name, "task_id": str(task["_id"])}
        return _with_context(task_func, kwargs, manager.settings, tags)

    return pull_tasks(task_func, manager, query, before_status, after_status, record_failures=True, task_kwargs=task_kwargs)


class TrainerRM(Trainer):
    """Trains tasks through a task pool (Qlib's ``TrainerRM``).

    ``train`` inserts the tasks (deduplicated), runs the pull loop here unless
    ``skip_run_task``, waits until every task is final and returns the recorders in
    task order, tagged with ``pool`` / ``task_id`` / ``_id in TaskManager``. Any number
    of ``worker()`` calls, in other processes or machines, share the work.
    ``task_pool`` is a pool name (default: the experiment name) or a ``TaskManager``.
    ``qlib_init`` (``qlib.init``'s keyword arguments) initialises Qlib in each process that
    runs the pull loop (``train`` here, ``worker()`` anywhere) before its first task, once
    per process and config; checked against the allow-list first.
    """

    STATUS_KEY = "train_status"
    STATUS_BEGIN = "begin_task_train"
    STATUS_END = "end_task_train"
    TM_ID = "_id in TaskManager"

    def __init__(
        self,
        experiment_name: str | None = None,
        task_pool: Any = None,
        train_func: Callable = task_train,
        skip_run_task: bool = False,
        default_rec_name: str | None = None,
        *,
        settings: Settings | None = None,
        qlib_init: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.experiment_name = experiment_name
        self.train_func = train_func
        self.skip_run_task = skip_run_task
        self.default_rec_name = default_rec_name
        if hasattr(task_pool, "task_pool") and hasattr(task_pool, "settings"):  # a TaskManager
            self.settings = settings or task_pool.settings
            self.task_pool = task_pool.name
        else:
            self.settings = settings or load_settings()
            self.task_pool = task_pool
        self.qlib_init = None if qlib_init is None else check_qlib_init(qlib_init, self.settings.allowed_modules, where=type(self).__name__)

    def manager(self, experiment_name: str | None = None) -> Any:
        from .manage import TaskManager

        name = self.task_pool or experiment_name or self.experiment_name
        if not name:
            raise ConfigError("TrainerRM needs task_pool or experiment_name to name its task pool")
        return TaskManager(name, self.settings)

    def train(
        self,
        tasks: list | dict,
        train_func: Callable | None = None,
        experiment_name: str | None = None,
        before_status: str = st.WAITING,
        after_status: str = st.DONE,
        default_rec_name: str | None = None,
        **kwargs: Any,
    ) -> list[Recorder]:
        tasks = _as_list(tasks, Mapping)
        if not tasks:
            return []
        train_func = train_func or self.train_func
        experiment_name = experiment_name or self.experiment_name
        tm = self.manager(experiment_name)
        ids = tm.create_task(tasks)
        _experiment(experiment_name, self.settings)  # once, before any worker races to create it
        query = {"_id": {"$in": list(dict.fromkeys(ids))}}
        if not self.skip_run_task:
            work_on_pool(
                train_func,
                tm,
                query,
                before_status,
                after_status,
                experiment_name=experiment_name,
                recorder_name=default_rec_name or self.default_rec_name,
                qlib_init=self.qlib_init,
                **kwargs,
            )
        if not self.is_delay():
            tm.wait(query=query, progress=False)
        return self._recorders(tm, ids, self.STATUS_BEGIN)

    def _recorders(self, tm: Any, ids: Iterable[Any], status_tag: str) -> list[Recorder]:
        recs, failures, done = [], [], {}
        for _id in ids:
            task = tm.re_query(_id)
            rec = task.get("res")
            if task["status"] == st.FAILED or not isinstance(rec, Recorder):
                err = (task.get("error") or "").strip().splitlines()
                failures.append({"task_id": str(_id), "status": task["status"], "error": err[-1] if err else ""})
                continue
            rec.set_tags(**{self.STATUS_KEY: status_tag, self.TM_ID: str(_id), "task_id": str(_id), "pool": tm.name})
            recs.append(rec)
            done[str(_id)] = rec
        if failures:
            lines = "; ".join(f"task {f['task_id']} ({f['status']}): {f['error']}" for f in failures[:5])
            raise TrainingFailedError(
                f"{len(failures)} of {len(recs) + len(failures)} tasks in pool {tm.name!r} did not train: {lines}"
                + (" ..." if len(failures) > 5 else ""),
                failures,
                done,
            )
        return recs

    def end_train(self, recs: list | Recorder, **kwargs: Any) -> list[Recorder]:
        recs = _as_list(recs, Recorder)
        for rec in recs:
            rec.set_tags(**{self.STATUS_KEY: self.STATUS_END})
        return recs

    def worker(self, train_func: Callable | None = None, experiment_name: str | None = None) -> int:
        """Train waiting tasks of the pool until none is left; returns how many ran."""
        experiment_name = experiment_name or self.experiment_name
        return work_on_pool(
            train_func or self.train_func, self.manager(experiment_name), experiment_name=experiment_name, qlib_init=self.qlib_init
        )

    def has_worker(self) -> bool:
        return True


class DelayTrainerRM(TrainerRM):
    """``train`` records the tasks (pool status ``part_done``); ``end_train`` trains them
    through the pool (Qlib's ``DelayTrainerRM``); ``worker()`` serves the second phase."""

    def __init__(
        self,
        experiment_name: str | None = None,
        task_pool: Any = None,
        train_func: Callable = begin_task_train,
        end_train_func: Callable = end_task_train,
        skip_run_task: bool = False,
        **kwargs: Any,
    ):
        super().__init__(experiment_name, task_pool, train_func, **kwargs)
        self.end_train_func = end_train_func
        self.delay = True
        self.skip_run_task = skip_run_task

    # [override]: Qlib's signature, without TrainerRM's after_status (the first phase always ends in part_done)
    def train(  # type: ignore[override]
        self, tasks: list | dict, train_func: Callable | None = None, experiment_name: str | None = None, **kwargs: Any
    ) -> list[Recorder]:
        skip, self.skip_run_task = self.skip_run_task, False  # the first phase always runs here
        try:
            return super().train(tasks, train_func=train_func, experiment_name=experiment_name, after_status=st.PART_DONE, **kwargs)
        finally:
            self.skip_run_task = skip

    def end_train(
        self, recs: list | Recorder, end_train_func: Callable | None = None, experiment_name: str | None = None, **kwargs: Any
    ) -> list[Recorder]:
        recs = _as_list(recs, Recorder)
        end_train_func = end_train_func or self.end_train_func
        experiment_name = experiment_name or self.experiment_name
        tm = self.manager(experiment_name)
        ids = []
        for rec in recs:
            task_id = rec.list_tags().get(self.TM_ID)
            if not task_id:
                raise ConfigError(f"recorder {rec.id} has no {self.TM_ID!r} tag: it was not made by DelayTrainerRM.train")
            ids.append(task_id)
        query = {"_id": {"$in": ids}}
        if not self.skip_run_task:
            work_on_pool(
                end_train_func, tm, query, st.PART_DONE, st.DONE, experiment_name=experiment_name, qlib_init=self.qlib_init, **kwargs
            )
        tm.wait(query=query, progress=False)
        return self._recorders(tm, ids, self.STATUS_END)

    def worker(self, end_train_func: Callable | None = None, experiment_name: str | None = None) -> int:
        experiment_name = experiment_name or self.experiment_name
        return work_on_pool(
            end_train_func or self.end_train_func,
            self.manager(experiment_name),
            before_status=st.PART_DONE,
            experiment_name=experiment_name,
            qlib_init=self.qlib_init,
        )


def __getattr__(name: str) -> Any:
    # the Celery trainers live in trainer_celery (it imports Celery); DESIGN.md names them here
    if name in ("TrainerCelery", "DelayTrainerCelery"):
        from . import trainer_celery

        return getattr(trainer_celery, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
