"""Experiments and recorders over MLflow (Qlib's ``Experiment`` / ``Recorder``).

One task trains in one MLflow run; a :class:`Recorder` is a handle on that run and an
:class:`Experiment` on an MLflow experiment. Both talk to MLflow only through an
``MlflowClient`` bound to an explicit tracking URI (``settings.effective_tracking_uri``),
never through MLflow's fluent global state, so several stores can be used from one
process and nothing leaks between tests.

Differences from Qlib (``qlib.workflow``):

* there is no global ``R``: build an :class:`Experiment` with :func:`get_experiment`
  (``settings`` or a tracking URI) and create recorders from it;
* a :class:`Recorder` pickles to its tracking URI, experiment id, run id and name only
  (no live client), so it can be a task's ``res`` in the pool and be decoded by
  :func:`qcelery.serial.restricted_loads`; ``status`` is read from MLflow each time;
* :meth:`Recorder.load_object` decodes artifacts through the restricted unpickler
  (``allowed_modules`` adds trusted modules); objects are written with
  :meth:`qcelery.serial.Serializable.general_dump`, as in Qlib;
* parameters are logged in batches, values longer than MLflow's limit are cut (and
  the whole object is saved as an artifact by the trainer anyway);
* a ``file:`` tracking store (the embedded default) is opted into for MLflow >= 3.7,
  which otherwise refuses it, and experiment creation on it is serialised by a file
  lock so concurrent workers end with one experiment per name.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal, overload
from urllib.parse import urlsplit
from urllib.request import url2pathname

from .errors import ConfigError, LoadObjectError, QceleryError, load_object_error
from .serial import Serializable, restricted_loads
from .settings import Settings, mask_url

log = logging.getLogger(__name__)

__all__ = ["Experiment", "Recorder", "LoadObjectError", "get_experiment", "recorder_from_tags"]

#: MLflow's limits (mlflow.utils.validation): longer parameter values are refused
_MAX_PARAM_VALUE = 6000
_BATCH = 100  # MLflow accepts at most 100 params and 1000 metrics per log_batch call


def _file_store_dir(uri: str) -> Path | None:
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return Path(url2pathname(parts.path))
    if parts.scheme == "" and uri and "://" not in uri:
        return Path(uri)
    return None


def _artifact_location(uri: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps its artifacts: ``mlartifacts/``
    beside the database (MLflow's own default is ``./mlruns`` under whatever directory the
    process runs in). ``None`` elsewhere: servers and file stores decide themselves."""
    parts = urlsplit(uri)
    if parts.scheme != "sqlite" or not parts.path or parts.path == "/:memory:":
        return None
    db = Path(url2pathname(parts.path[1:])).resolve()  # SQLAlchemy: the path after 'sqlite:///'
    return (db.parent / "mlartifacts").as_uri()


@functools.lru_cache(maxsize=32)
def _cached_client(uri: str, pid: int) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def client(uri: str) -> Any:
    """The process' ``MlflowClient`` for ``uri`` (one per process: clients hold sessions)."""
    if not isinstance(uri, str) or not uri:
        raise ConfigError(f"an MLflow tracking URI is required, got {uri!r}")
    if _file_store_dir(uri) is not None:
        # MLflow >= 3.7 refuses the file store unless this is set; it is qcelery's
        # embedded default (a local store under run_dir), so opt in, unless the user
        # said otherwise explicitly
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at: <tracking URI>" when a run ends, and the URI of a
    # server behind basic auth (`qcelery up --listen`) carries the password
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return _cached_client(uri, os.getpid())


def _mlflow_error(exc: Exception, what: str, uri: str) -> QceleryError:
    return ConfigError(f"MLflow at {mask_url(uri)}: {what}: {exc}")


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


