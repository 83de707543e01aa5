"""Records: what a trained task writes to its recorder (Qlib's ``record_temp``).

* :class:`SignalRecord`: the predictions of the ``test`` segment (``pred.pkl``, a
  one-column ``score`` DataFrame) and the raw labels (``label.pkl``);
* :class:`SigAnaRecord`: daily IC and Rank IC (``sig_analysis/ic.pkl``, ``ric.pkl``)
  and their means and IRs as metrics ``IC``, ``ICIR``, ``Rank IC``, ``Rank ICIR``;
* :class:`PortAnaRecord`: a daily long-short portfolio (mean label of the ``topk``
  best-scored instruments minus that of the ``topk`` worst), saved as
  ``portfolio_analysis/long_short_r.pkl`` with its risk table ``port_analysis.pkl``, and
  metrics ``long_short.annualized_return``, ``long_short.information_ratio``,
  ``long_short.max_drawdown`` and ``long_short.mean_return``.

Differences from Qlib: :class:`PortAnaRecord` does not run Qlib's backtest engine
(exchange, costs, positions); it scores the signal as a cost-free long-short book,
which needs nothing but the labels. Qlib's backtest ``config`` is refused with a
clear error rather than ignored. Records run inside
:func:`qcelery.trainer.task_train`, which names the record that raised.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError, LoadObjectError, RecordError
from .exp import Recorder

log = logging.getLogger(__name__)

__all__ = [
    "RecordTemp",
    "SignalRecord",
    "SigAnaRecord",
    "PortAnaRecord",
    "RecordError",
    "calc_ic",
    "long_short_return",
    "risk_analysis",
]


# ------------------------------------------------------------------ analysis
def calc_ic(pred: pd.Series, label: pd.Series, dropna: bool = False) -> tuple[pd.Series, pd.Series]:
    """Daily Pearson IC and Spearman Rank IC of ``pred`` against ``label``
    (both indexed by (datetime, instrument))."""
    df = pd.DataFrame({"pred": pred, "label": label}).dropna()
    by_day = df.groupby(level="datetime")
    ic = by_day.apply(lambda d: d["pred"].corr(d["label"]) if len(d) > 1 else np.nan)
    ric = by_day.apply(lambda d: d["pred"].rank().corr(d["label"].rank()) if len(d) > 1 else np.nan)
    if dropna:
        return ic.dropna(), ric.dropna()
    return ic, ric


def long_short_return(pred: pd.Series, label: pd.Series, topk: int) -> pd.Series:
    """Daily mean label of the ``topk`` highest-scored instruments minus that of the
    ``topk`` lowest (the label is the return from t+1 to t+2, so the book is tradable)."""
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1:
        raise ConfigError(f"topk must be an int >= 1, got {topk!r}")
    df = pd.DataFrame({"pred": pred, "label": label}).dropna()

    def day(d: pd.DataFrame) -> float:
        k = min(int(topk), len(d) // 2)
        if k < 1:
            return np.nan
        ranked = d.sort_values("pred")
        return ranked["label"].iloc[-k:].mean() - ranked["label"].iloc[:k].mean()

    return df.groupby(level="datetime").apply(day).rename("long_short")


def risk_analysis(returns: pd.Series, ann_scaler: int = 252) -> pd.Series:
    """Mean, std, annualised return, information ratio and max drawdown of daily
    returns, additive as in Qlib's ``risk_analysis(mode="sum")``."""
    r = returns.dropna()
    mean, std = r.mean(), r.std()
    cum = r.cumsum()
    drawdown = (cum - cum.cummax()).min() if len(r) else np.nan
    return pd.Series(
        {
            "mean_return": mean,
            "std": std,
            "annualized_return": mean * ann_scaler,
            "information_ratio": mean / std * np.sqrt(ann_scaler) if std and std > 0 else np.nan,
            "max_drawdown": drawdown,
        }
    )


