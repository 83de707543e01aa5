"""Qlib's own runtime under qcelery: a workflow's ``qlib_init`` and its provider calendar.

A workflow file's ``qlib_init:`` (Qlib's key: ``provider_uri``, ``region``, ...) is task
data: it travels with its batch (the batch document's ``qlib_init`` field), is checked
against the allow-list like a task definition (Qlib builds classes from it, e.g. an
``exp_manager`` config), and every worker process calls ``qlib.init(**qlib_init)`` once
before its first task of such a batch (:func:`ensure_qlib_init`). Qlib keeps one global
configuration per process, so the last config applied is cached per process and a later
batch naming the same config costs nothing; one naming another config initialises Qlib
again (Qlib's own ``init`` may be called repeatedly; it clears its memory cache).

Per process, not per thread: Qlib's ``C`` is a process global, so a worker pool that runs
tasks of batches with different configs in threads of one process would race on it;
qcelery's workers use Celery's prefork pool (one task at a time per process).

With ``qlib_init`` and no ``calendar:``, generators roll on the provider's own trading
calendar (:func:`provider_calendar`), as Qlib's ``RollingGen`` does through
``D.calendar(future=True)``.

While a task trains, Qlib's ``R`` is the task's run (:func:`qlib_run`): what Qlib's models
and records log through ``R`` (LightGBM's ``l2.train`` curves, ``R.save_objects``) lands
in the MLflow run qcelery made for the task, on its tracking URI, and no ``./mlruns`` or
second run appears. Qlib's recorder writes synchronously there (:func:`_log_synchronously`),
so its writes and those of Qlib's records through qcelery's recorder come in program order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .calendar import TradingCalendar
from .errors import ConfigError, TaskTypeError
from .instance import allowed_imports, check_task_names

if TYPE_CHECKING:
    from .exp import Recorder

log = logging.getLogger(__name__)

__all__ = ["check_qlib_init", "ensure_qlib_init", "init_count", "provider_calendar", "provider_dir", "qlib_initialised", "qlib_run"]

#: the canonical form of the config this process last passed to ``qlib.init``
_last_config: str | None = None
#: how many times this process called ``qlib.init`` through :func:`ensure_qlib_init`
_init_calls = 0


def _canonical(qlib_init: Mapping[str, Any], where: str) -> str:
    try:
        return json.dumps(qlib_init, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TaskTypeError(
            f"{where}: qlib_init must hold plain values (strings, numbers, lists, mappings) so it can travel with its batch; {exc}"
        ) from None


def check_qlib_init(qlib_init: Any, allowed_modules: Iterable[str] | None, *, where: str = "qlib_init") -> dict[str, Any]:
    """``qlib_init`` as a plain dict, checked: a mapping of plain values whose classes (an
    ``exp_manager`` config, say) the allow-list admits (``None``: the shape only, for a
    caller's own code). Nothing is imported.

    Raises :class:`~qcelery.errors.TaskTypeError` for a value that is no mapping (or holds
    non-plain values) and :class:`~qcelery.errors.ModuleNotAllowedError` for a refused class."""
    if not isinstance(qlib_init, Mapping) or not all(isinstance(k, str) for k in qlib_init):
        raise TaskTypeError(
            f"{where}: qlib_init must be a mapping of qlib.init's keyword arguments (provider_uri, region, ...), got {qlib_init!r}"
        )
    _canonical(qlib_init, where)
    if allowed_modules is not None:
        check_task_names(qlib_init, allowed_modules, where=f"{where}: qlib_init")
    return dict(qlib_init)


def provider_dir(qlib_init: Mapping[str, Any], freq: str = "day") -> Path | None:
    """The local directory of ``qlib_init``'s daily data (``provider_uri``, a path or Qlib's
    ``{freq: path}`` mapping), ``~`` expanded; ``None`` when it names none."""
    uri = qlib_init.get("provider_uri")
    if isinstance(uri, Mapping):
        uri = uri.get(freq)
    if not isinstance(uri, (str, Path)) or not str(uri):
        return None
    return Path(uri).expanduser()


def ensure_qlib_init(qlib_init: Mapping[str, Any], allowed_modules: Iterable[str], *, where: str = "qlib_init") -> bool:
    """``qlib.init(**qlib_init)`` unless the last call in this process had the same config;
    returns whether Qlib was initialised now.

    The config is checked against the allow-list (importing what it names, so a class
    that is not what its name claims is refused) before Qlib builds anything from it, and
    Qlib builds it inside :func:`~qcelery.instance.allowed_imports`. A local provider
    directory that does not exist here is a :class:`~qcelery.errors.ConfigError` (Qlib
    itself would only log it and fail later on the first data access)."""
    global _last_config, _init_calls
    key = _canonical(qlib_init, where)
    if key == _last_config:
        return False
    allowed = tuple(allowed_modules)
    check_task_names(qlib_init, allowed, load=True, where=f"{where}: qlib_init")
    data = provider_dir(qlib_init)
    if data is not None and not data.is_dir():
        raise ConfigError(
            f"{where}: qlib_init provider_uri {str(data)!r} is not a directory on host {socket.gethostname()}; "
            "every worker host needs the Qlib data at that path (or give provider_uri as the path where it is mounted)"
        )
    import qlib

    with allowed_imports(allowed):
        qlib.init(**dict(qlib_init))
    _last_config = key
    _init_calls += 1
    log.info("%s: qlib initialised (%s)", where, key)
    return True


def init_count() -> int:
    """How many times this process initialised Qlib through :func:`ensure_qlib_init`."""
    return _init_calls


def _read_days(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def provider_calendar(qlib_init: Mapping[str, Any], *, where: str = "qlib_init") -> TradingCalendar:
    """The provider's own daily trading calendar: ``calendars/day.txt``, extended by
    ``calendars/day_future.txt`` when present (what ``D.calendar(future=True)`` reads,
    and so what Qlib's ``RollingGen`` rolls on). Read from the files directly, without
    initialising Qlib in the producer's process."""
    data = provider_dir(qlib_init)
    if data is None:
        raise ConfigError(f"{where}: qlib_init has no provider_uri to read the trading calendar from; give one, or a calendar:")
    day = data / "calendars" / "day.txt"
    if not day.is_file():
        raise ConfigError(
            f"{where}: the Qlib provider {str(data)!r} has no calendars/day.txt on this host; "
            "the generators roll on it when the workflow gives no calendar: (give calendar: XSHG, or the right provider_uri)"
        )
    future = data / "calendars" / "day_future.txt"
    try:
        return TradingCalendar(_read_days(day), _read_days(future) if future.is_file() else None, name=f"qlib:{data}")
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"{where}: the calendar of Qlib provider {str(data)!r} cannot be read: {exc}") from None


