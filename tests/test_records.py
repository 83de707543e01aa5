"""Records: signal analysis and the long-short portfolio, checked on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qcelery.errors import ConfigError
from qcelery.exp import LoadObjectError, get_experiment
from qcelery.records import PortAnaRecord, SigAnaRecord, SignalRecord, calc_ic, long_short_return, risk_analysis


def panel(values: dict[str, list[float]], days: int = 2) -> pd.Series:
    idx = pd.MultiIndex.from_product([pd.date_range("2021-01-04", periods=days), list(values)], names=["datetime", "instrument"])
    return pd.Series([values[i][d] for d in range(days) for i in values], index=idx)


def test_ic_and_rank_ic_per_day():
    pred = panel({"A": [1, 1], "B": [2, 3], "C": [3, 2]})
    label = panel({"A": [0.1, 0.1], "B": [0.2, 0.3], "C": [0.3, 0.2]})
    ic, ric = calc_ic(pred, label)
    np.testing.assert_allclose(ic, [1.0, 1.0])
    np.testing.assert_allclose(ric, [1.0, 1.0])
    ic, ric = calc_ic(pred, -label)
    np.testing.assert_allclose(ric, [-1.0, -1.0])


def test_long_short_is_topk_minus_bottomk_and_risk_is_additive():
    pred = panel({"A": [3, 1], "B": [2, 2], "C": [1, 3]})
    label = panel({"A": [0.05, 0.01], "B": [0.0, 0.0], "C": [-0.02, 0.04]})
    ls = long_short_return(pred, label, topk=1)
    np.testing.assert_allclose(ls, [0.07, 0.03])
    returns = pd.Series([0.01, -0.02, -0.01, 0.03])
    risk = risk_analysis(returns, ann_scaler=252)
    assert risk["annualized_return"] == pytest.approx(0.0025 * 252)
    assert risk["max_drawdown"] == pytest.approx(-0.03)
    assert risk["information_ratio"] == pytest.approx(returns.mean() / returns.std() * np.sqrt(252))
    with pytest.raises(ConfigError, match="topk must be an int >= 1"):
        long_short_return(pred, label, topk=0)


def test_analysis_records_read_the_signal_and_log_metrics(settings):
    rec = get_experiment("records", settings).create_recorder()
    rng = np.random.default_rng(1)
    label = panel({k: list(rng.normal(0, 0.02, 30)) for k in "ABCDEFGH"}, days=30)
    pred = label + rng.normal(0, 0.02, len(label))
    with pytest.raises(LoadObjectError, match="pred.pkl"):
        SigAnaRecord(rec).generate()
    rec.save_objects(**{"pred.pkl": pred.to_frame("score"), "label.pkl": label.to_frame("LABEL0")})

    SigAnaRecord(rec, ana_long_short=True, topk=2).generate()
    PortAnaRecord(rec, topk=2).generate()

    metrics = rec.list_metrics()
    ic = rec.load_object("sig_analysis/ic.pkl")
    assert metrics["IC"] == pytest.approx(ic.mean()) and metrics["IC"] > 0.3
    assert metrics["ICIR"] == pytest.approx(ic.mean() / ic.std())
    assert {"Rank IC", "Rank ICIR", "Long-Short Ann Return"} <= set(metrics)
    ls = rec.load_object("portfolio_analysis/long_short_r.pkl")
    assert metrics["long_short.annualized_return"] == pytest.approx(ls.mean() * 252)
    assert rec.load_object("portfolio_analysis/port_analysis.pkl").loc["max_drawdown", "risk"] <= 0
    SigAnaRecord(rec).check(include_self=True)
    assert SignalRecord(recorder=rec).list() == ["pred.pkl", "label.pkl"]


def test_skip_existing_does_not_recompute_and_qlib_backtest_config_is_refused(settings):
    rec = get_experiment("records2", settings).create_recorder()
    label = panel({k: [0.01 * i, -0.01 * i] for i, k in enumerate("ABCD")})
    rec.save_objects(**{"pred.pkl": label.to_frame("score"), "label.pkl": label.to_frame("LABEL0")})
    assert SigAnaRecord(rec).generate() is not None
    assert SigAnaRecord(rec, skip_existing=True).generate() is None
    with pytest.raises(ConfigError, match="strategy/backtest config is not supported"):
        PortAnaRecord(rec, config={"strategy": {}})