class Recorder:
    """One MLflow run (Qlib's ``MLflowRecorder``).

    Built by :meth:`Experiment.create_recorder` / :meth:`Experiment.get_recorder`, or
    unpickled from a task result. Pickles small: tracking URI, ids and name only.
    """

    STATUS_S = "SCHEDULED"
    STATUS_R = "RUNNING"
    STATUS_FI = "FINISHED"
    STATUS_FA = "FAILED"
    STATUSES = (STATUS_S, STATUS_R, STATUS_FI, STATUS_FA, "KILLED")

    def __init__(self, experiment_id: str, run_id: str, uri: str, name: str | None = None):
        self.experiment_id = str(experiment_id)
        self.id = str(run_id)
        self.uri = uri
        self.name = name

    # pickling: exactly these four fields, so a Recorder decodes through restricted_loads
    def __getstate__(self) -> dict:
        return {"experiment_id": self.experiment_id, "id": self.id, "uri": self.uri, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.experiment_id, self.id = state["experiment_id"], state["id"]
        self.uri, self.name = state["uri"], state.get("name")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recorder) and (self.uri, self.id) == (other.uri, other.id)

    def __hash__(self) -> int:
        return hash((self.uri, self.id))

    def __repr__(self) -> str:
        return f"Recorder(id={self.id!r}, name={self.name!r}, experiment_id={self.experiment_id!r}, uri={mask_url(self.uri)!r})"

    @property
    def client(self) -> Any:
        return client(self.uri)

    def _run(self) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(self.id)
        except MlflowException as exc:
            raise _mlflow_error(exc, f"run {self.id} cannot be read", self.uri) from exc

    @property
    def info(self) -> dict[str, Any]:
        """Qlib's ``info``: class, id, name, experiment_id, status, start/end time, uri."""
        run = self._run()

        def fmt(ms: int | None) -> str | None:
            return None if ms is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))

        return {
            "class": type(self).__name__,
            "id": self.id,
            "name": self.name,
            "experiment_id": self.experiment_id,
            "status": run.info.status,
            "start_time": fmt(run.info.start_time),
            "end_time": fmt(run.info.end_time),
            "uri": self.uri,
            "artifact_uri": run.info.artifact_uri,
        }

    @property
    def status(self) -> str:
        """The run's MLflow status (``RUNNING``, ``SCHEDULED``, ``FINISHED``, ``FAILED``, ``KILLED``)."""
        return str(self._run().info.status)

    @property
    def artifact_uri(self) -> str:
        return str(self._run().info.artifact_uri)

    # ----------------------------------------------------------------- logging
    def log_params(self, **kwargs: Any) -> None:
        """Log parameters (values as strings, cut to MLflow's 6000 characters)."""
        from mlflow.entities import Param

        params = [Param(str(k), _param_value(v)) for k, v in kwargs.items()]
        for start in range(0, len(params), _BATCH):
            self.client.log_batch(self.id, params=params[start : start + _BATCH])

    def log_metrics(self, step: int | None = None, **kwargs: Any) -> None:
        """Log metrics (NaN is logged as NaN; non-numbers raise ``TypeError``)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(str(k), float(v), now, step or 0) for k, v in kwargs.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.id, metrics=metrics[start : start + 1000])

    def set_tags(self, **kwargs: Any) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(str(k), _param_value(v)) for k, v in kwargs.items()]
        for start in range(0, len(tags), _BATCH):
            self.client.log_batch(self.id, tags=tags[start : start + _BATCH])

    def delete_tags(self, *keys: str) -> None:
        for key in keys:
            self.client.delete_tag(self.id, key)

    def list_tags(self) -> dict[str, str]:
        return dict(self._run().data.tags)

    def list_params(self) -> dict[str, str]:
        return dict(self._run().data.params)

    def list_metrics(self) -> dict[str, float]:
        return dict(self._run().data.metrics)

    # --------------------------------------------------------------- artifacts
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.id, str(local_path), artifact_path)

    def save_objects(self, local_path: str | Path | None = None, artifact_path: str | None = None, **kwargs: Any) -> None:
        """Save files (``local_path``) or objects (``name=object``, pickled with
        :meth:`Serializable.general_dump`) as artifacts under ``artifact_path``."""
        if local_path is not None:
            path = Path(local_path)
            if path.is_dir():
                self.client.log_artifacts(self.id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.id, str(path), artifact_path)
        if not kwargs:
            return
        tmp = Path(tempfile.mkdtemp(prefix="qcelery-art-"))
        try:
            for name, obj in kwargs.items():
                Serializable.general_dump(obj, tmp / name)
            if len(kwargs) == 1:
                self.client.log_artifact(self.id, str(tmp / next(iter(kwargs))), artifact_path)
            else:
                self.client.log_artifacts(self.id, str(tmp), artifact_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @contextlib.contextmanager
    def _downloaded(self, name: str) -> Iterator[Path]:
        from mlflow.exceptions import MlflowException

        tmp = Path(tempfile.mkdtemp(prefix="qcelery-dl-"))
        try:
            try:
                path = self.client.download_artifacts(self.id, name, str(tmp))
            except (MlflowException, OSError) as exc:
                raise load_object_error(f"run {self.id}: artifact {name!r} cannot be downloaded: {exc}") from exc
            yield Path(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_object(self, name: str, allowed_modules: Iterable[str] = ()) -> Any:
        """Load the pickled artifact ``name`` (e.g. ``"pred.pkl"``, ``"sig_analysis/ic.pkl"``).

        Decoded through :func:`qcelery.serial.restricted_loads` (numpy, pandas and
        qcelery are allowed; add your own model's package with ``allowed_modules``).
        Raises :class:`LoadObjectError` when it is missing or cannot be decoded (in a process
        that imported Qlib, also Qlib's ``LoadObjectError``, which Qlib's records catch).
        """
        with self._downloaded(name) as path:
            if path.is_dir():
                raise load_object_error(f"run {self.id}: artifact {name!r} is a directory, not an object")
            data = path.read_bytes()
        try:
            return restricted_loads(data, allowed_modules, context=f"run {self.id} artifact {name!r}")
        except QceleryError as exc:
            raise load_object_error(str(exc)) from exc

    def list_artifacts(self, artifact_path: str | None = None) -> list[str]:
        return [a.path for a in self.client.list_artifacts(self.id, artifact_path)]

    def download_artifact(self, path: str, dst_path: str | None = None) -> str:
        return str(self.client.download_artifacts(self.id, path, dst_path))

    # --------------------------------------------------------------- lifecycle
    def start_run(self) -> None:
        """Mark the run ``RUNNING`` (also to resume a ``SCHEDULED`` one)."""
        self.client.update_run(self.id, status=self.STATUS_R)

    def end_run(self, status: str = STATUS_FI) -> None:
        """End the run with ``status`` (``FINISHED``, ``FAILED``, ``SCHEDULED``...)."""
        if status not in self.STATUSES:
            raise ConfigError(f"unknown recorder status {status!r}; expected one of {', '.join(self.STATUSES)}")
        if status in (self.STATUS_S, self.STATUS_R):
            self.client.update_run(self.id, status=status)
        else:
            self.client.set_terminated(self.id, status=status)


class Experiment:
    """One MLflow experiment (Qlib's ``MLflowExperiment``); get one with :func:`get_experiment`."""

    RT_D: Final = "dict"
    RT_L: Final = "list"

    def __init__(self, id: str, name: str, uri: str):
        self.id = str(id)
        self.name = name
        self.uri = uri

    def __repr__(self) -> str:
        return f"Experiment(id={self.id!r}, name={self.name!r}, uri={mask_url(self.uri)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Experiment) and (self.uri, self.id) == (other.uri, other.id)

    def __hash__(self) -> int:
        return hash((self.uri, self.id))

    def __getstate__(self) -> dict:
        return {"id": self.id, "name": self.name, "uri": self.uri}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def client(self) -> Any:
        return client(self.uri)

    @property
    def info(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "id": self.id, "name": self.name, "uri": self.uri}

    def create_recorder(self, recorder_name: str | None = None, tags: Mapping[str, Any] | None = None) -> Recorder:
        """A new run, ``RUNNING``, with ``tags`` (values as strings)."""
        run = self.client.create_run(self.id, run_name=recorder_name, tags={str(k): _param_value(v) for k, v in (tags or {}).items()})
        return Recorder(self.id, run.info.run_id, self.uri, run.info.run_name)

    def get_recorder(self, recorder_id: str | None = None, recorder_name: str | None = None) -> Recorder:
        """The recorder with that id (or the newest one with that name)."""
        from mlflow.exceptions import MlflowException

        if recorder_id is not None:
            try:
                run = self.client.get_run(recorder_id)
            except MlflowException as exc:
                raise LoadObjectError(f"experiment {self.name!r}: no run {recorder_id}") from exc
            return Recorder(run.info.experiment_id, run.info.run_id, self.uri, run.info.run_name)
        if recorder_name is None:
            raise ConfigError("get_recorder needs recorder_id or recorder_name")
        runs = self.list_recorders(rtype=self.RT_L, filter_string=f"attributes.run_name = '{recorder_name}'")
        if not runs:
            raise LoadObjectError(f"experiment {self.name!r} has no run named {recorder_name!r}")
        return runs[0]

    def delete_recorder(self, recorder_id: str) -> None:
        self.client.delete_run(recorder_id)

    @overload
    def list_recorders(
        self, rtype: Literal["dict"] = ..., max_results: int | None = ..., status: str | None = ..., filter_string: str = ...
    ) -> dict[str, Recorder]: ...
    @overload
    def list_recorders(
        self, rtype: Literal["list"], max_results: int | None = ..., status: str | None = ..., filter_string: str = ...
    ) -> list[Recorder]: ...
    def list_recorders(
        self,
        rtype: Literal["dict", "list"] = RT_D,
        max_results: int | None = None,
        status: str | None = None,
        filter_string: str = "",
    ) -> dict[str, Recorder] | list[Recorder]:
        """The experiment's active runs, newest first (as MLflow orders them).

        ``status`` keeps runs in that status; ``filter_string`` is MLflow's search
        filter (``"tags.pool = 'p1'"``). Unlike Qlib there is no 50 000-run cap: pages
        are followed to the end (or to ``max_results``).
        """
        from mlflow.entities import ViewType

        if rtype not in (self.RT_D, self.RT_L):
            raise ConfigError(f"rtype must be {self.RT_D!r} or {self.RT_L!r}, got {rtype!r}")
        if status is not None:
            clause = f"attributes.status = '{status}'"
            filter_string = f"{filter_string} and {clause}" if filter_string else clause
        recs: list[Recorder] = []
        token = None
        while True:
            page_size = 1000 if max_results is None else min(1000, max_results - len(recs))
            if page_size <= 0:
                break
            page = self.client.search_runs(
                [self.id],
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=page_size,
                page_token=token,
            )
            recs.extend(Recorder(r.info.experiment_id, r.info.run_id, self.uri, r.info.run_name) for r in page)
            token = page.token
            if not token:
                break
        return {r.id: r for r in recs} if rtype == self.RT_D else recs


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock around experiment creation in a ``file:`` store (other stores
    enforce unique names themselves)."""
    root = _file_store_dir(uri)
    if root is None:
        yield
        return
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".qcelery-experiments.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def get_experiment(
    experiment_name: str,
    settings: Settings | None = None,
    *,
    tracking_uri: str | None = None,
    create: bool = True,
) -> Experiment:
    """The experiment named ``experiment_name`` in the store of ``tracking_uri`` (else
    ``settings.effective_tracking_uri``), created when missing unless ``create=False``."""
    from mlflow.exceptions import MlflowException

    if not isinstance(experiment_name, str) or not experiment_name.strip():
        raise ConfigError(f"experiment_name must be a non-empty string, got {experiment_name!r}")
    if tracking_uri is None:
        if settings is None:
            raise ConfigError("get_experiment needs settings or tracking_uri (qcelery has no global MLflow state)")
        tracking_uri = settings.effective_tracking_uri
    c = client(tracking_uri)
    try:
        exp = c.get_experiment_by_name(experiment_name)
        if exp is None or exp.lifecycle_stage != "active":
            if exp is not None:
                raise ConfigError(
                    f"experiment {experiment_name!r} in {mask_url(tracking_uri)} is deleted; restore it "
                    "(mlflow experiments restore) or use another name"
                )
            if not create:
                raise LoadObjectError(f"no experiment {experiment_name!r} in {mask_url(tracking_uri)}")
            with _store_lock(tracking_uri):
                exp = c.get_experiment_by_name(experiment_name)
                if exp is None:
                    try:
                        c.create_experiment(experiment_name, artifact_location=_artifact_location(tracking_uri))
                    except MlflowException as exc:  # another process created it meanwhile
                        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                            raise
                    exp = c.get_experiment_by_name(experiment_name)
    except MlflowException as exc:
        raise _mlflow_error(exc, f"experiment {experiment_name!r}", tracking_uri) from exc
    return Experiment(exp.experiment_id, exp.name, tracking_uri)


def recorder_from_tags(experiment: Experiment, **tags: str) -> list[Recorder]:
    """The experiment's recorders whose tags have these values (e.g. ``task_id=...``):
    how a task leads to its run."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    return experiment.list_recorders(rtype=Experiment.RT_L, filter_string=" and ".join(clauses))