def qlib_initialised() -> bool:
    """Whether this process imported Qlib and initialised it (``qlib.init``); never imports it."""
    config = sys.modules.get("qlib.config")
    return bool(config is not None and getattr(config.C, "registered", False))


@contextlib.contextmanager
def qlib_run(rec: Recorder) -> Iterator[None]:
    """Within the block, Qlib's ``R`` records into ``rec``'s MLflow run: Qlib's own
    ``R.start(experiment_id, recorder_id, uri, resume=True)``, so ``R.log_metrics``,
    ``R.get_recorder()`` and Qlib's records reach the task's run on qcelery's tracking
    URI (not Qlib's default ``./mlruns``), and no other run is made. As in Qlib's own
    ``task_train``, the resumed recorder logs ``cmd-sys.argv`` and the ``git diff`` /
    ``git status`` of the working directory to the run.

    Does nothing when Qlib is not initialised in this process (a task that uses no Qlib
    data has no ``R`` to point anywhere; Qlib's ``R`` refuses to work before ``qlib.init``).
    The run's final status stays qcelery's to set: Qlib ends its recorder ``FINISHED`` or
    ``FAILED`` as the block ends, and qcelery's trainer sets the same right after."""
    if not qlib_initialised():
        yield
        return
    from qlib.workflow import R
    from qlib.workflow.recorder import Recorder as QlibRecorder

    with _process_tracking_uri_kept(), R.start(experiment_id=rec.experiment_id, recorder_id=rec.id, uri=rec.uri, resume=True):
        _log_synchronously(R.get_recorder())
        try:
            yield
        except BaseException as exc:
            # R.start ends Qlib's recorder FAILED on an Exception only: a KeyboardInterrupt or
            # SystemExit would leave its experiment active in this process for the next task
            if not isinstance(exc, Exception):
                R.end_exp(QlibRecorder.STATUS_FA)
            raise


def _log_synchronously(qlib_recorder: Any) -> None:
    """Make Qlib's recorder write at once instead of from its background thread (its
    ``async_log`` queue). Qlib's records write through qcelery's recorder, not through that
    queue, so LightGBM's curves still in flight there would race with them on the same run (a
    file store then reads a half-written metric file: "Metric 'l2.valid' is malformed");
    written at once, every write to the task's run happens in program order, as in Qlib,
    where both went through the one queue."""
    caller = getattr(qlib_recorder, "async_log", None)
    if caller is not None:
        caller.wait()  # nothing is queued yet: this only ends its thread
        qlib_recorder.async_log = None


@contextlib.contextmanager
def _process_tracking_uri_kept() -> Iterator[None]:
    """Undo, after the block, what Qlib's recorder does to the process: ``mlflow.set_tracking_uri``
    sets MLflow's global URI *and* ``MLFLOW_TRACKING_URI`` in ``os.environ``, which qcelery's
    settings read, so every process started afterwards (a worker, a trainer's child) would
    inherit the last task's tracking URI in place of its own settings."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils  # no public getter tells "unset" apart

    uri_before = getattr(tracking_utils, "_tracking_uri", None)
    env_before = os.environ.get(_MLFLOW_ENV)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(uri_before)  # type: ignore[arg-type]  # None unsets it, as MLflow's own code does
        if env_before is None:
            os.environ.pop(_MLFLOW_ENV, None)
        else:
            os.environ[_MLFLOW_ENV] = env_before


_MLFLOW_ENV = "MLFLOW_TRACKING_URI"
