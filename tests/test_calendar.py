"""TradingCalendar construction and TimeAdjuster's Qlib semantics (indices, open bounds, errors)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from qcelery.calendar import OutOfCalendarError, TimeAdjuster, TradingCalendar, default_calendar, settings_calendar
from qcelery.errors import ConfigError, QceleryError, TaskDefinitionError, TaskTypeError
from qcelery.settings import Settings

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "qlib_taskgen_xshg.json"

# A week of 2024 around a weekend, plus two future days
DAYS = ["2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05", "2024-01-08", "2024-01-09"]
FUTURE = ["2024-01-10", "2024-01-11"]


@pytest.fixture
def cal() -> TradingCalendar:
    return TradingCalendar(DAYS, DAYS + FUTURE)


def T(day: str) -> pd.Timestamp:
    return pd.Timestamp(day)


# -- TradingCalendar ----------------------------------------------------------------
def test_days_of_any_type_are_sorted_and_deduplicated() -> None:
    cal = TradingCalendar(["2024-01-03", dt.date(2024, 1, 2), pd.Timestamp("2024-01-03"), dt.datetime(2024, 1, 4)])
    assert list(cal.dates) == [T("2024-01-02"), T("2024-01-03"), T("2024-01-04")]
    assert cal.future_dates.equals(cal.dates)
    assert (cal.start, cal.end, len(cal)) == (T("2024-01-02"), T("2024-01-04"), 3)


def test_future_part_may_be_only_the_tail(cal: TradingCalendar) -> None:
    tail_only = TradingCalendar(DAYS, FUTURE)
    assert tail_only == cal
    assert list(cal.days(future=True))[-2:] == [T(d) for d in FUTURE]
    assert list(cal.days(future=True, end_time="2024-01-09")) == [T(d) for d in DAYS]
    assert list(cal.days(end_time="2024-01-06")) == [T(d) for d in DAYS[:4]]
    assert "2024-01-11" in cal and "2024-01-06" not in cal and "not a day" not in cal


@pytest.mark.parametrize(
    ("dates", "error", "fragment"),
    [
        ([], ConfigError, "empty"),
        (["2024-01-02", "2024-13-45"], ConfigError, "dates[1]"),
        (["2024-01-02", None], TaskTypeError, "dates[1]"),
        ([20240102], TaskTypeError, "number"),
        (["2024-01-02 09:30"], ConfigError, "time of day"),
        ("2024-01-02", TaskTypeError, "sequence"),
    ],
)
def test_bad_days_are_rejected_naming_the_value(dates: object, error: type, fragment: str) -> None:
    with pytest.raises(error, match=re.escape(fragment)):
        TradingCalendar(dates)  # type: ignore[arg-type]  # wrong on purpose


def test_future_part_contradicting_the_plain_one_is_rejected() -> None:
    with pytest.raises(ConfigError, match="2024-01-06"):
        TradingCalendar(DAYS, ["2024-01-06", *FUTURE])


def test_from_file_reads_qlib_day_txt_and_its_future_sibling(tmp_path: Path, cal: TradingCalendar) -> None:
    cals = tmp_path / "calendars"
    cals.mkdir()
    (cals / "day.txt").write_text("\n".join(DAYS) + "\n\n")
    assert TradingCalendar.from_file(cals / "day.txt").future_dates.equals(TradingCalendar(DAYS).dates)
    (cals / "day_future.txt").write_text("\n".join(DAYS + FUTURE) + "\n")
    assert TradingCalendar.from_file(cals / "day.txt") == cal
    assert TradingCalendar.from_file(cals / "day.txt", future_path=cals / "day.txt") == TradingCalendar(DAYS)


def test_from_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        TradingCalendar.from_file(tmp_path / "missing.txt")
    bad = tmp_path / "day.txt"
    bad.write_text("2024-01-02\n2024-01-3x\n")
    with pytest.raises(ConfigError, match=r"day\.txt:2"):
        TradingCalendar.from_file(bad)


def test_from_exchange_xshg_is_the_calendar_qlib_used_in_the_conformance_vectors() -> None:
    data = json.loads(VECTORS.read_text())
    cal = TradingCalendar.from_exchange("XSHG", start="2005-01-01", end="2025-12-31", future_end="2026-12-31")
    assert cal == TradingCalendar(data["calendar"], data["future_calendar"])
    assert TradingCalendar.from_exchange("XSHE", "2024-01-01", "2024-12-31", future_end="2025-06-30") == (
        TradingCalendar.from_exchange("XSHG", "2024-01-01", "2024-12-31", future_end="2025-06-30")
    )


def test_from_exchange_xnys_skips_us_holidays() -> None:
    cal = TradingCalendar.from_exchange("XNYS", start="2024-01-01", end="2024-12-31", future_end="2025-03-31")
    assert "2024-07-04" not in cal and "2024-07-05" in cal and "2025-01-02" in cal
    assert cal.end == T("2024-12-31") and cal.future_dates[-1] == T("2025-03-31")


def test_from_exchange_errors() -> None:
    with pytest.raises(ConfigError, match="unknown exchange calendar 'XXXX'.*XSHG"):
        TradingCalendar.from_exchange("XXXX")
    with pytest.raises(ConfigError, match="2090-01-01"):
        TradingCalendar.from_exchange("XSHG", start="2020-01-01", end="2090-01-01")
    with pytest.raises(ConfigError, match="before the first day"):
        TradingCalendar.from_exchange("XSHG", start="1980-01-01")


def test_default_calendar_is_built_once_and_reaches_into_the_future() -> None:
    cal = default_calendar()
    assert default_calendar("XSHG") is cal and default_calendar("xshg") is cal
    assert settings_calendar(Settings(calendar="xshg")) is cal
    assert TimeAdjuster().calendar is cal  # calendar=None: the default
    assert cal.end <= pd.Timestamp(dt.date.today()) and cal.end <= cal.future_dates[-1]
    assert cal.start == T("2005-01-04")


# -- TimeAdjuster: Qlib's index semantics ----------------------------------------------
def test_time_adjuster_uses_the_future_part_unless_told_not_to(cal: TradingCalendar) -> None:
    assert TimeAdjuster(calendar=cal).max() == T("2024-01-11")
    assert TimeAdjuster(future=False, calendar=cal).max() == T("2024-01-09")
    ta = TimeAdjuster(future=True, end_time="2024-01-08", calendar=cal)
    assert ta.max() == T("2024-01-08")
    ta.set_end_time()
    assert ta.max() == T("2024-01-11")


def test_align_idx_start_and_end_like_bisect(cal: TradingCalendar) -> None:
    ta = TimeAdjuster(future=False, calendar=cal)
    assert ta.align_idx("2024-01-06") == 4  # Saturday -> next Monday
    assert ta.align_idx("2024-01-06", tp_type="end") == 3  # -> previous Friday
    assert ta.align_idx("2024-01-05") == ta.align_idx("2024-01-05", tp_type="end") == 3
    assert ta.align_idx("2023-12-01") == 0 and ta.align_idx("2023-12-01", "end") == -1
    assert ta.align_idx("2025-01-01") == len(DAYS) and ta.align_idx("2025-01-01", "end") == len(DAYS) - 1
    assert ta.align_idx(None) is None
    with pytest.raises(ConfigError, match="tp_type"):
        ta.align_idx("2024-01-05", tp_type="middle")


def test_get_returns_none_past_the_end_and_refuses_negative_indices(cal: TradingCalendar) -> None:
    ta = TimeAdjuster(future=False, calendar=cal)
    assert ta.get(0) == T("2024-01-02") and ta.get(len(DAYS)) is None and ta.get(None) is None
    with pytest.raises(OutOfCalendarError):
        ta.get(-1)  # Qlib would wrap round to the last day


def test_align_time_and_align_seg(cal: TradingCalendar) -> None:
    ta = TimeAdjuster(future=False, calendar=cal)
    assert ta.align_time("2024-01-07") == T("2024-01-08")
    assert ta.align_time("2024-01-07", tp_type="end") == T("2024-01-05")
    assert ta.align_time(None) is None
    segs = ta.align_seg({"train": ["2024-01-01", "2024-01-06"], "test": ("2024-01-07", None)})
    assert segs == {"train": (T("2024-01-02"), T("2024-01-05")), "test": (T("2024-01-08"), None)}
    assert ta.align_seg(["2024-01-03", "2024-01-04"]) == (T("2024-01-03"), T("2024-01-04"))


def test_dates_outside_the_calendar_raise_instead_of_wrapping(cal: TradingCalendar) -> None:
    ta = TimeAdjuster(future=False, calendar=cal)
    with pytest.raises(OutOfCalendarError, match="2024-02-01 is after the last day .*2024-01-09"):
        ta.align_time("2024-02-01")  # Qlib: IndexError
    with pytest.raises(OutOfCalendarError, match="2023-12-01 is before the first day"):
        ta.align_time("2023-12-01", tp_type="end")  # Qlib: silently the calendar's last day
    with pytest.raises(TaskDefinitionError, match="holds no trading day"):
        ta.align_seg(("2024-01-06", "2024-01-07"))  # a weekend; Qlib returns it inverted


def test_cal_interval_counts_trading_days(cal: TradingCalendar) -> None:
    ta = TimeAdjuster(calendar=cal)
    assert ta.cal_interval("2024-01-09", "2024-01-05") == 2
    assert ta.cal_interval("2024-01-06", "2024-01-05") == 1  # a Saturday counts as the next Monday
    assert ta.cal_interval("2024-01-02", "2024-01-03") == -1
    with pytest.raises(TaskDefinitionError):
        ta.cal_interval(None, "2024-01-03")


def test_truncate_like_qlib_with_open_bounds(cal: TradingCalendar) -> None:
    ta = TimeAdjuster(calendar=cal)
    # test starts 2024-01-09 (index 5): 2 days before is index 3 = 2024-01-05
    assert ta.truncate(("2024-01-02", "2024-01-08"), "2024-01-09", 2) == (T("2024-01-02"), T("2024-01-05"))
    assert ta.truncate(["2024-01-02", "2024-01-03"], "2024-01-09", 2) == (T("2024-01-02"), T("2024-01-03"))
    assert ta.truncate((None, None), "2024-01-09", 2) == (None, T("2024-01-05"))
    # both bounds are capped, as in Qlib: a segment after the limit collapses onto it
    assert ta.truncate(("2024-01-08", "2024-01-09"), "2024-01-09", 2) == (T("2024-01-05"), T("2024-01-05"))
    assert ta.truncate(("2024-01-02", "2024-01-09"), "2024-01-09", 5) == (T("2024-01-02"), T("2024-01-02"))
    with pytest.raises(OutOfCalendarError, match="leaves no day"):
        ta.truncate(("2024-01-02", "2024-01-09"), "2024-01-09", 6)  # Qlib: AssertionError
    with pytest.raises(ConfigError):
        ta.truncate(("2024-01-02", "2024-01-09"), "2024-01-09", -1)


def test_shift_sliding_expanding_and_the_end_of_the_calendar(cal: TradingCalendar) -> None:
    ta = TimeAdjuster(calendar=cal)  # future: 8 days
    assert ta.shift(("2024-01-02", "2024-01-03"), 2) == (T("2024-01-04"), T("2024-01-05"))
    assert ta.shift(["2024-01-02", "2024-01-03"], 2, rtype=ta.SHIFT_EX) == (T("2024-01-02"), T("2024-01-05"))
    assert ta.shift((None, "2024-01-03"), 1) == (None, T("2024-01-04"))
    assert ta.shift(("2024-01-09", "2024-01-10"), 2) == (T("2024-01-11"), None)  # end past the calendar: open
    with pytest.raises(KeyError):  # Qlib's signal for "no more rolling"
        ta.shift(("2024-01-10", "2024-01-11"), 2)
    with pytest.raises(OutOfCalendarError):  # Qlib returns (None, None) here: an open start
        ta.shift(("2024-01-10", "2024-01-11"), 1 + 1)
    with pytest.raises(ConfigError, match="rtype"):
        ta.shift(("2024-01-02", "2024-01-03"), 1, rtype="rolling")


def test_every_calendar_error_is_a_qcelery_error(cal: TradingCalendar) -> None:
    ta = TimeAdjuster(calendar=cal)
    for call in (lambda: ta.align_time("2030-01-01"), lambda: ta.shift(("2024-01-11", None), 1), lambda: ta.align_seg(5)):
        with pytest.raises(QceleryError):
            call()
