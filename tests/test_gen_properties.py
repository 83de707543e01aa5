"""Property-based tests of the generators on random calendars and templates.

Whatever the calendar and the template: truncation keeps ``trunc_days`` trading days
between every non-test segment and the test start, expanding rolls keep the train
start, sliding rolls keep every segment's length, and consecutive test windows tile
the test period without overlap or gap.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcelery.calendar import OutOfCalendarError, TradingCalendar
from qcelery.gen import LabelHorizonGen, RollingGen

BASE = pd.date_range("2021-01-01", periods=420, freq="D")
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Case:
    calendar: TradingCalendar
    template: dict
    test_start_idx: int  # index of the aligned template test start in the future calendar
    step: int


def _index(cal: TradingCalendar, day: pd.Timestamp) -> int:
    return int(cal.future_dates.get_loc(day))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    # a calendar: random weekdays of BASE dropped as holidays, the last days a future part
    weekdays = [d for d in BASE if d.weekday() < 5]
    holidays = draw(st.sets(st.integers(0, len(weekdays) - 1), max_size=40))
    trading = [d for i, d in enumerate(weekdays) if i not in holidays]
    step = draw(st.integers(1, 30))
    n_future = draw(st.integers(step, step + 20))  # enough that no window runs off the calendar
    plain, future = trading[:-n_future], trading[-n_future:]
    cal = TradingCalendar(plain, future)

    # train < valid < test, as trading-day indices in the plain part
    n = len(plain)
    cuts = sorted(draw(st.lists(st.integers(0, n - 1), min_size=6, max_size=6, unique=True)))
    t0, t1, v0, v1, s0, s1 = cuts

    def loose(i: int, side: str) -> pd.Timestamp:
        """The day at index i, or a non-trading day that aligns back to it."""
        day = plain[i]
        if side == "start" and i > 0:
            slack = (day - plain[i - 1]).days - 1
        elif side == "end" and i < n - 1:
            slack = (plain[i + 1] - day).days - 1
        else:
            slack = 0
        shift = draw(st.integers(0, slack))
        return day - pd.Timedelta(days=shift) if side == "start" else day + pd.Timedelta(days=shift)

    as_str = draw(st.booleans())

    def fmt(day: pd.Timestamp) -> object:
        return day.date().isoformat() if as_str else day

    open_end = draw(st.booleans())
    segments = {
        "train": [fmt(loose(t0, "start")), fmt(loose(t1, "end"))],
        "valid": (fmt(loose(v0, "start")), fmt(loose(v1, "end"))),
        "test": [fmt(loose(s0, "start")), None if open_end else fmt(loose(s1, "end"))],
    }
    template = {
        "model": {"class": "LinearModel", "module_path": "qcelery.models"},
        "dataset": {"kwargs": {"handler": {"class": "H", "kwargs": {"end_time": fmt(plain[s1])}}, "segments": segments}},
    }
    return Case(cal, template, s0, step)


def seg(task: dict, key: str) -> tuple:
    return task["dataset"]["kwargs"]["segments"][key]


def idx(case: Case, day: pd.Timestamp) -> int:
    return _index(case.calendar, day)


@PROPS
@given(case=cases(), rtype=st.sampled_from([RollingGen.ROLL_EX, RollingGen.ROLL_SD]), trunc_days=st.one_of(st.none(), st.integers(0, 6)))
def test_rolling_properties(case: Case, rtype: str, trunc_days: int | None) -> None:
    snapshot = copy.deepcopy(case.template)
    gen = RollingGen(step=case.step, rtype=rtype, trunc_days=trunc_days, calendar=case.calendar)
    if trunc_days is not None and case.test_start_idx < trunc_days:
        with pytest.raises(OutOfCalendarError):
            gen.generate(case.template)
        return
    tasks = gen.generate(case.template)
    assert case.template == snapshot

    # the test windows tile the test period: step days each, no overlap, no gap
    tests = [(idx(case, seg(t, "test")[0]), idx(case, seg(t, "test")[1])) for t in tasks]
    assert tests[0][0] == case.test_start_idx
    for (start, end), (next_start, _) in itertools.pairwise(tests):
        assert end - start + 1 == case.step
        assert next_start == end + 1
    test_end = case.template["dataset"]["kwargs"]["segments"]["test"][1]
    last_day = case.calendar.end if test_end is None else min(pd.Timestamp(test_end), case.calendar.end)
    last_day_idx = int(case.calendar.future_dates.searchsorted(last_day, side="right")) - 1
    assert tests[-1][0] <= last_day_idx < tests[-1][0] + case.step  # the last window reaches the end

    for t in tasks:
        test_start = idx(case, seg(t, "test")[0])
        for key in ("train", "valid"):
            start, end = (idx(case, d) for d in seg(t, key))
            assert start <= end
            if trunc_days is not None:
                assert end <= test_start - trunc_days, (key, trunc_days)

    lengths = [{k: idx(case, seg(t, k)[1]) - idx(case, seg(t, k)[0]) for k in ("train", "valid", "test")} for t in tasks]
    if rtype == RollingGen.ROLL_EX:
        assert len({seg(t, "train")[0] for t in tasks}) == 1
        assert len({(ln["valid"], ln["test"]) for ln in lengths}) == 1
    else:
        assert all(ln == lengths[0] for ln in lengths)

    # handler_mod: the handler always covers the window's test segment
    for t in tasks:
        assert pd.Timestamp(t["dataset"]["kwargs"]["handler"]["kwargs"]["end_time"]) >= seg(t, "test")[1]


@PROPS
@given(case=cases(), horizon=st.lists(st.integers(0, 10), min_size=1, max_size=3), leak=st.integers(0, 3))
def test_multi_horizon_properties(case: Case, horizon: list[int], leak: int) -> None:
    gen = LabelHorizonGen(horizon, label_leak_n=leak, calendar=case.calendar)
    if case.test_start_idx < max(horizon) + leak:
        with pytest.raises(OutOfCalendarError):
            gen.generate(case.template)
        return
    tasks = gen.generate(case.template)
    assert len(tasks) == len(horizon)
    for t, hr in zip(tasks, horizon, strict=True):
        test_start = idx(case, seg(t, "test")[0])
        assert test_start == case.test_start_idx
        for key in ("train", "valid"):
            assert idx(case, seg(t, key)[1]) <= test_start - (hr + leak)
        assert t["dataset"]["kwargs"]["handler"]["kwargs"]["label"] == [f"Ref($close, -{hr + 1}) / Ref($close, -1) - 1"]
