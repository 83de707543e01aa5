"""``SyntheticAlphaHandler``: a seeded market, Alpha158-style features and a label.

A stand-in for Qlib's ``Alpha158`` handler that needs no download: it simulates
``instruments`` stocks over the trading days of a calendar and computes features and
the label from the simulated prices and volumes, so a real experiment (fit, predict,
IC, a long-short portfolio) runs anywhere, the same on every machine.

The simulation, per instrument ``i`` and day ``t``:

* a market return ``m_t`` and a loading ``beta_i``;
* a latent signal ``s_{i,t}`` (AR(1), fast mean reversion) that is *observable* only
  through volume (``log volume = base + 0.8 s + noise``) and *predicts* the return two
  days later: the idiosyncratic return of ``t+2`` is
  ``sigma_i (k s_{i,t} + sqrt(1 - k^2) eps)`` with ``k = signal_strength``. Since the
  label is ``Ref($close, -2) / Ref($close, -1) - 1`` (the return of ``t+2``), a model
  that reads the volume features can reach a cross-sectional IC of roughly ``0.8 k``;
  with ``signal_strength=0`` there is nothing to find;
* open / high / low around the close path.

``pit={"fields": {"roe": "P($$roewa_q)", ...}, "store": <folder>}`` adds point-in-time
columns as features (:mod:`qcelery.pit`): what was published on or before each day,
from the PIT store at ``store`` (Qlib's ``dump_pit`` layout) or, without ``store``,
from seeded synthetic statements published late and revised.

Random numbers are drawn per day in calendar order from ``numpy.random.default_rng(seed)``
after the per-instrument constants, so extending ``end_time`` leaves every earlier
value unchanged. 80 trading days before ``start_time`` are simulated as warm-up for
the rolling windows and dropped.

Processing (Qlib's ``DataHandlerLP`` with ``RobustZScoreNorm`` + ``Fillna`` for
inference and ``DropnaLabel`` + ``CSZScoreNorm`` of the label for learning):

* ``raw`` (``DK_R``): features and label as computed;
* ``infer`` (``DK_I``): each feature minus its median, over 1.4826 x its MAD, both
  fitted on ``fit_start_time..fit_end_time`` only, clipped to +-3, NaN -> 0; raw label;
* ``learn`` (``DK_L``): ``infer`` features; rows without a label dropped; the label
  z-scored across instruments day by day.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

import numpy as np
import pandas as pd

from ..calendar import TradingCalendar, parse_time, resolve_calendar
from ..errors import ConfigError, TaskTypeError
from ..serial import Serializable
from .features import alpha_features, next_day_return_label

log = logging.getLogger(__name__)

__all__ = ["SyntheticAlphaHandler", "trading_days"]

WARMUP_DAYS = 80
_PHI = 0.5  # AR(1) coefficient of the latent signal
_VOLUME_LOADING = 0.8
_VOLUME_NOISE = 0.35


def trading_days(calendar: Any) -> pd.DatetimeIndex:
    """The days of ``calendar`` (an exchange code or a ``TradingCalendar``), its known
    future days included, through :mod:`qcelery.calendar`."""
    if not isinstance(calendar, (str, TradingCalendar)):
        raise TaskTypeError(f"calendar must be an exchange code such as 'XSHG' or a TradingCalendar, got {calendar!r}")
    return resolve_calendar(calendar).future_dates


def _ts(value: Any, name: str) -> pd.Timestamp | None:
    """A date of the handler's configuration or of a selector (``None``: open)."""
    return None if value is None else parse_time(value, f"SyntheticAlphaHandler {name}", ConfigError)


