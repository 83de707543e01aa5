"""Synthetic financial statements with late publication and revisions.

For tests, benchmarks and the synthetic data handler: realistic enough to exercise
the point-in-time logic (reports published 20-90 days after the period ends,
revisions published months later, sometimes after the next periods' reports, some
periods revised twice), deterministic for a seed and independent per instrument and
field (adding an instrument does not change the others' statements).
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import pandas as pd

from .errors import PITQueryError
from .periods import MAX_YEAR, MIN_YEAR, parse_field
from .store import PITStore


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
    second time. Values are a mean-reverting ratio around an instrument's own level
    (ROE-like: a few percent).
    """
    f = parse_field(field)
    for name, year in (("start_year", start_year), ("end_year", end_year)):
        if isinstance(year, bool) or not isinstance(year, (int, np.integer)) or not MIN_YEAR <= year <= MAX_YEAR:
            raise PITQueryError(
                f"synthetic_statements: {name}={year!r} must be a year between {MIN_YEAR} and {MAX_YEAR}"
            )
    if start_year > end_year:
        raise PITQueryError(f"synthetic_statements: start_year={start_year} is after end_year={end_year}")
    if not 0.0 <= revision_rate <= 1.0:
        raise PITQueryError(f"synthetic_statements: revision_rate={revision_rate!r} must be between 0 and 1")
    if isinstance(instruments, str) or not all(isinstance(i, str) and i for i in instruments):
        raise PITQueryError(f"synthetic_statements: instruments must be a list of codes, got {instruments!r}")

    years = np.arange(start_year, end_year + 1)
    if f.quarterly:
        periods = (years[:, None] * 100 + np.arange(1, 5)[None, :]).ravel()
        ends = pd.to_datetime([f"{p // 100}-{3 * (p % 100):02d}-01" for p in periods]) + pd.offsets.MonthEnd(0)
    else:
        periods = years
        ends = pd.to_datetime([f"{y}-12-31" for y in years])
    n = len(periods)
    out: dict[str, pd.DataFrame] = {}
    for instrument in instruments:
        rng = np.random.default_rng([seed, zlib.crc32(instrument.encode()), zlib.crc32(f.name.encode())])
        level = rng.normal(0.03, 0.02)
        shocks = rng.normal(0.0, 0.01, n)
        values = np.empty(n)
        x = level
        for i in range(n):  # AR(1) around the instrument's level
            x = level + 0.6 * (x - level) + shocks[i]
            values[i] = x
        published = ends + pd.to_timedelta(rng.integers(20, 91, n), unit="D")
        revised = rng.random(n) < revision_rate
        first_rev = published[revised] + pd.to_timedelta(rng.integers(1, 401, revised.sum()), unit="D")
        first_val = values[revised] * (1 + rng.normal(0, 0.15, revised.sum())) + rng.normal(0, 0.003, revised.sum())
        again = rng.random(revised.sum()) < 1 / 3
        second_rev = first_rev[again] + pd.to_timedelta(rng.integers(1, 201, again.sum()), unit="D")
        second_val = first_val[again] * (1 + rng.normal(0, 0.1, again.sum()))
        frame = pd.DataFrame(
            {
                "date": np.concatenate([published.values, first_rev.values, second_rev.values]),
                "period": np.concatenate([periods, periods[revised], periods[revised][again]]).astype(np.int64),
                "value": np.concatenate([values, first_val, second_val]),
            }
        )
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
