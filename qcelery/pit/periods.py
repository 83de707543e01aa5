"""Field names, periods and days as the PIT files spell them.

A field name ends in ``_q`` (quarterly: period ``201903`` = year * 100 + quarter) or
``_a`` (annual: period ``2019``). Inside qcelery a period is also handled as an
*ordinal* (``year * 4 + quarter - 1`` or ``year``) so that "the k periods before"
is plain subtraction. Days are compared as ``YYYYMMDD`` integers, as in the files.

Different from Qlib: periods and dates are validated (Qlib accepts any integer and
returns wrong rows or ``NaN``); years must have four digits, which is also what keeps
an annual period from being mistaken for a quarterly one and back. Qlib's own reader
only accepts years 1900 to 2099.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .errors import PITQueryError

MIN_YEAR = 1000
MAX_YEAR = 9999

_FIELD_RE = re.compile(r"^[a-z0-9][a-z0-9_]*_[qa]$")


@dataclass(frozen=True)
class Field:
    """A PIT field: its file stem (lower-case, without ``$$``) and its frequency."""

    name: str

    @property
    def quarterly(self) -> bool:
        return self.name.endswith("_q")

    @property
    def frequency(self) -> str:
        return "quarterly" if self.quarterly else "annual"

    @property
    def periods_per_year(self) -> int:
        return 4 if self.quarterly else 1

    def __str__(self) -> str:
        return "$$" + self.name


def parse_field(field: Any) -> Field:
    """Validate a field name such as ``roewa_q``, ``"$$roewa_q"`` or ``ROEWA_Q``.

    Like Qlib, the name is case-insensitive (files are lower-case) and its suffix
    gives the frequency; unlike Qlib, a name that could escape the store's folder
    is rejected too.
    """
    if not isinstance(field, str):
        raise PITQueryError(f"PIT field {field!r} is a {type(field).__name__}, not a name such as 'roewa_q'")
    name = field.strip().lower()
    if name.startswith("$$"):
        name = name[2:]
    if not _FIELD_RE.match(name):
        if not (name.endswith("_q") or name.endswith("_a")):
            raise PITQueryError(
                f"PIT field {field!r} must end in '_q' (quarterly periods such as 201903) "
                f"or '_a' (annual periods such as 2019), e.g. 'roewa_q'"
            )
        raise PITQueryError(f"PIT field {field!r} may only contain letters, digits and '_' (it names a file), e.g. 'roewa_q'")
    return Field(name)


def period_ordinals(periods: np.ndarray, field: Field) -> tuple[np.ndarray, np.ndarray]:
    """Ordinals of ``periods`` and a mask of the periods valid for ``field``'s frequency."""
    p = np.asarray(periods, dtype=np.int64)
    if field.quarterly:
        year, quarter = p // 100, p % 100
        ok = (quarter >= 1) & (quarter <= 4)
        ordinal = year * 4 + quarter - 1
    else:
        year = p
        ok = np.ones(p.shape, dtype=bool)
        ordinal = p
    ok &= (year >= MIN_YEAR) & (year <= MAX_YEAR)
    return ordinal, ok


