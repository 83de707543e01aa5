"""Alpha158-style features and the label, computed with pandas on wide frames.

Every input is a ``DataFrame`` indexed by trading day with one column per
instrument (``open``, ``high``, ``low``, ``close``, ``volume``); every feature is
one such frame, computed per instrument along time, using only the past (the label
alone looks ahead). The names follow Qlib's Alpha158 where the formula is the same
idea (``ROC5``, ``MA20``, ``STD20``, ``RSV20``, ``CORR20``, ``VMA5`` ...); the
formulas are written here, not taken from Qlib.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import pandas as pd

__all__ = ["alpha_features", "next_day_return_label", "LABEL_EXPR", "WINDOWS"]

#: the label, in Qlib's expression language: the return from t+1 to t+2, so a
#: prediction made at the close of t can be traded at t+1
LABEL_EXPR = "Ref($close, -2) / Ref($close, -1) - 1"
#: rolling windows (trading days) of the windowed features
WINDOWS = (5, 10, 20, 60)


def next_day_return_label(close: pd.DataFrame) -> pd.DataFrame:
    """``Ref($close, -2) / Ref($close, -1) - 1``."""
    return close.shift(-2) / close.shift(-1) - 1


# numpy's ufuncs return a DataFrame for a DataFrame (__array_ufunc__); numpy's stubs say
# ndarray, hence the casts
def _rolling_corr(a: pd.DataFrame, b: pd.DataFrame, window: int) -> pd.DataFrame:
    # column-wise rolling correlation without pandas' per-column pairwise loop
    ma, mb = a.rolling(window).mean(), b.rolling(window).mean()
    cov = (a * b).rolling(window).mean() - ma * mb
    var_a = (a * a).rolling(window).mean() - ma * ma
    var_b = (b * b).rolling(window).mean() - mb * mb
    denom = cast(pd.DataFrame, np.sqrt(var_a.clip(lower=0) * var_b.clip(lower=0)))
    return (cov / denom.where(denom > 1e-12)).clip(-1, 1)


def alpha_features(
    open_: pd.DataFrame,
    high: pd.DataFrame,
    low: pd.DataFrame,
    close: pd.DataFrame,
    volume: pd.DataFrame,
    windows: tuple[int, ...] = WINDOWS,
) -> dict[str, pd.DataFrame]:
    """The feature frames, by name, in a stable order.

    * ``KMID``, ``KLEN``, ``KUP``, ``KLOW``: the day's candle relative to the open;
    * ``RET1``: the day's return;
    * ``ROC{d}``: return over ``d`` days (momentum / reversal);
    * ``MA{d}``: moving average of the close over the close;
    * ``STD{d}``: volatility of daily returns;
    * ``RSV{d}``: position of the close in the ``d``-day low..high range;
    * ``VMA{d}``: moving average of the volume over today's volume (volume ratio);
    * ``VSTD{d}``: volatility of log volume changes;
    * ``CORR{d}``: correlation of the close and log volume;
    * ``CORD{d}``: correlation of price changes and volume changes.
    """
    out: dict[str, pd.DataFrame] = {}
    out["KMID"] = (close - open_) / open_
    out["KLEN"] = (high - low) / open_
    out["KUP"] = (high - np.maximum(open_, close)) / open_
    out["KLOW"] = (cast(pd.DataFrame, np.minimum(open_, close)) - low) / open_
    ret = close / close.shift(1) - 1
    log_vol = cast(pd.DataFrame, np.log(volume.where(volume > 0)))
    dlog_vol = log_vol - log_vol.shift(1)
    out["RET1"] = ret
    for d in windows:
        out[f"ROC{d}"] = close / close.shift(d) - 1
    for d in windows[:3]:
        out[f"MA{d}"] = close.rolling(d).mean() / close
    for d in windows[:3]:
        out[f"STD{d}"] = ret.rolling(d).std()
    for d in windows[1:3]:
        lo, hi = low.rolling(d).min(), high.rolling(d).max()
        out[f"RSV{d}"] = (close - lo) / (hi - lo).where(hi - lo > 1e-12)
    for d in windows[:2]:
        out[f"VMA{d}"] = volume.rolling(d).mean() / volume.where(volume > 0)
    out["VSTD20"] = dlog_vol.rolling(20).std()
    for d in windows[1:3]:
        out[f"CORR{d}"] = _rolling_corr(close, log_vol, d)
    out["CORD20"] = _rolling_corr(ret, dlog_vol, 20)
    return out
