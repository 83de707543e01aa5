"""Trading calendars and Qlib's ``TimeAdjuster``.

Qlib reads its calendar from the global data provider (``D.calendar``, backed by
``calendars/day.txt`` and ``day_future.txt``). qcelery makes the calendar an explicit
value instead: a :class:`TradingCalendar` holds the known trading days and,
optionally, a *future* part that extends them (Qlib's ``day_future.txt``), and a
:class:`TimeAdjuster` is built over one. Build it from an exchange code with
:meth:`TradingCalendar.from_exchange` (package ``exchange_calendars``), from Qlib's
files with :meth:`TradingCalendar.from_file`, or from any list of days.

``TimeAdjuster`` keeps Qlib's method names and index semantics exactly (the
conformance suite checks them against Qlib 0.9.7). Where Qlib silently returns a
wrong day or fails with a bare ``IndexError``/``AssertionError``/``TypeError``,
qcelery raises :class:`OutOfCalendarError` or another
:class:`~qcelery.errors.QceleryError` that names the date and the calendar's range.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError, OutOfCalendarError, QceleryError, TaskDefinitionError, TaskTypeError

log = logging.getLogger(__name__)

DEFAULT_EXCHANGE = "XSHG"
#: first day of Qlib's public China data; ``from_exchange`` starts there by default
DEFAULT_START = "2005-01-01"

# Exchanges that share another exchange's calendar but have no entry of their own
# in exchange_calendars (Shenzhen trades on Shanghai's days).
EXCHANGE_ALIASES: dict[str, str] = {"XSHE": "XSHG"}


def parse_time(value: Any, what: str = "", error: type[QceleryError] = TaskDefinitionError) -> pd.Timestamp:
    """Parse a date or a time (ISO text, ``date``, ``datetime``, ``Timestamp``) into a
    Timestamp without time zone. ``what`` names the value in messages (``"start"``,
    ``"SyntheticAlphaHandler end_time"``); a number raises ``TaskTypeError`` (pandas
    would read it as nanoseconds since 1970) and text that is no date ``error``."""
    where = f"{what}: " if what else ""
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        raise TaskTypeError(f"{where}{value!r} is a number, not a date; give an ISO day such as '2020-01-02'")
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise error(f"{where}{value!r} is not a date ({exc}); give an ISO day such as '2020-01-02'") from None
    if pd.isna(ts):  # pd.Timestamp("NaT") is NaT
        raise error(f"{where}{value!r} is not a date")
    return ts.tz_localize(None) if ts.tzinfo is not None else ts


def _day(value: Any, what: str) -> pd.Timestamp:
    """Parse one trading day; reject what is not a day (numbers, None, times of day)."""
    if value is None:
        raise TaskTypeError(f"{what}: None is not a date")
    ts = parse_time(value, what, ConfigError)
    if ts != ts.normalize():
        raise ConfigError(f"{what}: {value!r} has a time of day; a trading calendar holds whole days")
    return ts


def _day_index(dates: Iterable[Any], what: str) -> pd.DatetimeIndex:
    if isinstance(dates, (str, bytes)) or not isinstance(dates, Iterable):
        raise TaskTypeError(f"{what} must be a sequence of days, got {type(dates).__name__}")
    days = [_day(d, f"{what}[{i}]") for i, d in enumerate(dates)]
    return pd.DatetimeIndex(sorted(set(days)))


class TradingCalendar:
    """The trading days of one market, plus optional known future trading days.

    ``dates`` are the days data exist for (Qlib's ``day.txt``); ``future_dates`` the
    same calendar extended into the future (Qlib's ``day_future.txt``) — it may also
    hold only the days after ``dates``. Inputs may be ISO strings, ``date``,
    ``datetime`` or ``pd.Timestamp``; they are sorted and de-duplicated. A future day
    that falls inside the span of ``dates`` but is not one of them is rejected: the two
    parts must agree.
    """

    def __init__(self, dates: Iterable[Any], future_dates: Iterable[Any] | None = None, *, name: str | None = None):
        self._dates = _day_index(dates, "dates")
        if len(self._dates) == 0:
            raise ConfigError("a TradingCalendar needs at least one trading day; dates is empty")
        if future_dates is None:
            self._future = self._dates
        else:
            extra = _day_index(future_dates, "future_dates")
            inside = extra[(extra >= self._dates[0]) & (extra <= self._dates[-1])]
            unknown = inside.difference(self._dates)
            if len(unknown):
                raise ConfigError(
                    f"future_dates contains {unknown[0].date()}, which lies within dates "
                    f"({self._dates[0].date()}..{self._dates[-1].date()}) but is not a trading day there; "
                    "the future calendar must extend the plain one, not contradict it"
                )
            self._future = self._dates.union(extra)
        self.name = name

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_exchange(
        cls,
        code: str = DEFAULT_EXCHANGE,
        start: Any = None,
        end: Any = None,
        *,
        future_end: Any = None,
    ) -> TradingCalendar:
        """The sessions of exchange ``code`` (an ``exchange_calendars`` code: XSHG, XSHE, XNYS, ...).

        ``dates`` run from ``start`` (default 2005-01-01, or the first day the package
        knows for that exchange) to ``end`` (default: today); the future part runs on to
        ``future_end`` (default: the last session the package knows, about a year ahead,
        which for XSHG is the last year whose holidays are published). Qlib has no
        equivalent: it reads whatever ``day.txt`` / ``day_future.txt`` were dumped.
        """
        import exchange_calendars as xcals

        if not isinstance(code, str) or not code:
            raise TaskTypeError(f"exchange code must be a non-empty string such as 'XSHG', got {code!r}")
        resolved = EXCHANGE_ALIASES.get(code.upper(), code.upper())
        try:
            probe = xcals.get_calendar(resolved)  # default span; exchange_calendars caches it
        except xcals.errors.InvalidCalendarName:
            known = ", ".join(sorted(set(xcals.get_calendar_names(include_aliases=False)) | set(EXCHANGE_ALIASES)))
            raise ConfigError(f"unknown exchange calendar {code!r}; known codes: {known}") from None

        start_ts = _day(start if start is not None else DEFAULT_START, "start")
        bound_min = probe.bound_min()
        if bound_min is not None and start_ts < bound_min:
            if start is not None:
                raise ConfigError(f"start {start!r} is before the first day exchange_calendars knows for {code} ({bound_min.date()})")
            start_ts = pd.Timestamp(bound_min)
        kwargs: dict[str, Any] = {"start": start_ts}
        if future_end is not None:
            kwargs["end"] = _day(future_end, "future_end")
        try:
            sessions = pd.DatetimeIndex(xcals.get_calendar(resolved, **kwargs).sessions)
        except ValueError as exc:  # exchange_calendars' message names the recorded range
            raise ConfigError(f"exchange calendar {code} from {start_ts.date()}: {exc}") from None
        end_ts = _day(end, "end") if end is not None else pd.Timestamp(_dt.date.today())
        if end is not None and end_ts > sessions[-1]:
            raise ConfigError(
                f"end {end!r} is after the last {code} session available ({sessions[-1].date()}); "
                "lower end, raise future_end, or upgrade exchange_calendars"
            )
        plain = sessions[sessions <= end_ts]
        if len(plain) == 0:
            raise ConfigError(f"no {code} session between start {start_ts.date()} and end {end_ts.date()}")
        log.debug("%s calendar: %s..%s, future to %s", code, plain[0].date(), plain[-1].date(), sessions[-1].date())
        return cls(plain, sessions, name=code.upper())

    @classmethod
    def from_file(cls, path: str | Path, future_path: str | Path | None = None) -> TradingCalendar:
        """Read Qlib's calendar file (one day per line, e.g. ``calendars/day.txt``).

        The future part comes from ``future_path`` or, when not given, from the sibling
        ``<stem>_future<suffix>`` (Qlib's ``day_future.txt``) if that file exists.
        """
        path = Path(path)
        dates = _read_days(path)
        if future_path is None:
            sibling = path.with_name(f"{path.stem}_future{path.suffix}")
            future = _read_days(sibling) if sibling.is_file() else None
        else:
            future = _read_days(Path(future_path))
        return cls(dates, future, name=path.name)

    # -- access ---------------------------------------------------------------------
    @property
    def dates(self) -> pd.DatetimeIndex:
        """The known trading days (Qlib: ``D.calendar()``)."""
        return self._dates

    @property
    def future_dates(self) -> pd.DatetimeIndex:
        """Known trading days extended by the future part (Qlib: ``D.calendar(future=True)``)."""
        return self._future

    @property
    def start(self) -> pd.Timestamp:
        return self._dates[0]

    @property
    def end(self) -> pd.Timestamp:
        """The last known (non-future) trading day."""
        return self._dates[-1]

    def days(self, future: bool = False, end_time: Any = None) -> pd.DatetimeIndex:
        """The calendar as Qlib's ``D.calendar(future=..., end_time=...)`` returns it."""
        days = self._future if future else self._dates
        if end_time is not None:
            days = days[days <= _day(end_time, "end_time")]
        return days

    def __len__(self) -> int:
        return len(self._dates)

    def __contains__(self, day: Any) -> bool:
        try:
            return _day(day, "day") in self._future
        except (ConfigError, TaskTypeError):
            return False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TradingCalendar):
            return NotImplemented
        return self._dates.equals(other._dates) and self._future.equals(other._future)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking value object: compare, don't hash

    def __repr__(self) -> str:
        future = f", future to {self._future[-1].date()}" if len(self._future) > len(self._dates) else ""
        name = f"{self.name} " if self.name else ""
        return f"<TradingCalendar {name}{self.start.date()}..{self.end.date()} ({len(self)} days{future})>"


def _read_days(path: Path) -> list[pd.Timestamp]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"calendar file {path} does not exist") from None
    days = []
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if text:
            days.append(_day(text, f"{path}:{lineno}"))
    if not days:
        raise ConfigError(f"calendar file {path} holds no day")
    return days


def default_calendar(code: str = DEFAULT_EXCHANGE) -> TradingCalendar:
    """The calendar generators use when given ``calendar=None``: exchange ``code``'s
    sessions from :meth:`TradingCalendar.from_exchange`, built once per process.

    Pass ``settings.calendar`` as ``code`` to follow the settings.
    """
    if not isinstance(code, str) or not code:
        raise TaskTypeError(f"exchange code must be a non-empty string such as 'XSHG', got {code!r}")
    return _cached_exchange_calendar(code.upper())


def settings_calendar(settings: Any) -> TradingCalendar:
    """The default calendar named by ``settings.calendar`` (an exchange code, default XSHG)."""
    return default_calendar(settings.calendar)


@functools.lru_cache(maxsize=8)
def _cached_exchange_calendar(code: str) -> TradingCalendar:
    return TradingCalendar.from_exchange(code)


def resolve_calendar(calendar: TradingCalendar | str | None) -> TradingCalendar:
    """Accept a calendar, an exchange code, or ``None`` (the default XSHG calendar)."""
    if calendar is None:
        return default_calendar()
    if isinstance(calendar, str):
        return default_calendar(calendar)
    if isinstance(calendar, TradingCalendar):
        return calendar
    raise TaskTypeError(f"calendar must be a TradingCalendar, an exchange code or None, got {type(calendar).__name__}")


class TimeAdjuster:
    """Find and shift trading days on a calendar (Qlib's ``TimeAdjuster``).

    Differences from Qlib:

    * the calendar is explicit: ``calendar=`` (a :class:`TradingCalendar`, an exchange
      code, or ``None`` for :func:`default_calendar`) instead of the global provider;
    * ``align_seg``, ``truncate`` and ``shift`` accept lists as well as tuples (they
      return tuples, as Qlib does), and ``None`` is an open bound everywhere;
    * dates outside the calendar raise :class:`OutOfCalendarError` where Qlib returns a
      wrong day (an end before the calendar wraps to its *last* day) or fails with a
      bare ``IndexError`` / ``AssertionError`` / ``TypeError``;
    * ``shift`` treats a start landing just past the last day as out of the calendar
      (Qlib returns ``None`` there, which reads as an open start);
    * ``truncate`` accepts the calendar's first day (Qlib asserts the index is > 0).
    """

    SHIFT_SD = "sliding"
    SHIFT_EX = "expanding"

    def __init__(self, future: bool = True, end_time: Any = None, *, calendar: TradingCalendar | str | None = None):
        self.calendar = resolve_calendar(calendar)
        self._future = future
        self.cals = self.calendar.days(future=future, end_time=end_time)

    def set_end_time(self, end_time: Any = None) -> None:
        """Cut the calendar at ``end_time`` (``None``: the calendar's own end)."""
        self.cals = self.calendar.days(future=self._future, end_time=end_time)

    def _range(self) -> str:
        if len(self.cals) == 0:
            return "an empty calendar"
        part = "future " if self._future else ""
        return f"the {part}calendar {self.cals[0].date()}..{self.cals[-1].date()}"

    def get(self, idx: int | None) -> pd.Timestamp | None:
        """The day at index ``idx``; ``None`` for ``None`` or an index past the end (open end)."""
        if idx is None or idx >= len(self.cals):
            return None
        if idx < 0:
            raise OutOfCalendarError(f"index {idx} lies before the first day of {self._range()}")
        return self.cals[idx]

    def max(self) -> pd.Timestamp:
        """The last day of the calendar."""
        return self.cals[-1]

    def align_idx(self, time_point: Any, tp_type: str = "start") -> int | None:
        """Index of ``time_point`` in the calendar, as Qlib computes it.

        ``"start"``: the first trading day on or after it (may be ``len(cals)``);
        ``"end"``: the last trading day on or before it (may be ``-1``). ``None`` stays
        ``None`` (an open bound).
        """
        if time_point is None:
            return None
        return self._index(time_point, tp_type)

    def _index(self, time_point: Any, tp_type: str = "start") -> int:
        """:meth:`align_idx` of a date (not ``None``)."""
        ts = parse_time(time_point)
        if tp_type == "start":
            return int(self.cals.searchsorted(ts, side="left"))
        if tp_type == "end":
            return int(self.cals.searchsorted(ts, side="right")) - 1
        raise ConfigError(f"tp_type must be 'start' or 'end', got {tp_type!r}")

    def cal_interval(self, time_point_A: Any, time_point_B: Any) -> int:
        """Trading days from ``time_point_B`` to ``time_point_A`` (A - B), both aligned as starts."""
        if time_point_A is None or time_point_B is None:
            raise TaskDefinitionError(f"cal_interval needs two dates, got {time_point_A!r} and {time_point_B!r} (None is an open bound)")
        return self._index(time_point_A) - self._index(time_point_B)

    def align_time(self, time_point: Any, tp_type: str = "start") -> pd.Timestamp | None:
        """The trading day ``time_point`` aligns to (see :meth:`align_idx`); ``None`` stays ``None``."""
        if time_point is None:
            return None
        idx = self._index(time_point, tp_type=tp_type)
        if idx >= len(self.cals):
            raise OutOfCalendarError(f"{format_day(time_point)} is after the last day of {self._range()}")
        if idx < 0:
            raise OutOfCalendarError(f"{format_day(time_point)} is before the first day of {self._range()}")
        return self.cals[idx]

    def align_seg(self, segment: Mapping[str, Sequence[Any]] | Sequence[Any]) -> Any:
        """Align a ``(start, end)`` segment, or a dict of them, to trading days.

        Starts move forward to the next trading day, ends back to the previous one; the
        result holds tuples of ``pd.Timestamp`` (``None`` kept). A segment holding no
        trading day at all (e.g. a weekend) raises :class:`~qcelery.errors.TaskDefinitionError`
        (Qlib returns it inverted).
        """
        if isinstance(segment, Mapping):
            return {k: self._align_one(seg, repr(k)) for k, seg in segment.items()}
        return self._align_one(segment, "segment")

    def _align_one(self, seg: Any, name: str) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
        start, end = _pair(seg, name)
        out = self.align_time(start, tp_type="start"), self.align_time(end, tp_type="end")
        if out[0] is not None and out[1] is not None and out[0] > out[1]:
            raise TaskDefinitionError(f"segment {name} ({format_day(start)}, {format_day(end)}) holds no trading day of {self._range()}")
        return out

    def truncate(self, segment: Sequence[Any], test_start: Any, days: int) -> tuple:
        """Cut ``segment`` so that it ends at least ``days`` trading days before ``test_start``.

        Each bound becomes ``min(bound, test_start - days)`` in trading-day indices, as in
        Qlib; an open (``None``) start stays open and an open end is cut.
        """
        start, end = _pair(segment, "segment")
        if test_start is None:
            raise TaskDefinitionError("truncate needs a test start date, got None")
        days = _non_negative_int(days, "days")
        limit = self._index(test_start) - days
        if limit < 0:
            raise OutOfCalendarError(
                f"truncating {days} trading days before test start {format_day(test_start)} leaves no day in {self._range()}"
            )
        new_start = None if start is None else self.get(min(self._index(start), limit))
        new_end = self.get(limit if end is None else min(self._index(end), limit))
        return new_start, new_end

    def _add_step(self, index: int | None, step: int) -> int | None:
        return None if index is None else index + step

    def shift(self, seg: Sequence[Any], step: int, rtype: str = SHIFT_SD) -> tuple:
        """Move a segment ``step`` trading days forward (``sliding``) or only its end (``expanding``).

        Open bounds stay open; an end past the calendar becomes ``None`` (as in Qlib). A
        start past the last day raises :class:`OutOfCalendarError` (a ``KeyError``, as in Qlib).
        """
        start, end = _pair(seg, "segment")
        start_idx, end_idx = self.align_idx(start, tp_type="start"), self.align_idx(end, tp_type="end")
        if rtype == self.SHIFT_SD:
            start_idx = self._add_step(start_idx, step)
            end_idx = self._add_step(end_idx, step)
        elif rtype == self.SHIFT_EX:
            end_idx = self._add_step(end_idx, step)
        else:
            raise ConfigError(f"rtype must be {self.SHIFT_SD!r} or {self.SHIFT_EX!r}, got {rtype!r}")
        if start_idx is not None and start_idx >= len(self.cals):
            raise OutOfCalendarError(f"shifting {format_day(start)} by {step} days leaves {self._range()}")
        if (start_idx is not None and start_idx < 0) or (end_idx is not None and end_idx < 0):
            raise OutOfCalendarError(f"shifting ({format_day(start)}, {format_day(end)}) by {step} days leaves {self._range()}")
        return self.get(start_idx), self.get(end_idx)


def format_day(value: Any) -> str:
    """A date for messages: ISO day for midnight timestamps, ``str`` otherwise."""
    if value is None:
        return "None"
    if isinstance(value, (pd.Timestamp, _dt.datetime)) and pd.Timestamp(value) == pd.Timestamp(value).normalize():
        return pd.Timestamp(value).date().isoformat()
    return str(value)


def _pair(seg: Any, name: str) -> tuple[Any, Any]:
    if isinstance(seg, (tuple, list)) and len(seg) == 2:
        return seg[0], seg[1]
    raise TaskDefinitionError(f"segment {name} must be a (start, end) pair, got {seg!r}")


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TaskTypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    return int(value)
