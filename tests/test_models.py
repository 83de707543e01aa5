"""Built-in models on the synthetic data: the planted signal is found out of sample."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qcelery.data import DatasetH, SyntheticAlphaHandler
from qcelery.errors import ConfigError
from qcelery.models import LGBModel, LinearModel
from qcelery.records import calc_ic
from qcelery.serial import dumps, restricted_loads

SEGMENTS = {"train": ("2019-01-02", "2020-06-30"), "valid": ("2020-07-01", "2020-09-30"), "test": ("2020-10-09", "2021-06-30")}


def dataset(signal_strength: float, seed: int = 11) -> DatasetH:
    handler = SyntheticAlphaHandler(
        instruments=40,
        start_time="2019-01-02",
        end_time="2021-06-30",
        fit_start_time="2019-01-02",
        fit_end_time="2020-06-30",
        seed=seed,
        signal_strength=signal_strength,
    )
    return DatasetH(handler, SEGMENTS)


@pytest.fixture(scope="module")
def strong():
    return dataset(0.15)


@pytest.fixture(scope="module")
def test_label(strong):
    return strong.prepare("test", col_set="label", data_key="raw")["LABEL0"]


def test_linear_model_finds_the_planted_signal_out_of_sample(strong, test_label):
    pred = LinearModel(alpha=1.0).fit(strong).predict(strong)
    assert isinstance(pred, pd.Series) and pred.index.names == ["datetime", "instrument"]
    assert pred.index.equals(strong.prepare("test", col_set="feature").index)
    ic, _ = calc_ic(pred, test_label)
    assert ic.mean() > 0.05


def test_without_a_planted_signal_there_is_nothing_to_find():
    ds = dataset(0.0, seed=12)
    pred = LinearModel().fit(ds).predict(ds)
    ic, _ = calc_ic(pred, ds.prepare("test", col_set="label", data_key="raw")["LABEL0"])
    assert abs(ic.mean()) < 0.03


def test_ridge_with_alpha_zero_is_least_squares(strong):
    model = LinearModel(alpha=0.0).fit(strong)
    train = strong.prepare("train", col_set=["feature", "label"], data_key="learn")
    x = np.column_stack([train["feature"].to_numpy(dtype=float), np.ones(len(train))])
    coef = np.linalg.lstsq(x, train["label"].to_numpy(dtype=float)[:, 0], rcond=None)[0]
    np.testing.assert_allclose(model.coef_, coef[:-1], atol=1e-8)
    assert model.intercept_ == pytest.approx(coef[-1], abs=1e-8)


def test_models_refuse_to_predict_before_fit_and_bad_parameters(strong):
    with pytest.raises(ConfigError, match="LinearModel is not fitted"):
        LinearModel().predict(strong)
    with pytest.raises(ConfigError, match="alpha must be a number >= 0"):
        LinearModel(alpha=-1)


def test_a_fitted_linear_model_decodes_through_the_restricted_unpickler(strong):
    model = LinearModel().fit(strong)
    back = restricted_loads(dumps(model))
    assert back.predict(strong).equals(model.predict(strong))


def test_lgb_model_early_stops_on_valid_and_pickles_without_lightgbm_globals(strong, test_label):
    pytest.importorskip("lightgbm")
    model = LGBModel(num_boost_round=300, early_stopping_rounds=10, learning_rate=0.1, num_leaves=8, num_threads=1)
    model.fit(strong)
    assert model.best_iteration < 300
    pred = model.predict(strong)
    ic, _ = calc_ic(pred, test_label)
    assert ic.mean() > 0.02
    data = dumps(model)
    assert b"lightgbm" not in data
    assert restricted_loads(data).predict(strong).equals(pred)
    with pytest.raises(ConfigError, match="loss must be one of"):
        LGBModel(loss="huber")
