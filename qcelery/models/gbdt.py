"""``LGBModel``: gradient boosting with LightGBM (the optional ``lgb`` extra)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import ConfigError
from .base import Model, infer_frame, learn_xy

if TYPE_CHECKING:
    from lightgbm import Booster

log = logging.getLogger(__name__)

__all__ = ["LGBModel", "lightgbm_available"]

_LOSSES = {"mse": "regression", "binary": "binary"}


def lightgbm_available() -> bool:
    try:
        import lightgbm  # noqa: F401 - only whether it imports
    except ImportError:
        return False
    return True


def _lightgbm() -> Any:
    try:
        import lightgbm
    except ImportError:
        raise ConfigError("LGBModel needs LightGBM: pip install 'qcelery[lgb]' (or lightgbm)") from None
    return lightgbm


class LGBModel(Model):
    """LightGBM regressor fitted on ``train`` with early stopping on ``valid`` (Qlib's ``LGBModel``).

    ``loss`` is ``"mse"`` (or ``"binary"``); every other keyword is a LightGBM
    parameter (``learning_rate``, ``num_leaves``, ``num_threads``, ``lambda_l1``...).
    As in Qlib, ``num_boost_round`` caps the rounds and ``early_stopping_rounds`` stops
    when ``valid`` has not improved for that many. The fitted booster pickles as its
    model text, so a saved model decodes with the restricted unpickler (no
    ``lightgbm`` globals in the pickle).
    """

    def __init__(self, loss: str = "mse", early_stopping_rounds: int = 50, num_boost_round: int = 1000, **kwargs: Any):
        super().__init__()
        if loss not in _LOSSES:
            raise ConfigError(f"LGBModel loss must be one of {sorted(_LOSSES)}, got {loss!r}")
        _lightgbm()
        self.loss = loss
        self.early_stopping_rounds = int(early_stopping_rounds)
        self.num_boost_round = int(num_boost_round)
        self.params = {"objective": _LOSSES[loss], "verbosity": -1, **kwargs}
        self.model: Booster | None = None
        self.best_iteration: int | None = None
        self.features: list[str] | None = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        if state.get("model") is not None:
            state["model"] = state["model"].model_to_string()
        return state

    def __setstate__(self, state: dict) -> None:
        text = state.get("model")
        if isinstance(text, str):
            state = {**state, "model": _lightgbm().Booster(model_str=text)}
        super().__setstate__(state)

    def fit(self, dataset: Any, **kwargs: Any) -> LGBModel:
        lgb = _lightgbm()
        x_train, y_train, self.features = learn_xy(dataset, "train")
        train = lgb.Dataset(x_train, label=y_train, feature_name=self.features, free_raw_data=True)
        valid_sets, callbacks = [train], []
        if "valid" in getattr(dataset, "segments", {}):
            x_valid, y_valid, _ = learn_xy(dataset, "valid")
            valid_sets.append(lgb.Dataset(x_valid, label=y_valid, reference=train, feature_name=self.features))
            if self.early_stopping_rounds > 0:
                callbacks.append(lgb.early_stopping(self.early_stopping_rounds, verbose=False))
        self.model = model = lgb.train(
            self.params,
            train,
            num_boost_round=self.num_boost_round,
            valid_sets=valid_sets,
            valid_names=["train", "valid"][: len(valid_sets)],
            callbacks=callbacks,
        )
        self.best_iteration = model.best_iteration or model.current_iteration()
        log.debug("LGBModel: %d rounds (best %s)", model.current_iteration(), self.best_iteration)
        return self

    def predict(self, dataset: Any, segment: str | slice = "test") -> pd.Series:
        if self.model is None:
            raise ConfigError(f"{type(self).__name__} is not fitted: call fit(dataset) before predict")
        x = infer_frame(dataset, segment)
        scores = self.model.predict(x.to_numpy(dtype=np.float64), num_iteration=self.best_iteration)
        return pd.Series(scores, index=x.index, name="score")
