"""qcelery's generators reproduce Qlib 0.9.7's tasks exactly.

Cases come from ``../shared/conformance/qlib_taskgen_xshg.json`` (see its README):
every segment and ``handler_end_time`` of every expected task must match, on the
calendar stored in the file. Qlib's exception names map to qcelery errors as
documented in :mod:`qcelery.gen` (``QLIB_ERRORS`` below).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from qcelery.calendar import OutOfCalendarError, TradingCalendar
from qcelery.errors import ConfigError, TaskDefinitionError, TaskTypeError
from qcelery.gen import MultiHorizonGenBase, RollingGen, TaskGen, task_generator

CONFORMANCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"
VECTORS = CONFORMANCE_DIR / "qlib_taskgen_xshg.json"

# What a Qlib exception becomes in qcelery (documented in qcelery.gen's docstring).
QLIB_ERRORS: dict[str, tuple[type[Exception], ...]] = {
    "IndexError": (OutOfCalendarError,),
    "AssertionError": (OutOfCalendarError,),
    "KeyError": (OutOfCalendarError, TaskDefinitionError),
    "TypeError": (TaskDefinitionError, TaskTypeError),
    "NotImplementedError": (ConfigError, TaskDefinitionError),
}


@lru_cache(maxsize=1)
def _vectors() -> dict[str, Any]:
    return json.loads(VECTORS.read_text())


@lru_cache(maxsize=1)
def _calendar() -> TradingCalendar:
    data = _vectors()
    return TradingCalendar(data["calendar"], data["future_calendar"], name="conformance XSHG")


def _case_ids() -> list[str]:
    ids = []
    for i, case in enumerate(_vectors()["cases"]):
        p = case["params"]
        if case["kind"] == "rolling":
            detail = f"{p['rtype']}-step{p['step']}-trunc{p['trunc_days']}"
        elif case["kind"] == "multi_horizon":
            detail = f"h{'_'.join(map(str, p['horizon']))}-leak{p['label_leak_n']}"
        else:
            detail = "+".join(next(iter(g)) for g in p["generators"])
        ids.append(f"{i:03d}-{case['kind']}-{case['template']}-{detail}")
    return ids


class QlibLabelHorizonGen(MultiHorizonGenBase):
    """The subclass the vectors were produced with (see the conformance README)."""

    def set_horizon(self, task: dict, hr: int) -> None:
        task["dataset"]["kwargs"]["handler"]["kwargs"]["label"] = [f"Ref($close, -{hr + 1}) / Ref($close, -1) - 1"]


def _generator(kind: str, params: dict[str, Any], calendar: TradingCalendar) -> TaskGen:
    if kind in ("rolling", "RollingGen"):
        return RollingGen(step=params["step"], rtype=params["rtype"], trunc_days=params.get("trunc_days"), calendar=calendar)
    if kind in ("multi_horizon", "MultiHorizon"):
        return QlibLabelHorizonGen(horizon=params["horizon"], label_leak_n=params["label_leak_n"], calendar=calendar)
    raise AssertionError(f"conformance file names an unknown generator {kind!r}")


def _generators(case: dict[str, Any], calendar: TradingCalendar) -> list[TaskGen]:
    if case["kind"] == "task_generator":
        return [_generator(name, params, calendar) for g in case["params"]["generators"] for name, params in g.items()]
    return [_generator(case["kind"], case["params"], calendar)]


def _day(value: Any) -> str | None:
    """Normalise a date (Timestamp, datetime, date, ISO string) to its ISO day."""
    if value is None:
        return None
    assert isinstance(value, (str, pd.Timestamp, dt.date)), f"unexpected date value {value!r}"
    ts = pd.Timestamp(value)
    assert ts == ts.normalize(), f"{value!r} is not a whole day"
    return ts.date().isoformat()


def _segments(task: dict) -> dict[str, list[str | None]]:
    return {k: [_day(seg[0]), _day(seg[1])] for k, seg in task["dataset"]["kwargs"]["segments"].items()}


def _handler_end_time(task: dict) -> str | None:
    handler = task["dataset"]["kwargs"]["handler"]
    if not isinstance(handler, dict):
        return None
    return _day(handler["kwargs"].get("end_time"))


@pytest.mark.parametrize("index", range(len(_vectors()["cases"])), ids=_case_ids())
def test_matches_qlib(index: int) -> None:
    case = _vectors()["cases"][index]
    template = copy.deepcopy(case["input"])
    generators = _generators(case, _calendar())

    if case["error"] is not None:
        with pytest.raises(QLIB_ERRORS[case["error"]]):
            task_generator(template, generators)
        return

    tasks = task_generator(template, generators)

    assert template == case["input"], "the generator changed the caller's template"
    assert len(tasks) == len(case["expected"]), [_segments(t)["test"] for t in tasks]
    for n, (task, expected) in enumerate(zip(tasks, case["expected"], strict=True)):
        assert _segments(task) == expected["segments"], f"task {n}"
        if "handler_end_time" in expected:
            assert _handler_end_time(task) == _day(expected["handler_end_time"]), f"task {n} handler end_time"
        if "label" in expected:
            assert task["dataset"]["kwargs"]["handler"]["kwargs"]["label"] == expected["label"], f"task {n}"
        for key, seg in task["dataset"]["kwargs"]["segments"].items():
            assert isinstance(seg, tuple), f"task {n} segment {key} is a {type(seg).__name__}, Qlib gives tuples"


def test_every_case_is_checked() -> None:
    data = _vectors()
    assert len(data["cases"]) == 113
    assert sum(len(c["expected"]) for c in data["cases"]) == 1404
    assert {c["error"] for c in data["cases"]} <= {None, *QLIB_ERRORS}


def test_tuple_and_list_segments_give_the_same_tasks() -> None:
    case = next(c for c in _vectors()["cases"] if c["kind"] == "rolling" and c["params"]["trunc_days"])
    as_tuples = copy.deepcopy(case["input"])
    segs = as_tuples["dataset"]["kwargs"]["segments"]
    for key in segs:
        segs[key] = tuple(segs[key])
    gen = _generator("rolling", case["params"], _calendar())
    assert [_segments(t) for t in gen.generate(as_tuples)] == [e["segments"] for e in case["expected"]]


def test_timestamps_and_dates_in_the_template_give_the_same_tasks() -> None:
    case = next(c for c in _vectors()["cases"] if c["kind"] == "rolling" and c["template"] == "weekend_edges")
    typed = copy.deepcopy(case["input"])
    segs = typed["dataset"]["kwargs"]["segments"]
    segs["train"] = [pd.Timestamp(segs["train"][0]), dt.date.fromisoformat(segs["train"][1])]
    segs["test"] = [dt.datetime.fromisoformat(segs["test"][0]), segs["test"][1]]
    gen = _generator("rolling", case["params"], _calendar())
    assert [_segments(t) for t in gen.generate(typed)] == [e["segments"] for e in case["expected"]]
