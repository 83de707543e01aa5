"""``LinearModel``: ridge regression in numpy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError
from .base import Model, infer_frame, learn_xy

__all__ = ["LinearModel"]


class LinearModel(Model):
    """Ridge regression ``min |y - Xw - b|^2 + alpha |w|^2`` on the ``train`` segment.

    Qlib's ``LinearModel`` wraps scikit-learn (OLS / NNLS / ridge / lasso); this one is
    ridge only (``alpha=0`` is least squares), solved in closed form with numpy, with
    the intercept left unpenalised. ``fit`` ignores ``valid``, as Qlib's does.
    """

    def __init__(self, alpha: float = 1.0, fit_intercept: bool = True):
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
            raise ConfigError(f"LinearModel alpha must be a number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.fit_intercept = bool(fit_intercept)
        self.coef_: np.ndarray | None = None
        self.intercept_ = 0.0
        self.features: list[str] | None = None

    def fit(self, dataset: Any, **kwargs: Any) -> LinearModel:
        x, y, self.features = learn_xy(dataset, "train")
        if self.fit_intercept:
            xm, ym = x.mean(axis=0), y.mean()
            xc, yc = x - xm, y - ym
        else:
            xm, ym, xc, yc = np.zeros(x.shape[1]), 0.0, x, y
        gram = xc.T @ xc + self.alpha * np.eye(x.shape[1])
        self.coef_ = np.linalg.lstsq(gram, xc.T @ yc, rcond=None)[0]
        self.intercept_ = float(ym - xm @ self.coef_)
        return self

    def predict(self, dataset: Any, segment: str | slice = "test") -> pd.Series:
        self._check_fitted("coef_")
        x = infer_frame(dataset, segment)
        if self.features is not None and list(x.columns) != self.features:
            raise ConfigError(f"LinearModel was fitted on features {self.features}, the dataset has {list(x.columns)}")
        return pd.Series(x.to_numpy(dtype=np.float64) @ self.coef_ + self.intercept_, index=x.index, name="score")