def _ir(series: pd.Series) -> float:
    std = series.std()
    return float(series.mean() / std) if std and std > 0 else float("nan")


# ------------------------------------------------------------------ records
class RecordTemp:
    """Base of the records (Qlib's ``RecordTemp``): ``generate()`` computes and saves
    under ``artifact_path``; ``load(name)`` reads what this record or the one it
    depends on (``depend_cls``) saved; ``list()`` names the artifacts; ``check()``
    raises ``FileNotFoundError`` if some are missing."""

    artifact_path: str | None = None
    depend_cls: type[RecordTemp] | None = None

    def __init__(self, recorder: Recorder | None = None):
        self._recorder = recorder

    @property
    def recorder(self) -> Recorder:
        if self._recorder is None:
            raise ConfigError(f"{type(self).__name__} has no recorder; pass recorder=...")
        return self._recorder

    @classmethod
    def get_path(cls, path: str | None = None) -> str:
        return "/".join(p for p in (cls.artifact_path, path) if p)

    def save(self, **kwargs: Any) -> None:
        self.recorder.save_objects(artifact_path=self.get_path() or None, **kwargs)

    def load(self, name: str, parents: bool = True) -> Any:
        try:
            return self.recorder.load_object(self.get_path(name))
        except LoadObjectError:
            if parents and self.depend_cls is not None:
                return self.recorder.load_object(self.depend_cls.get_path(name))
            raise

    def generate(self, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.generate")

    def list(self) -> list[str]:
        return []

    def check(self, include_self: bool = False, parents: bool = True) -> None:
        wanted: list[str] = []
        if include_self:
            wanted += [self.get_path(p) for p in self.list()]
        if parents and self.depend_cls is not None:
            dep = self.depend_cls.__new__(self.depend_cls)  # list() of the records here needs no state
            wanted += [self.depend_cls.get_path(p) for p in dep.list()]
        by_dir: dict[str, set[str]] = {}
        for path in wanted:
            folder = path.rpartition("/")[0]
            if folder not in by_dir:
                by_dir[folder] = set(self.recorder.list_artifacts(folder or None))
            if path not in by_dir[folder]:
                raise FileNotFoundError(f"run {self.recorder.id} has no artifact {path!r}")


class SignalRecord(RecordTemp):
    """Predictions of the dataset's ``test`` segment and their raw labels."""

    def __init__(self, model: Any = None, dataset: Any = None, recorder: Recorder | None = None):
        super().__init__(recorder)
        self.model = model
        self.dataset = dataset

    def generate(self, **kwargs: Any) -> None:
        if self.model is None or self.dataset is None:
            raise ConfigError("SignalRecord needs model and dataset (kwargs model: <MODEL>, dataset: <DATASET>)")
        pred = self.model.predict(self.dataset)
        if isinstance(pred, pd.Series):
            pred = pred.to_frame("score")
        label = self.dataset.prepare("test", col_set="label", data_key="raw")
        self.save(**{"pred.pkl": pred, "label.pkl": label})
        log.info("SignalRecord: %d predictions saved to run %s", len(pred), self.recorder.id)

    def list(self) -> list[str]:
        return ["pred.pkl", "label.pkl"]


class _Analysis(RecordTemp):
    """Records that read ``pred.pkl`` / ``label.pkl`` (Qlib's ``ACRecordTemp``)."""

    depend_cls = SignalRecord

    def __init__(self, recorder: Recorder | None = None, skip_existing: bool = False, label_col: int = 0):
        super().__init__(recorder)
        self.skip_existing = skip_existing
        self.label_col = label_col

    def _pred_label(self) -> tuple[pd.Series, pd.Series]:
        pred = self.load("pred.pkl")
        label = self.load("label.pkl")
        if not isinstance(label, pd.DataFrame) or label.empty:
            raise ConfigError(f"run {self.recorder.id}: label.pkl is empty; SignalRecord must run first on a labelled test segment")
        return pred.iloc[:, 0], label.iloc[:, self.label_col]

    def generate(self, **kwargs: Any) -> dict | None:
        if self.skip_existing:
            try:
                self.check(include_self=True, parents=False)
                log.info("%s: results exist in run %s; skipped", type(self).__name__, self.recorder.id)
                return None
            except FileNotFoundError:
                pass
        objects = self._generate(**kwargs)
        self.save(**objects)
        return objects

    def _generate(self, **kwargs: Any) -> dict:
        raise NotImplementedError


class SigAnaRecord(_Analysis):
    """IC / ICIR / Rank IC / Rank ICIR of the signal (and, with ``ana_long_short``,
    the long-short and long-average returns, as in Qlib)."""

    artifact_path = "sig_analysis"

    def __init__(
        self,
        recorder: Recorder | None = None,
        ana_long_short: bool = False,
        ann_scaler: int = 252,
        label_col: int = 0,
        skip_existing: bool = False,
        topk: int | None = None,
    ):
        super().__init__(recorder, skip_existing, label_col)
        self.ana_long_short = ana_long_short
        self.ann_scaler = ann_scaler
        self.topk = topk

    def _generate(self, **kwargs: Any) -> dict:
        pred, label = self._pred_label()
        ic, ric = calc_ic(pred, label)
        metrics = {"IC": ic.mean(), "ICIR": _ir(ic), "Rank IC": ric.mean(), "Rank ICIR": _ir(ric)}
        objects: dict[str, Any] = {"ic.pkl": ic, "ric.pkl": ric}
        if self.ana_long_short:
            # Qlib's calc_long_short_return takes the top / bottom 20%
            n = pred.groupby(level="datetime").size().median()
            ls = long_short_return(pred, label, self.topk or max(1, int(n * 0.2)))
            long_avg = label.groupby(level="datetime").mean()
            metrics.update(
                {
                    "Long-Short Ann Return": ls.mean() * self.ann_scaler,
                    "Long-Short Ann Sharpe": _ir(ls) * self.ann_scaler**0.5,
                }
            )
            objects.update({"long_short_r.pkl": ls, "long_avg_r.pkl": long_avg})
        self.recorder.log_metrics(step=None, **metrics)
        return objects

    def list(self) -> list[str]:
        return ["ic.pkl", "ric.pkl"] + (["long_short_r.pkl", "long_avg_r.pkl"] if self.ana_long_short else [])


class PortAnaRecord(_Analysis):
    """A cost-free daily long-short book: the ``topk`` best-scored instruments long,
    the ``topk`` worst short, equal weights (see the module doc for how this differs
    from Qlib's backtest)."""

    artifact_path = "portfolio_analysis"
    METRIC_PREFIX = "long_short"

    def __init__(
        self,
        recorder: Recorder | None = None,
        topk: int = 10,
        ann_scaler: int = 252,
        label_col: int = 0,
        skip_existing: bool = False,
        config: Any = None,
    ):
        super().__init__(recorder, skip_existing, label_col)
        if config is not None:
            raise ConfigError(
                "PortAnaRecord config=...: qcelery's PortAnaRecord scores a long-short book from the labels and takes "
                "topk, ann_scaler, label_col and skip_existing; Qlib's strategy/backtest config is not supported"
            )
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ConfigError(f"PortAnaRecord topk must be an int >= 1, got {topk!r}")
        self.topk = topk
        self.ann_scaler = ann_scaler

    def _generate(self, **kwargs: Any) -> dict:
        pred, label = self._pred_label()
        ls = long_short_return(pred, label, self.topk)
        analysis = risk_analysis(ls, self.ann_scaler)
        self.recorder.log_metrics(**{f"{self.METRIC_PREFIX}.{k}": v for k, v in analysis.items() if pd.notna(v)})
        return {"long_short_r.pkl": ls, "port_analysis.pkl": analysis.to_frame("risk")}

    def list(self) -> list[str]:
        return ["long_short_r.pkl", "port_analysis.pkl"]
