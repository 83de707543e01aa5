"""The model interface: Qlib's ``Model`` (``fit(dataset)``, ``predict(dataset, segment)``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..serial import Serializable

__all__ = ["Model", "learn_xy"]


class Model(Serializable):
    """A model trained on a :class:`~qcelery.data.DatasetH` (Qlib's ``qlib.model.base.Model``).

    ``fit(dataset)`` learns from the ``train`` segment (and ``valid`` where the model
    uses one); ``predict(dataset, segment="test")`` returns a ``pd.Series`` of scores
    indexed by (datetime, instrument). Unfitted models raise
    :class:`~qcelery.errors.ConfigError` from ``predict``.
    """

    def fit(self, dataset: Any, **kwargs: Any) -> Model:
        raise NotImplementedError

    def predict(self, dataset: Any, segment: str | slice = "test") -> pd.Series:
        raise NotImplementedError

    def _check_fitted(self, attr: str) -> None:
        if getattr(self, attr, None) is None:
            raise ConfigError(f"{type(self).__name__} is not fitted: call fit(dataset) before predict")


def learn_xy(dataset: Any, segment: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features and label of ``segment`` from the dataset's learn view (rows with a label)."""
    df = dataset.prepare(segment, col_set=["feature", "label"], data_key="learn")
    if df.empty:
        raise ConfigError(f"segment {segment!r} of the dataset holds no labelled row; check its dates")
    x = df["feature"].to_numpy(dtype=np.float64)
    y = df["label"].to_numpy(dtype=np.float64)[:, 0]
    keep = np.isfinite(y)
    return x[keep], y[keep], list(df["feature"].columns)


def infer_frame(dataset: Any, segment: str | slice) -> pd.DataFrame:
    x: pd.DataFrame = dataset.prepare(segment, col_set="feature", data_key="infer")
    if x.empty:
        raise ConfigError(f"segment {segment!r} of the dataset holds no row to predict; check its dates")
    return x