class SyntheticAlphaHandler(Serializable):
    """Seeded synthetic panel with Alpha158-style features (a Qlib ``DataHandlerLP``).

    ``fetch(selector, level, col_set, data_key)`` and the ``DK_R`` / ``DK_I`` / ``DK_L``
    data keys are Qlib's. Differences: the data are simulated (see the module doc),
    built in the constructor, and the whole configuration is in :attr:`init_kwargs`
    (hashed by the handler cache). Pickles without its data unless ``dump_all``.
    """

    DK_R, DK_I, DK_L = "raw", "infer", "learn"
    CS_ALL = "__all"
    CS_RAW = "__raw"
    LABEL_NAME = "LABEL0"
    exclude_attr = ("_views",)

    def __init__(
        self,
        instruments: int = 60,
        start_time: Any = None,
        end_time: Any = None,
        fit_start_time: Any = None,
        fit_end_time: Any = None,
        seed: int = 0,
        signal_strength: float = 0.05,
        calendar: Any = "XSHG",
        pit: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if isinstance(instruments, bool) or not isinstance(instruments, (int, np.integer)) or instruments < 2:
            raise ConfigError(f"SyntheticAlphaHandler instruments must be an int >= 2 (the number of stocks), got {instruments!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"SyntheticAlphaHandler seed must be a non-negative int, got {seed!r}")
        if isinstance(signal_strength, bool) or not isinstance(signal_strength, (int, float)) or not 0 <= signal_strength < 1:
            raise ConfigError(f"SyntheticAlphaHandler signal_strength must be a number in [0, 1), got {signal_strength!r}")
        if pit is not None and not isinstance(pit, Mapping):
            raise ConfigError(f"SyntheticAlphaHandler pit must be a mapping of PIT feature specs, got {pit!r}")
        self.instruments = int(instruments)
        self.start_time = _ts(start_time, "start_time")
        self.end_time = _ts(end_time, "end_time")
        self.fit_start_time = _ts(fit_start_time, "fit_start_time")
        self.fit_end_time = _ts(fit_end_time, "fit_end_time")
        self.seed = int(seed)
        self.signal_strength = float(signal_strength)
        self.calendar = calendar if isinstance(calendar, str) else getattr(calendar, "name", None) or "custom"
        self.pit = dict(pit) if pit is not None else None
        self._views: dict[str, pd.DataFrame] = {}
        self._data = self._build(calendar)
        self._stats = self._fit()

    # ------------------------------------------------------------------ config
    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The configuration this handler was built from (what the cache hashes)."""
        return {
            "instruments": self.instruments,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "fit_start_time": self.fit_start_time,
            "fit_end_time": self.fit_end_time,
            "seed": self.seed,
            "signal_strength": self.signal_strength,
            "calendar": self.calendar,
            "pit": self.pit,
        }

    def __repr__(self) -> str:
        span = f"{self.start_time and self.start_time.date()}..{self.end_time and self.end_time.date()}"
        return f"SyntheticAlphaHandler({self.instruments} instruments, {span}, seed={self.seed})"

    # ---------------------------------------------------------------- building
    def _days(self, calendar: Any) -> tuple[pd.DatetimeIndex, int]:
        days = trading_days(calendar)
        end = self.end_time if self.end_time is not None else days[-1]
        start = self.start_time if self.start_time is not None else days[0]
        if start > end:
            raise ConfigError(f"SyntheticAlphaHandler start_time {start.date()} is after end_time {end.date()}")
        first = int(days.searchsorted(start, side="left"))
        last = int(days.searchsorted(end, side="right"))
        if last <= first:
            raise ConfigError(
                f"SyntheticAlphaHandler: no trading day of calendar {self.calendar!r} between {start.date()} and "
                f"{end.date()} (the calendar covers {days[0].date()}..{days[-1].date()})"
            )
        lo = max(0, first - WARMUP_DAYS)
        if self.fit_start_time is None or self.fit_end_time is None:
            log.warning(
                "SyntheticAlphaHandler: no fit_start_time/fit_end_time; normalising with the whole span "
                "%s..%s, which lets later data into earlier features",
                start.date(),
                end.date(),
            )
        return days[lo:last], first - lo

    def market(self, calendar: Any = None) -> dict[str, pd.DataFrame]:
        """The simulated prices and volumes the features come from: ``open``, ``high``,
        ``low``, ``close``, ``volume``, each a (day x instrument) frame over the handler's
        span plus its warm-up days (what :func:`qcelery.data.qlib_provider.write_qlib_provider`
        writes as a Qlib provider)."""
        days, _ = self._days(calendar if calendar is not None else self.calendar)
        return self._market(days)

    def _market(self, days: pd.DatetimeIndex) -> dict[str, pd.DataFrame]:
        n, T = self.instruments, len(days)
        rng = np.random.default_rng(self.seed)
        # per-instrument constants first, then per-day draws: a longer span keeps the prefix
        beta = rng.uniform(0.6, 1.4, n)
        sigma = rng.uniform(0.012, 0.03, n)
        base_vol = np.exp(rng.normal(13.0, 0.8, n))
        price0 = rng.uniform(5.0, 80.0, n)
        draws = rng.standard_normal((T, 6, n))  # market, signal, eps, volume, gap, range
        market = 0.012 * draws[:, 0, 0]
        s = np.empty((T, n))
        s[0] = draws[0, 1]
        scale = np.sqrt(1 - _PHI**2)
        for t in range(1, T):
            s[t] = _PHI * s[t - 1] + scale * draws[t, 1]
        k = self.signal_strength
        planted = np.zeros((T, n))
        planted[2:] = s[:-2]  # the signal of day t moves the return of day t+2
        idio = sigma * (k * planted + np.sqrt(1 - k * k) * draws[:, 2])
        ret = beta * market[:, None] + idio
        ret = np.clip(ret, -0.2, 0.2)
        close = price0 * np.cumprod(1 + ret, axis=0)
        prev = np.vstack([price0[None, :], close[:-1]])
        open_ = prev * (1 + 0.3 * sigma * draws[:, 4])
        spread = np.abs(draws[:, 5]) * 0.5 * sigma
        high = np.maximum(open_, close) * (1 + spread)
        low = np.minimum(open_, close) * (1 - spread)
        volume = base_vol * np.exp(_VOLUME_LOADING * s + _VOLUME_NOISE * draws[:, 3])

        names = [f"SYN{i:04d}" for i in range(n)]
        return {
            key: pd.DataFrame(val, index=days, columns=names)
            for key, val in (("open", open_), ("high", high), ("low", low), ("close", close), ("volume", volume))
        }

    def _build(self, calendar: Any) -> pd.DataFrame:
        days, warmup = self._days(calendar)
        wide = self._market(days)
        names, n = list(wide["close"].columns), self.instruments
        feats = alpha_features(wide["open"], wide["high"], wide["low"], wide["close"], wide["volume"])
        label = next_day_return_label(wide["close"])
        kept = days[warmup:]
        index = pd.MultiIndex.from_product([kept, names], names=["datetime", "instrument"])
        fvals = np.stack([f.to_numpy()[warmup:] for f in feats.values()], axis=-1).reshape(len(kept) * n, len(feats))
        fvals[~np.isfinite(fvals)] = np.nan
        columns = pd.MultiIndex.from_tuples([("feature", f) for f in feats], names=[None, None])
        frame = pd.DataFrame(fvals.astype(np.float32), index=index, columns=columns)
        frame[("label", self.LABEL_NAME)] = label.to_numpy()[warmup:].reshape(-1)
        if self.pit is not None:
            frame = self._join_pit(frame, kept, names)
        log.debug("SyntheticAlphaHandler built %d rows x %d features", len(frame), len(feats))
        return frame

    def _join_pit(self, frame: pd.DataFrame, days: pd.DatetimeIndex, names: list[str]) -> pd.DataFrame:
        """Join point-in-time columns (``pit: {fields: {column: call}, store: path}``)
        as features: from the PIT store at ``store`` when given (Qlib's ``dump_pit``
        layout), else from seeded synthetic statements (late publication, revisions)."""
        import tempfile

        from ..pit import PITStore, pit_panel, write_synthetic_statements
        from ..pit.errors import PITDataNotFoundError, PITFormatError, PITQueryError
        from ..pit.panel import parse_spec

        if self.pit is None:  # _build calls this only with a pit section
            raise ConfigError("SyntheticAlphaHandler has no pit section to join")
        unknown = sorted(set(self.pit) - {"fields", "store", "seed"})
        if unknown or not isinstance(self.pit.get("fields"), Mapping):
            raise ConfigError(
                "SyntheticAlphaHandler pit must look like {fields: {column: 'P($$roewa_q)', ...}, store: <PIT folder, "
                f"optional>, seed: <int, optional>}}, got {self.pit!r}"
            )
        clash = sorted(set(self.pit["fields"]) & set(frame["feature"].columns))
        if clash:
            raise ConfigError(f"SyntheticAlphaHandler pit column {clash[0]!r} is also a price/volume feature; rename it")
        try:
            calls = parse_spec(self.pit["fields"])
            if self.pit.get("store"):
                panel = pit_panel(self.pit["store"], names, days, self.pit["fields"], missing="raise")
            else:
                fields = sorted({c.field.name for c in calls.values()})
                with tempfile.TemporaryDirectory(prefix="qcelery-pit-") as tmp:
                    store = write_synthetic_statements(
                        PITStore(tmp), names, days[0].year - 2, days[-1].year, fields, seed=int(self.pit.get("seed", self.seed))
                    )
                    panel = pit_panel(store, names, days, self.pit["fields"])
        except (PITQueryError, PITDataNotFoundError, PITFormatError) as exc:
            raise ConfigError(f"SyntheticAlphaHandler pit: {exc}") from exc
        for column in panel.columns:
            frame.insert(len(frame["feature"].columns), ("feature", column), panel[column].to_numpy(dtype=np.float32))
        return frame

    def _fit(self) -> pd.DataFrame:
        """Median and scaled MAD of every feature over the fit period."""
        feats = self._data["feature"]
        dt = feats.index.get_level_values("datetime")
        mask = np.ones(len(feats), dtype=bool)
        if self.fit_start_time is not None:
            mask &= dt >= self.fit_start_time
        if self.fit_end_time is not None:
            mask &= dt <= self.fit_end_time
        if not mask.any():
            raise ConfigError(
                f"SyntheticAlphaHandler: the fit period {self.fit_start_time}..{self.fit_end_time} holds no day of "
                f"the data {self.start_time}..{self.end_time}"
            )
        fit = feats.to_numpy(dtype=np.float64)[mask]
        # a feature with no value in the fit period (a PIT field first published later)
        # is left unscaled: median 0, MAD 1, and said once here by name
        known = ~np.isnan(fit).all(axis=0)
        if not known.all():
            log.warning(
                "SyntheticAlphaHandler: no value of %s in the fit period %s..%s; left unscaled",
                ", ".join(map(str, feats.columns[~known])),
                self.fit_start_time,
                self.fit_end_time,
            )
        median, mad = np.zeros(fit.shape[1]), np.ones(fit.shape[1])
        if known.any():
            median[known] = np.nanmedian(fit[:, known], axis=0)
            mad[known] = np.nanmedian(np.abs(fit[:, known] - median[known]), axis=0) * 1.4826
        mad = np.where(np.isfinite(mad) & (mad > 1e-12), mad, 1.0)
        return pd.DataFrame({"median": median, "mad": mad}, index=feats.columns)

    # ---------------------------------------------------------------- fetching
    def _view(self, data_key: str) -> pd.DataFrame:
        if data_key not in (self.DK_R, self.DK_I, self.DK_L):
            raise ConfigError(f"data_key must be one of {self.DK_R!r}, {self.DK_I!r}, {self.DK_L!r}, got {data_key!r}")
        if getattr(self, "_data", None) is None:
            raise ConfigError(f"{self!r} was unpickled without its data (pickled with dump_all=False); build it again from its config")
        if data_key == self.DK_R:
            return self._data
        views: dict[str, pd.DataFrame] = self.__dict__.setdefault("_views", {})
        view = views.get(data_key)
        if view is not None:
            return view
        feats = self._data["feature"].to_numpy(dtype=np.float64)
        normed = np.clip((feats - self._stats["median"].to_numpy()) / self._stats["mad"].to_numpy(), -3, 3)
        normed = np.nan_to_num(normed, nan=0.0).astype(np.float32)
        view = pd.DataFrame(normed, index=self._data.index, columns=self._data["feature"].columns)
        view.columns = pd.MultiIndex.from_tuples([("feature", c) for c in view.columns])
        label = self._data[("label", self.LABEL_NAME)]
        if data_key == self.DK_L:
            keep = label.notna().to_numpy()
            view, label = view[keep], label[keep]
            grouped = label.groupby(level="datetime")
            std = grouped.transform("std")
            label = ((label - grouped.transform("mean")) / std.where(std > 0)).fillna(0.0)
        view[("label", self.LABEL_NAME)] = label
        views[data_key] = view
        return view

    def get_cols(self, col_set: str = "feature") -> list[str]:
        return list(self._data[col_set].columns)

    def fetch(
        self,
        selector: Any = slice(None, None),
        level: str | int = "datetime",
        col_set: str | Iterable[str] = CS_ALL,
        data_key: str = DK_I,
    ) -> pd.DataFrame:
        """Rows of ``selector`` (a ``slice(start, end)`` of days, both included, or a
        ``(start, end)`` pair) and columns of ``col_set`` (``"feature"``, ``"label"``,
        a list of them, or ``"__all"``) from the ``data_key`` view."""
        if level not in ("datetime", 0):
            raise ConfigError(f"fetch selects on the 'datetime' level only, got level={level!r}")
        view = self._view(data_key)
        if isinstance(selector, (tuple, list)) and len(selector) == 2:
            selector = slice(*selector)
        if not isinstance(selector, slice):
            raise ConfigError(f"fetch selector must be slice(start, end) or (start, end), got {selector!r}")
        start, stop = _ts(selector.start, "segment start"), _ts(selector.stop, "segment end")
        dt = view.index.get_level_values("datetime")
        lo = 0 if start is None else dt.searchsorted(start, side="left")
        hi = len(view) if stop is None else dt.searchsorted(stop, side="right")
        rows = view.iloc[lo:hi]
        if col_set in (self.CS_ALL, self.CS_RAW):
            return rows
        sets = [col_set] if isinstance(col_set, str) else list(col_set)
        unknown = [c for c in sets if c not in ("feature", "label")]
        if unknown:
            raise ConfigError(f"unknown col_set {unknown[0]!r}; use 'feature', 'label', a list of them or '__all'")
        if isinstance(col_set, str):  # a top-level label of the two-level columns selects a frame
            return cast(pd.DataFrame, rows[col_set])
        return rows.loc[:, [c for c in rows.columns if c[0] in sets]]
