"""The synthetic market as a Qlib provider directory: Qlib's own examples, no download.

:func:`write_qlib_provider` writes what :class:`~qcelery.data.SyntheticAlphaHandler`
simulates in Qlib's binary layout, the one ``scripts/dump_bin.py`` produces and
``qlib.init(provider_uri=...)`` reads::

    calendars/day.txt                 one trading day a line (YYYY-MM-DD)
    instruments/all.txt               code<TAB>first day<TAB>last day
    features/<code lower>/<field>.day.bin
                                      little-endian float32: the calendar index of the
                                      first value, then one value per trading day

Fields: ``open``, ``high``, ``low``, ``close``, ``volume`` (simulated), ``vwap`` (the
day's typical price (high + low + close) / 3, Alpha158 reads it), ``change`` (close over
the previous close, minus 1) and ``factor`` (1: the synthetic prices need no adjustment).
So Qlib's ``Alpha158`` / ``Alpha360`` handlers and expressions run on it unchanged
(``config/qlib_lightgbm_alpha158.yaml``). The calendar starts the handler's warm-up
days (80) before ``start_time``, so rolling features are defined from ``start_time`` on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..calendar import resolve_calendar
from ..errors import ConfigError
from .synthetic import SyntheticAlphaHandler

log = logging.getLogger(__name__)

__all__ = ["write_qlib_provider", "FIELDS"]

#: the fields written per instrument, in Qlib's names (``$close``, ...)
FIELDS = ("open", "high", "low", "close", "volume", "vwap", "change", "factor")


def write_qlib_provider(
    target: str | Path,
    *,
    instruments: int = 60,
    start_time: Any = "2020-01-02",
    end_time: Any = "2024-12-31",
    seed: int = 0,
    signal_strength: float = 0.05,
    calendar: Any = "XSHG",
    overwrite: bool = False,
) -> Path:
    """Write the synthetic market (the same prices ``SyntheticAlphaHandler`` with these
    arguments simulates) as a Qlib provider directory at ``target``; returns its path.

    ``target`` must not exist, or be empty, unless ``overwrite`` (then the files written
    here are replaced; nothing else in it is removed). Raises
    :class:`~qcelery.errors.ConfigError` naming the directory otherwise."""
    root = Path(target).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"Qlib provider target {str(root)!r} is a file; give a directory")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise ConfigError(f"Qlib provider target {str(root)!r} is not empty; give an empty directory or overwrite=True (--overwrite)")
    cal = resolve_calendar(calendar)
    handler = SyntheticAlphaHandler(
        instruments=instruments,
        start_time=start_time,
        end_time=end_time,
        fit_start_time=start_time,
        fit_end_time=end_time,
        seed=seed,
        signal_strength=signal_strength,
        calendar=cal,
    )
    market = handler.market(cal)
    close = market["close"]
    days = close.index
    fields = {
        **market,
        "vwap": (market["high"] + market["low"] + close) / 3.0,
        "change": close.pct_change(),
        "factor": pd.DataFrame(1.0, index=days, columns=close.columns),
    }
    (root / "calendars").mkdir(parents=True, exist_ok=True)
    (root / "calendars" / "day.txt").write_text("".join(f"{d:%Y-%m-%d}\n" for d in days))
    (root / "instruments").mkdir(exist_ok=True)
    first, last = f"{days[0]:%Y-%m-%d}", f"{days[-1]:%Y-%m-%d}"
    (root / "instruments" / "all.txt").write_text("".join(f"{code}\t{first}\t{last}\n" for code in close.columns))
    for code in close.columns:
        folder = root / "features" / code.lower()
        folder.mkdir(parents=True, exist_ok=True)
        for name in FIELDS:
            # Qlib's bin: the first value's calendar index, then the values, as float32
            np.hstack([[0.0], fields[name][code].to_numpy(dtype=np.float64)]).astype("<f4").tofile(folder / f"{name}.day.bin")
    log.info("wrote a Qlib provider of %d instruments x %d days (%s..%s) to %s", len(close.columns), len(days), first, last, root)
    return root
