"""Synthetic financial statements with late publication and revisions.

For tests, benchmarks and the synthetic data handler: realistic enough to exercise
the point-in-time logic (reports published 20-90 days after the period ends,
revisions published months later, sometimes after the next periods' reports, some
periods revised twice). Deterministic for a seed; each instrument, field and year
draws from its own random stream, so adding an instrument changes no other one and
extending ``end_year`` leaves the statements of earlier years unchanged.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .errors import PITQueryError
from .panel import parse_spec, pit_panel
from .periods import MAX_YEAR, MIN_YEAR, parse_field
from .store import PITStore

_PHI = 0.6  # AR(1) coefficient of the ratio around the instrument's level


def synthetic_statements(
    instruments: Sequence[str],
    start_year: int,
    end_year: int,
    field: str,
    seed: int,
    revision_rate: float = 0.2,
) -> dict[str, pd.DataFrame]:
    """Statements per instrument (columns ``date``, ``period``, ``value``, sorted by ``date``).

    Every period from ``start_year`` to ``end_year`` (quarters for a ``_q`` field,
    years for ``_a``) is first published 20 to 90 days after it ends; a share
    ``revision_rate`` of them is revised 1 to 400 days later, and a third of those a
    second time up to 200 days after that. Values are a mean-reverting ratio around
    an instrument's own level (ROE-like: a few percent).
    """
    f = parse_field(field)
    for name, year in (("start_year", start_year), ("end_year", end_year)):
        if isinstance(year, bool) or not isinstance(year, (int, np.integer)) or not MIN_YEAR <= year <= MAX_YEAR:
            raise PITQueryError(f"synthetic_statements: {name}={year!r} must be a year between {MIN_YEAR} and {MAX_YEAR}")
    if start_year > end_year:
        raise PITQueryError(f"synthetic_statements: start_year={start_year} is after end_year={end_year}")
    if not 0.0 <= revision_rate <= 1.0:
        raise PITQueryError(f"synthetic_statements: revision_rate={revision_rate!r} must be between 0 and 1")
    if isinstance(instruments, str) or not all(isinstance(i, str) and i for i in instruments):
        raise PITQueryError(f"synthetic_statements: instruments must be a list of codes, got {instruments!r}")

    per_year = f.periods_per_year
    quarter_ends = ["03-31", "06-30", "09-30", "12-31"] if f.quarterly else ["12-31"]
    out: dict[str, pd.DataFrame] = {}
    for instrument in instruments:
        stream = [seed, zlib.crc32(instrument.encode()), zlib.crc32(f.name.encode())]
        level = np.random.default_rng(stream).normal(0.03, 0.02)
        x = level
        frames = []
        for year in range(start_year, end_year + 1):
            rng = np.random.default_rng([*stream, year])
            shocks, lag = rng.normal(0.0, 0.01, per_year), rng.integers(20, 91, per_year)
            revised, again = rng.random(per_year) < revision_rate, rng.random(per_year) < 1 / 3
            lag1, lag2 = rng.integers(1, 401, per_year), rng.integers(1, 201, per_year)
            scale1, noise1 = rng.normal(0, 0.15, per_year), rng.normal(0, 0.003, per_year)
            scale2 = rng.normal(0, 0.1, per_year)
            values = np.empty(per_year)
            for i in range(per_year):
                x = level + _PHI * (x - level) + shocks[i]
                values[i] = x
            periods = np.arange(1, per_year + 1) + year * 100 if f.quarterly else np.array([year])
            ends = pd.to_datetime([f"{year}-{md}" for md in quarter_ends]).values
            published = ends + lag.astype("timedelta64[D]")
            first_rev = published + lag1.astype("timedelta64[D]")
            first_val = values * (1 + scale1) + noise1
            second = revised & again
            second_rev = first_rev[second] + lag2[second].astype("timedelta64[D]")
            frames.append(
                pd.DataFrame(
                    {
                        "date": np.concatenate([published, first_rev[revised], second_rev]),
                        "period": np.concatenate([periods, periods[revised], periods[second]]).astype(np.int64),
                        "value": np.concatenate([values, first_val[revised], first_val[second] * (1 + scale2[second])]),
                    }
                )
            )
        frame = pd.concat(frames, ignore_index=True)
        frame["date"] = frame["date"].astype("datetime64[ns]")
        out[instrument] = frame.sort_values("date", kind="stable").reset_index(drop=True)
    return out


def write_synthetic_statements(
    store: PITStore,
    instruments: Sequence[str],
    start_year: int,
    end_year: int,
    fields: Sequence[str],
    seed: int,
    revision_rate: float = 0.2,
) -> PITStore:
    """Write :func:`synthetic_statements` of each field into ``store`` (replacing what is there); return it."""
    if isinstance(fields, str):
        fields = [fields]
    for field in fields:
        statements = synthetic_statements(instruments, start_year, end_year, field, seed, revision_rate)
        for instrument, frame in statements.items():
            store.write(instrument, field, frame, overwrite=True)
    return store


def synthetic_pit_panel(
    instruments: Sequence[str],
    days: Any,
    spec: Mapping[str, Any],
    seed: int,
    start_year: int | None = None,
    revision_rate: float = 0.2,
) -> pd.DataFrame:
    """:func:`~qcelery.pit.panel.pit_panel` over synthetic statements of every field ``spec`` names.

    For a synthetic data handler's ``pit=`` option: statements run from ``start_year``
    (default: 2000, or two years before the first day if that is earlier, so that
    windows have history) to the last day's year, are written to a temporary store,
    evaluated, and deleted.
    """
    calls = parse_spec(spec)
    stamps = pd.DatetimeIndex(days)
    if stamps.empty:
        raise PITQueryError("synthetic_pit_panel: days is empty")
    first = min(2000, stamps.min().year - 2) if start_year is None else start_year
    fields = sorted({call.field.name for call in calls.values()})
    with tempfile.TemporaryDirectory(prefix="qcelery-pit-") as root:
        store = write_synthetic_statements(PITStore(root), instruments, first, int(stamps.max().year), fields, seed, revision_rate)
        return pit_panel(store, instruments, days, calls)