def period_from_ordinal(ordinal: int, field: Field) -> int:
    if field.quarterly:
        return (ordinal // 4) * 100 + ordinal % 4 + 1
    return ordinal


def describe_period_rule(field: Field) -> str:
    if field.quarterly:
        return f"a quarterly field ({field.name}) takes periods year*100+quarter, e.g. 201903"
    return f"an annual field ({field.name}) takes periods as a year, e.g. 2019"


def check_period(period: Any, field: Field) -> int:
    """Validate one period for ``field`` and return its ordinal."""
    if isinstance(period, (bool, np.bool_)) or not isinstance(period, (int, np.integer)):
        raise PITQueryError(f"period {period!r} is not an integer; {describe_period_rule(field)}")
    ordinal, ok = period_ordinals(np.array([int(period)]), field)
    if not ok[0]:
        raise PITQueryError(f"period {period} does not exist: {describe_period_rule(field)}")
    return int(ordinal[0])


def valid_yyyymmdd(values: np.ndarray) -> np.ndarray:
    """Mask of the integers that are real calendar days written as ``YYYYMMDD``."""
    a = np.asarray(values, dtype=np.int64)
    year, month, day = a // 10000, a // 100 % 100, a % 100
    ok = (year >= MIN_YEAR) & (year <= MAX_YEAR) & (month >= 1) & (month <= 12) & (day >= 1)
    months = np.where(ok, (year - 1970) * 12 + month - 1, 0).astype("datetime64[M]")
    days_in_month: np.ndarray = ((months + 1).astype("datetime64[D]") - months.astype("datetime64[D]")).astype(np.int64)
    return ok & (day <= days_in_month)


def date_ints(values: Any, what: str) -> np.ndarray:
    """``YYYYMMDD`` integers from datetimes, ISO strings or ``YYYYMMDD`` integers."""
    s = pd.Series(values)
    if s.empty:
        return np.empty(0, dtype=np.int64)
    if pd.api.types.is_bool_dtype(s):
        raise PITQueryError(f"{what}: booleans are not dates")
    if pd.api.types.is_integer_dtype(s) or pd.api.types.is_float_dtype(s):
        arr = s.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(arr) | (arr != np.floor(arr))
        ints = np.where(bad, 0, arr).astype(np.int64)
        bad |= ~valid_yyyymmdd(ints)
        if bad.any():
            first = int(np.argmax(bad))
            raise PITQueryError(
                f"{what}: {plain_value(s.iloc[first])!r} (row {first}) is not a day; give YYYYMMDD integers "
                f"such as 20190713, datetimes or ISO strings"
            )
        return ints
    try:
        stamps = pd.DatetimeIndex(pd.to_datetime(s))
    except (ValueError, TypeError) as exc:
        raise PITQueryError(f"{what}: cannot read the values as days ({exc}); give datetimes or ISO strings") from exc
    if np.any(stamps.isna()):
        first = int(np.argmax(stamps.isna()))
        raise PITQueryError(f"{what}: row {first} is missing (NaT); every statement needs a publication day")
    ints = _yyyymmdd(stamps)
    bad = ~valid_yyyymmdd(ints)
    if bad.any():
        first = int(np.argmax(bad))
        raise PITQueryError(f"{what}: {stamps[first]} (row {first}) is outside years {MIN_YEAR}-{MAX_YEAR}")
    return ints


def _yyyymmdd(stamps: pd.DatetimeIndex) -> np.ndarray:
    """``YYYYMMDD`` integers of the (local) calendar days of ``stamps`` (no NaT)."""
    if stamps.tz is not None:
        stamps = stamps.tz_localize(None)
    day = stamps.to_numpy().astype("datetime64[D]")
    month = day.astype("datetime64[M]")
    year = month.astype("datetime64[Y]").astype(np.int64) + 1970
    yyyymmdd: np.ndarray = year * 10000 + (month.astype(np.int64) % 12 + 1) * 100 + (day - month).astype(np.int64) + 1
    return yyyymmdd


def plain_value(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (for messages)."""
    return value.item() if isinstance(value, np.generic) else value


def observation_days(days: Any) -> tuple[pd.DatetimeIndex, np.ndarray]:
    """The observation days as a ``DatetimeIndex`` and as ``YYYYMMDD`` integers.

    Only the calendar day counts (a time of day is ignored), as in Qlib.
    """
    if isinstance(days, (str, pd.Timestamp)):
        raise PITQueryError(f"days={days!r} is one day; give a sequence of days (e.g. the trading calendar)")
    try:
        index = pd.DatetimeIndex(days)
    except (ValueError, TypeError) as exc:
        raise PITQueryError(f"days: cannot read them as dates ({exc})") from exc
    if index.tz is not None:
        index = index.tz_localize(None)
    if np.any(index.isna()):
        raise PITQueryError("days: contains NaT; every observation day must be a date")
    return index.rename("datetime"), _yyyymmdd(index)
