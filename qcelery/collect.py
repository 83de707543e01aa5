"""Collecting results: Qlib's collectors and processors, and the batch summary.

``RecorderCollector`` gathers artifacts of an experiment's recorders into
``{artifact_key: {rec_key: object}}``; processors such as :class:`RollingGroup`
(which joins rolling windows into one continuous series per model) and
:class:`AverageEnsemble` reduce them, as in Qlib's ``qlib.workflow.task.collect`` and
``qlib.model.ens``. :func:`summarize_batch` is what a batch's aggregation runs: a
per-task metrics table, each model's rolling predictions joined and scored as a whole,
a model comparison table (like Qlib's ``run_all_model.py``), logged as one summary
MLflow run with CSV tables, PNG plots and an HTML report.

Differences from Qlib:

* ``RecorderCollector("name")`` finds the experiment in the tracking store of
  ``settings`` (default: read from the environment, as the trainers do; there is no
  global ``R``); artifacts are decoded through the restricted unpickler
  (``allowed_modules`` adds trusted modules);
* :func:`list_recorders` is Qlib's ``qlib.workflow.task.utils.list_recorders``;
* processors run in this process (``n_jobs`` is accepted and ignored: joblib is not a
  dependency); a non-tuple key given to :class:`RollingGroup` raises
  :class:`~qcelery.errors.TaskTypeError` naming it;
* mutable default arguments are gone (``process_list=()``, ``list_kwargs=None``).
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import status as st
from .errors import ConfigError, TaskTypeError
from .exp import Experiment, LoadObjectError, Recorder, client, get_experiment
from .records import calc_ic, long_short_return, risk_analysis
from .serial import Serializable
from .settings import Settings, load_settings, mask_url

log = logging.getLogger(__name__)

__all__ = [
    "Collector",
    "MergeCollector",
    "RecorderCollector",
    "Group",
    "RollingGroup",
    "Ensemble",
    "RollingEnsemble",
    "AverageEnsemble",
    "SingleKeyEnsemble",
    "summarize_batch",
    "list_recorders",
]


def list_recorders(
    experiment: Experiment | str, rec_filter_func: Callable[[Recorder], bool] | None = None, *, settings: Settings | None = None
) -> dict[str, Recorder]:
    """``{run id: recorder}`` of the experiment's runs that ``rec_filter_func`` keeps (all
    when ``None``), as Qlib's ``qlib.workflow.task.utils.list_recorders``. ``experiment``
    is an :class:`~qcelery.exp.Experiment` or its name, looked up in the tracking store
    of ``settings`` (default: read from the environment)."""
    if isinstance(experiment, str):
        experiment = get_experiment(experiment, settings if settings is not None else load_settings(), create=False)
    if not isinstance(experiment, Experiment):
        raise TaskTypeError(f"experiment must be an Experiment or its name, got {type(experiment).__name__}")
    recs = experiment.list_recorders(rtype=Experiment.RT_D)
    return {rid: rec for rid, rec in recs.items() if rec_filter_func is None or rec_filter_func(rec)}


# ---------------------------------------------------------------- collectors
class Collector(Serializable):
    """Collects results into a dict and runs processors over each value (Qlib's ``Collector``).

    Pickles with dill (``to_pickle`` / ``load``), so key and filter functions, lambdas
    included, travel with it."""

    pickle_backend = "dill"

    def __init__(self, process_list: Iterable[Callable] | Callable = ()):
        super().__init__()
        self.process_list = list(process_list) if not callable(process_list) else [process_list]

    def collect(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__}.collect")

    @staticmethod
    def process_collect(collected_dict: Mapping, process_list: Iterable[Callable] | Callable = (), *args: Any, **kwargs: Any) -> dict:
        """Apply each processor, in order, to every value of ``collected_dict``."""
        processes = [process_list] if callable(process_list) else list(process_list)
        for p in processes:
            if not callable(p):
                raise TaskTypeError(f"processor {p!r} is not callable")
        result = {}
        for key, value in collected_dict.items():
            for p in processes:
                value = p(value, *args, **kwargs)
            result[key] = value
        return result

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return self.process_collect(self.collect(), self.process_list, *args, **kwargs)


class MergeCollector(Collector):
    """The results of several collectors in one dict, keyed ``(collector_key, key)``
    or ``merge_func(collector_key, key)``."""

    def __init__(
        self,
        collector_dict: Mapping[str, Collector],
        process_list: Iterable[Callable] | Callable = (),
        merge_func: Callable[[str, Any], Any] | None = None,
    ):
        super().__init__(process_list)
        self.collector_dict = dict(collector_dict)
        self.merge_func = merge_func

    def collect(self) -> dict:
        merged = {}
        for ckey, collector in self.collector_dict.items():
            for key, value in collector().items():
                merged[self.merge_func(ckey, key) if self.merge_func else (ckey, key)] = value
        return merged


class RecorderCollector(Collector):
    """Artifacts of an experiment's recorders: ``{artifact_key: {rec_key: object}}``.

    ``experiment``: an :class:`~qcelery.exp.Experiment`, its name (with ``settings``),
    or a callable returning recorders. ``rec_key_func(rec)`` names each recorder
    (default: its id); ``rec_filter_func(rec)`` keeps some; ``artifacts_path`` maps
    keys to artifact paths (default ``{"pred": "pred.pkl"}``); ``artifacts_key``
    chooses among them (``ART_KEY_RAW`` collects the recorder itself); ``list_kwargs``
    go to ``list_recorders``; ``status`` keeps recorders in those statuses (``None``:
    all).
    """

    ART_KEY_RAW = "__raw"

    def __init__(
        self,
        experiment: Experiment | str | Callable[[], Iterable[Recorder]],
        process_list: Iterable[Callable] | Callable = (),
        rec_key_func: Callable[[Recorder], Any] | None = None,
        rec_filter_func: Callable[[Recorder], bool] | None = None,
        artifacts_path: Mapping[str, str] | None = None,
        artifacts_key: str | list[str] | None = None,
        list_kwargs: Mapping[str, Any] | None = None,
        status: Iterable[str] | None = frozenset({Recorder.STATUS_FI}),
        *,
        settings: Any = None,
        allowed_modules: Iterable[str] = (),
    ):
        super().__init__(process_list)
        if isinstance(experiment, str):
            settings = settings if settings is not None else load_settings()
            experiment = get_experiment(experiment, settings, create=False)
        if not isinstance(experiment, Experiment) and not callable(experiment):
            raise TaskTypeError(f"experiment must be an Experiment, its name or a callable, got {type(experiment).__name__}")
        self.experiment = experiment
        self.artifacts_path = dict(artifacts_path) if artifacts_path is not None else {"pred": "pred.pkl"}
        self.rec_key_func = rec_key_func if rec_key_func is not None else _recorder_id
        self.rec_filter_func = rec_filter_func
        self.artifacts_key = artifacts_key if artifacts_key is not None else list(self.artifacts_path)
        self.list_kwargs = dict(list_kwargs or {})
        self.status = None if status is None else ({status} if isinstance(status, str) else set(status))
        self.allowed_modules = tuple(allowed_modules) if allowed_modules else tuple(getattr(settings, "allowed_modules", ()) or ())

    def _recorders(self) -> list[Recorder]:
        if isinstance(self.experiment, Experiment):
            return list(self.experiment.list_recorders(rtype=Experiment.RT_L, **self.list_kwargs))
        return list(self.experiment())

    def collect(
        self,
        artifacts_key: str | list[str] | None = None,
        rec_filter_func: Callable[[Recorder], bool] | None = None,
        only_exist: bool = True,
    ) -> dict:
        """Collect; ``only_exist=True`` skips recorders missing an artifact (with a
        warning) where ``False`` raises :class:`~qcelery.exp.LoadObjectError`."""
        keys = artifacts_key if artifacts_key is not None else self.artifacts_key
        keys = [keys] if isinstance(keys, str) else list(keys)
        unknown = [k for k in keys if k != self.ART_KEY_RAW and k not in self.artifacts_path]
        if unknown:
            raise ConfigError(f"artifacts_key {unknown[0]!r} is not in artifacts_path {sorted(self.artifacts_path)}")
        rec_filter_func = rec_filter_func if rec_filter_func is not None else self.rec_filter_func
        recs = [
            r
            for r in self._recorders()
            if (self.status is None or r.status in self.status) and (rec_filter_func is None or rec_filter_func(r))
        ]
        log.info("RecorderCollector: %d recorders after filtering", len(recs))
        collected: dict[str, dict] = {}
        for rec in recs:
            rec_key = self.rec_key_func(rec)
            for key in keys:
                if key == self.ART_KEY_RAW:
                    value = rec
                else:
                    try:
                        value = rec.load_object(self.artifacts_path[key], allowed_modules=self.allowed_modules)
                    except LoadObjectError:
                        if not only_exist:
                            raise
                        log.warning("run %s has no loadable %s; skipped", rec.id, self.artifacts_path[key])
                        continue
                bucket = collected.setdefault(key, {})
                if rec_key in bucket:
                    log.warning("key %r is duplicated: run %s overrides an earlier one (check rec_key_func)", rec_key, rec.id)
                bucket[rec_key] = value
        return collected

    def get_exp_name(self) -> str:
        return self.experiment.name if isinstance(self.experiment, Experiment) else getattr(self.experiment, "__name__", "?")


def _recorder_id(rec: Recorder) -> str:
    return rec.id


# ---------------------------------------------------------------- processors
class Ensemble:
    """Merges a dict of objects into one (Qlib's ``Ensemble``)."""

    def __call__(self, ensemble_dict: Mapping, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class SingleKeyEnsemble(Ensemble):
    """``{only_key: value}`` -> ``value`` (recursively); other dicts are left alone."""

    def __call__(self, ensemble_dict: Any, recursion: bool = True) -> Any:
        if not isinstance(ensemble_dict, Mapping):
            return ensemble_dict
        if recursion:
            ensemble_dict = {k: self(v, recursion) for k, v in ensemble_dict.items()}
        return next(iter(ensemble_dict.values())) if len(ensemble_dict) == 1 else ensemble_dict


def _first_day(obj: Any) -> pd.Timestamp:
    idx = obj.index
    days = idx.get_level_values("datetime") if "datetime" in (idx.names or []) else idx
    return pd.Timestamp(days.min())


class RollingEnsemble(Ensemble):
    """Join rolling windows' frames (indexed by datetime) into one: sorted by their
    first day, where windows overlap the later window wins, then sorted by index."""

    def __call__(self, ensemble_dict: Mapping) -> Any:
        parts = sorted(ensemble_dict.values(), key=_first_day)
        if not parts:
            raise ConfigError("RollingEnsemble got no window to join")
        joined = pd.concat(parts)
        return joined[~joined.index.duplicated(keep="last")].sort_index()


def _flatten(d: Mapping, prefix: tuple = ()) -> dict:
    out = {}
    for k, v in d.items():
        key = prefix + (k if isinstance(k, tuple) else (k,))
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


class AverageEnsemble(Ensemble):
    """Average several models' scores: each z-scored across instruments day by day,
    then the mean per (datetime, instrument). Nested dicts are flattened first."""

    def __call__(self, ensemble_dict: Mapping) -> pd.Series:
        values = list(_flatten(ensemble_dict).values())
        if not values:
            raise ConfigError("AverageEnsemble got nothing to average")
        frame = pd.concat([v.iloc[:, 0] if isinstance(v, pd.DataFrame) else v for v in values], axis=1)
        by_day = frame.groupby(level="datetime")
        z = (frame - by_day.transform("mean")) / by_day.transform("std")
        return z.mean(axis=1).sort_index()


class Group:
    """Group a dict (``group_func``), then reduce each group with ``ens`` (Qlib's ``Group``)."""

    def __init__(self, group_func: Callable[[Mapping], dict] | None = None, ens: Callable | None = None):
        self._group_func = group_func
        self._ens_func = ens

    def group(self, *args: Any, **kwargs: Any) -> dict:
        if self._group_func is None:
            raise NotImplementedError(f"{type(self).__name__} needs a group_func")
        return self._group_func(*args, **kwargs)

    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        if self._ens_func is None:
            raise NotImplementedError(f"{type(self).__name__} needs an ens to reduce groups")
        return self._ens_func(*args, **kwargs)

    def __call__(self, ungrouped_dict: Mapping, n_jobs: int = 1, verbose: int = 0, *args: Any, **kwargs: Any) -> dict:
        grouped = self.group(ungrouped_dict, *args, **kwargs)
        return {key: self.reduce(value) for key, value in grouped.items()}


class RollingGroup(Group):
    """``{(model, window): frame}`` -> ``{(model,): joined frame}``: the last element of
    each key is the rolling window; the windows of each group are joined by
    :class:`RollingEnsemble` (no overlapping days)."""

    def __init__(self, ens: Callable | None = None):
        super().__init__(ens=ens if ens is not None else RollingEnsemble())

    def group(self, rolling_dict: Mapping) -> dict:
        grouped: dict = {}
        for key, value in rolling_dict.items():
            if not isinstance(key, tuple):
                raise TaskTypeError(
                    f"RollingGroup needs tuple keys ending with the rolling window, got {key!r} "
                    "(return e.g. (model, test_segment) from rec_key_func)"
                )
            grouped.setdefault(key[:-1], {})[key[-1]] = value
        return grouped


# ---------------------------------------------------------------- the batch summary
_TASK_METRICS = (
    "IC",
    "ICIR",
    "Rank IC",
    "Rank ICIR",
    "long_short.annualized_return",
    "long_short.information_ratio",
    "long_short.max_drawdown",
)


def _clean(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d")
    return value


def _records(df: pd.DataFrame) -> list[dict]:
    return [{k: _clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def _model_label(task: Mapping) -> str:
    model = task.get("model") or {}
    if model.get("name"):
        return str(model["name"])
    klass = model.get("class", "?")
    return klass.rpartition(".")[2] if isinstance(klass, str) else getattr(klass, "__name__", str(klass))


def _topk(task: Mapping, default: int = 10) -> int:
    for record in task.get("record") or []:
        if isinstance(record, Mapping) and str(record.get("class", "")).endswith("PortAnaRecord"):
            return int((record.get("kwargs") or {}).get("topk", default))
    return default


def _batch_recorders(manager: Any, batch: Mapping) -> tuple[list[tuple[str, Recorder]], list[dict]]:
    recs, failures = [], []
    # the batch's tasks by their batch id, oldest first (the order they were created in)
    for task in manager.query({"batch_ids": batch["_id"]}):
        if task["status"] == st.FAILED:
            err = (task.get("error") or "").strip().splitlines()
            failures.append({"task_id": str(task["_id"]), "error": err[-1] if err else ""})
        elif isinstance(task.get("res"), Recorder):
            recs.append((str(task["_id"]), task["res"]))
    recs.sort(key=lambda item: item[0])
    return recs, failures


def _figure(width: float = 8, height: float = 4) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # render with Agg, without touching pyplot's global backend
    return fig, fig.add_subplot(1, 1, 1)


def _plot_ic_by_window(tasks: pd.DataFrame, path: Path) -> None:
    fig, ax = _figure()
    for model, rows in tasks.groupby("model"):
        rows = rows.sort_values("test_start")
        ax.plot(pd.to_datetime(rows["test_start"]), rows["IC"], marker="o", label=str(model))
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_title("IC by rolling window")
    ax.set_xlabel("window test start")
    ax.set_ylabel("IC")
    ax.legend(loc="best", fontsize="small")
    fig.autofmt_xdate()
    fig.savefig(path)


def _plot_cumulative(long_short: Mapping[str, pd.Series], path: Path) -> None:
    fig, ax = _figure()
    for model, series in long_short.items():
        ax.plot(series.index, series.cumsum(), label=str(model))
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_title("Cumulative long-short return (top-k minus bottom-k, no costs)")
    ax.set_ylabel("cumulative return")
    ax.legend(loc="best", fontsize="small")
    fig.autofmt_xdate()
    fig.savefig(path)


def _html_report(title: str, tables: Mapping[str, pd.DataFrame], plots: Mapping[str, Path], path: Path) -> None:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for name, table in tables.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(table.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}") if len(table) else "<p>none</p>")
    for name, plot in plots.items():
        data = base64.b64encode(plot.read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def summarize_batch(
    recorders: Any,
    *,
    experiment_name: str | None = None,
    batch_id: str | None = None,
    settings: Any = None,
    failures: list[dict] | None = None,
    batch: Mapping | None = None,
    summary: Mapping | None = None,
) -> dict:
    """Summarise a batch of trained tasks; returns a small JSON-able dict.

    ``recorders``: the batch's recorders in task order, or the pool's ``TaskManager``
    (the chord body's call; the recorders and failures are then read from the batch
    document ``batch``). Builds a per-task metrics table, joins each model's rolling
    predictions (:class:`RollingGroup`) and scores them over the whole test span, and a
    model comparison table; logs them in one run of experiment
    ``<experiment_name>.summary`` (``models.csv``, ``tasks.csv``, ``failures.csv``,
    ``ic_by_window.png``, ``cumulative_long_short.png``, ``report.html``), and writes
    the same files under ``<run_dir>/reports/<batch_id>/``.

    Returns ``{"summary_run_id", "experiment_name", "report_path", "plots", "models",
    "tasks", "failures"}``.
    """
    task_ids: dict[str, str] = {}
    if hasattr(recorders, "task_pool") and hasattr(recorders, "settings"):  # a TaskManager
        manager = recorders
        settings = settings or manager.settings
        batch = batch or {}
        batch_id = batch_id or (str(batch["_id"]) if batch.get("_id") is not None else None)
        pairs, pool_failures = _batch_recorders(manager, batch)
        recorders = [rec for _, rec in pairs]
        task_ids = {rec.id: tid for tid, rec in pairs}
        if failures is None:
            failures = list((summary or {}).get("failures") or pool_failures)
    if settings is None:
        raise ConfigError("summarize_batch needs settings (run_dir for the report, the MLflow tracking URI)")
    recorders = [r for r in recorders if isinstance(r, Recorder)]
    failures = [dict(f) for f in (failures or [])]
    if experiment_name is None and recorders:
        experiment_name = client(recorders[0].uri).get_experiment(recorders[0].experiment_id).name
    if not experiment_name:
        raise ConfigError("summarize_batch needs experiment_name when there is no recorder to take it from")

    tasks_by_run: dict[str, Mapping] = {}
    rows = []
    for rec in recorders:
        task = rec.load_object("task", allowed_modules=settings.allowed_modules)
        tasks_by_run[rec.id] = task
        tags, metrics = rec.list_tags(), rec.list_metrics()
        test = task["dataset"]["kwargs"]["segments"].get("test", (None, None))
        row = {
            "task_id": task_ids.get(rec.id) or tags.get("task_id", ""),
            "model": _model_label(task),
            "test_start": _clean(pd.Timestamp(test[0])) if test[0] is not None else None,
            "test_end": _clean(pd.Timestamp(test[1])) if test[1] is not None else None,
            "run_id": rec.id,
            "status": rec.status,
        }
        row.update({m: metrics.get(m) for m in _TASK_METRICS})
        rows.append(row)
    tasks_df = pd.DataFrame(rows, columns=["task_id", "model", "test_start", "test_end", "run_id", "status", *_TASK_METRICS])

    collector = RecorderCollector(
        experiment=lambda: recorders,
        process_list=RollingGroup(),
        rec_key_func=lambda rec: (
            _model_label(tasks_by_run[rec.id]),
            str(tasks_by_run[rec.id]["dataset"]["kwargs"]["segments"].get("test")),
        ),
        artifacts_path={"pred": "pred.pkl", "label": "label.pkl"},
        allowed_modules=settings.allowed_modules,
    )
    joined = collector() if recorders else {}
    model_rows, long_short = [], {}
    for (model,), pred in sorted((joined.get("pred") or {}).items()):
        label = (joined.get("label") or {}).get((model,))
        if label is None:
            continue
        pred_s, label_s = pred.iloc[:, 0], label.iloc[:, 0].reindex(pred.index)
        ic, ric = calc_ic(pred_s, label_s)
        topk = _topk(next(t for rid, t in tasks_by_run.items() if _model_label(t) == model))
        ls = long_short_return(pred_s, label_s, topk)
        long_short[model] = ls
        risk = risk_analysis(ls)
        windows = tasks_df[tasks_df["model"] == model]
        days = pred.index.get_level_values("datetime")
        model_rows.append(
            {
                "model": model,
                "n_tasks": int(len(windows)),
                "test_start": days.min(),
                "test_end": days.max(),
                "IC": ic.mean(),
                "ICIR": ic.mean() / ic.std() if ic.std() > 0 else np.nan,
                "Rank IC": ric.mean(),
                "Rank ICIR": ric.mean() / ric.std() if ric.std() > 0 else np.nan,
                "IC_window_mean": windows["IC"].astype(float).mean(),
                "IC_window_std": windows["IC"].astype(float).std(),
                "annualized_return": risk["annualized_return"],
                "information_ratio": risk["information_ratio"],
                "max_drawdown": risk["max_drawdown"],
                "topk": topk,
            }
        )
    models_df = pd.DataFrame(model_rows)
    failures_df = pd.DataFrame(failures, columns=sorted({k for f in failures for k in f} or {"task_id", "error"}))

    summary_exp = get_experiment(f"{experiment_name}.summary", settings)
    run = summary_exp.create_recorder(
        f"summary-{batch_id}" if batch_id else "summary",
        tags={"batch_id": batch_id or "", "experiment": experiment_name, "n_runs": len(recorders), "n_failed": len(failures)},
    )
    out_dir = Path(settings.run_dir).resolve() / "reports" / (batch_id or run.id)
    out_dir.mkdir(parents=True, exist_ok=True)
    models_df.to_csv(out_dir / "models.csv", index=False)
    tasks_df.to_csv(out_dir / "tasks.csv", index=False)
    failures_df.to_csv(out_dir / "failures.csv", index=False)
    plots = {"IC by rolling window": out_dir / "ic_by_window.png", "Cumulative long-short return": out_dir / "cumulative_long_short.png"}
    _plot_ic_by_window(tasks_df.dropna(subset=["IC", "test_start"]), plots["IC by rolling window"])
    _plot_cumulative(long_short, plots["Cumulative long-short return"])
    report = out_dir / "report.html"
    _html_report(
        f"{experiment_name}: batch {batch_id or run.id}",
        {"Model comparison": models_df, "Tasks": tasks_df, "Failures": failures_df},
        plots,
        report,
    )
    run.save_objects(local_path=out_dir)
    for _, model_row in models_df.iterrows():
        run.log_metrics(
            **{
                f"{model_row['model']}.{k}": model_row[k]
                for k in ("IC", "ICIR", "Rank IC", "Rank ICIR", "annualized_return", "information_ratio")
                if pd.notna(model_row[k])
            }
        )
    run.end_run(Recorder.STATUS_FI)
    log.info("batch %s: summary run %s, report %s", batch_id, run.id, report)
    return {
        "summary_run_id": run.id,
        "experiment_name": summary_exp.name,
        "report_path": str(report),
        "plots": {name: str(p) for name, p in plots.items()},
        "models": _records(models_df),
        "tasks": _records(tasks_df),
        "failures": [{k: _clean(v) for k, v in f.items()} for f in failures],
    }


def local_report(summary: Mapping[str, Any], settings: Settings) -> dict:
    """``summary`` with its report and plots as files on this host.

    The aggregation writes them under the run directory of whichever worker ran it, on
    whichever machine; its summary names those paths. Unless they are files under this
    run directory, the summary run's artifacts (the same files) are downloaded from
    MLflow into ``<run_dir>/reports/<batch>/`` of these settings and the paths point there."""
    out = dict(summary)
    report, run_id = summary.get("report_path"), summary.get("summary_run_id")
    if not report or not run_id:
        return out
    plots = dict(summary.get("plots") or {})
    here = Path(settings.run_dir).resolve()
    # a path under another run directory may be readable here (a shared disk) or not, or
    # be another machine's path that happens to exist: only this run directory is ours
    if all(Path(p).is_file() and Path(p).resolve().is_relative_to(here) for p in [report, *plots.values()]):
        return out
    import mlflow.artifacts

    dest = here / "reports" / Path(report).parent.name
    dest.mkdir(parents=True, exist_ok=True)
    uri = settings.effective_tracking_uri
    client(uri)  # MLflow's environment for this URI (a file store needs its opt-in)
    try:
        mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(dest), tracking_uri=uri)
    except Exception as exc:  # MLflow raises its own exceptions and OSError alike
        raise LoadObjectError(f"report of summary run {run_id} could not be downloaded from {mask_url(uri)}: {exc}") from exc
    out["report_path"] = str(dest / Path(report).name)
    out["plots"] = {name: str(dest / Path(p).name) for name, p in plots.items()}
    return out
