"""Generators beyond the conformance vectors: bad input, template safety, GridGen, ModelGen, dry_run."""

from __future__ import annotations

import copy
from functools import lru_cache

import pandas as pd
import pytest

from qcelery.calendar import OutOfCalendarError, TradingCalendar
from qcelery.errors import ConfigError, QceleryError, TaskDefinitionError, TaskTypeError
from qcelery.gen import (
    GridGen,
    LabelHorizonGen,
    ModelGen,
    MultiHorizonGenBase,
    RollingGen,
    TaskGen,
    dry_run,
    handler_mod,
    set_path,
    task_generator,
)


@lru_cache(maxsize=1)
def xshg() -> TradingCalendar:
    """XSHG days of 2020-2023, with 2024 as the future part: fixed, whatever today is."""
    return TradingCalendar.from_exchange("XSHG", start="2020-01-01", end="2023-12-31", future_end="2024-12-31")


def template(**segments: object) -> dict:
    segs = segments or {
        "train": ["2020-01-01", "2021-12-31"],
        "valid": ["2022-01-01", "2022-06-30"],
        "test": ["2022-07-01", "2023-06-30"],
    }
    return {
        "model": {"class": "LinearModel", "module_path": "qcelery.models", "kwargs": {"alpha": 1.0}},
        "dataset": {
            "class": "DatasetH",
            "module_path": "qcelery.data",
            "kwargs": {
                "handler": {
                    "class": "SyntheticAlphaHandler",
                    "module_path": "qcelery.data",
                    "kwargs": {"instruments": 10, "start_time": "2020-01-01", "end_time": "2023-06-30", "seed": 1},
                },
                "segments": segs,
            },
        },
        "record": [{"class": "SignalRecord", "module_path": "qcelery.records", "kwargs": {"model": "<MODEL>"}}],
    }


def rolling(**kwargs: object) -> RollingGen:
    return RollingGen(calendar=xshg(), **kwargs)  # type: ignore[arg-type]  # each test passes the right types


def test_segments(task: dict, key: str = "test") -> tuple:
    return task["dataset"]["kwargs"]["segments"][key]


test_segments.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def days(seg: tuple) -> tuple[str | None, str | None]:
    return tuple(None if d is None else d.date().isoformat() for d in seg)  # type: ignore[return-value]  # seg is a pair


# -- bad input: clear errors before any task exists ----------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"step": 0}, ConfigError, "step must be a positive"),
        ({"step": -20}, ConfigError, "-20"),
        ({"step": "20"}, TaskTypeError, "'20'"),
        ({"step": True}, TaskTypeError, "step"),
        ({"rtype": "rolling"}, ConfigError, "'rolling'"),
        ({"trunc_days": -1}, ConfigError, "trunc_days"),
        ({"ds_extra_mod_func": "handler_mod"}, TaskTypeError, "ds_extra_mod_func"),
        ({"calendar": ["2020-01-02"]}, TaskTypeError, "calendar"),
    ],
)
def test_rolling_parameters_are_checked_at_construction(kwargs: dict, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        RollingGen(**{"calendar": xshg(), **kwargs})


@pytest.mark.parametrize(
    ("segments", "error", "fragment"),
    [
        ({"train": ["2020-01-01", "2021-12-31"]}, TaskDefinitionError, "no 'test' segment .*keys: train"),
        (
            {"train": ["2021-01-01", "2020-01-01"], "test": ["2022-01-04", None]},
            TaskDefinitionError,
            r"segments\.train: start 2021-01-01 is after end 2020-01-01",
        ),
        ({"test": [None, "2022-12-30"]}, TaskDefinitionError, "test needs a start"),
        ({"test": ["2022-01-04"]}, TaskDefinitionError, r"segments\.test must be a \[start, end\] pair"),
        ({"test": ["soon", None]}, TaskDefinitionError, "'soon' is not a date"),
        ({"test": ["2025-03-03", None]}, OutOfCalendarError, "2025-03-03 is after the last day"),
        ({"train": ["2021-01-02", "2021-01-03"], "test": ["2022-01-04", None]}, TaskDefinitionError, "'train'.*holds no trading day"),
    ],
)
def test_bad_segments_name_the_key_or_value(segments: dict, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        rolling(step=20).generate(template(**segments))


def test_template_without_segments_is_rejected() -> None:
    tpl = template()
    del tpl["dataset"]["kwargs"]["segments"]
    with pytest.raises(TaskDefinitionError, match="dataset.kwargs.segments"):
        rolling().generate(tpl)
    with pytest.raises(TaskTypeError):
        rolling().generate(["not", "a", "dict"])  # type: ignore[arg-type]  # wrong on purpose


def test_truncating_before_the_calendar_start_is_an_error_not_an_assertion() -> None:
    tpl = template(train=["2020-01-02", "2020-01-03"], test=["2020-01-06", "2020-01-31"])
    with pytest.raises(OutOfCalendarError, match="leaves no day"):
        rolling(step=5, trunc_days=5).generate(tpl)


def test_horizon_parameters_are_checked() -> None:
    for kwargs, fragment in [({"horizon": []}, "empty"), ({"horizon": [1, -1]}, "horizon"), ({"label_leak_n": -2}, "label_leak_n")]:
        with pytest.raises(QceleryError, match=fragment):
            LabelHorizonGen(calendar=xshg(), **kwargs)  # type: ignore[arg-type]  # wrong on purpose
    with pytest.raises(ConfigError, match="hr_plus_1"):
        LabelHorizonGen(calendar=xshg(), label="Ref($close, -{h})")


def test_task_generator_rejects_what_is_not_a_generator_or_a_template() -> None:
    with pytest.raises(TaskTypeError, match=r"generators\[1\]"):
        task_generator(template(), [rolling(), "rolling"])  # type: ignore[list-item]  # wrong on purpose
    with pytest.raises(TaskTypeError, match=r"tasks\[0\]"):
        task_generator(["template"], [rolling()])  # type: ignore[list-item]  # wrong on purpose


# -- rolling behaviour -------------------------------------------------------------------
def test_generators_never_mutate_the_template_even_with_a_shallow_copy_func() -> None:
    for copy_func in (copy.deepcopy, copy.copy, lambda t: t):
        tpl = template()
        snapshot = copy.deepcopy(tpl)
        tasks = rolling(step=60, task_copy_func=copy_func, trunc_days=2).generate(tpl)
        assert tpl == snapshot
        assert len({days(test_segments(t)) for t in tasks}) == len(tasks) > 1
    for gen in (LabelHorizonGen([1, 5], calendar=xshg()), GridGen({"model.kwargs.alpha": [1, 2]}), ModelGen([{"class": "M"}])):
        tpl = template()
        snapshot = copy.deepcopy(tpl)
        gen.generate(tpl)
        assert tpl == snapshot


def test_rolling_windows_cover_the_test_period_step_by_step() -> None:
    tasks = rolling(step=60, rtype=RollingGen.ROLL_SD).generate(template())
    tests = [days(test_segments(t)) for t in tasks]
    assert tests[0] == ("2022-07-01", "2022-09-23")  # 60 trading days
    assert tests[-1][0] <= "2023-06-30" < tests[-1][1]
    trains = [days(test_segments(t, "train")) for t in tasks]
    assert trains[0] == ("2020-01-02", "2021-12-31") and trains[1][0] > trains[0][0]  # sliding moves the start


def test_open_test_segment_rolls_to_the_last_known_day_into_the_future_part() -> None:
    tasks = rolling(step=40).generate(template(test=["2023-01-03", None]))
    last = test_segments(tasks[-1])
    assert last[0] <= xshg().end < last[1] and last[1] in xshg().future_dates
    # each window's test segment is closed, so handler_mod extends the handler to it
    assert tasks[-1]["dataset"]["kwargs"]["handler"]["kwargs"]["end_time"] == last[1]


def test_rolling_stops_where_the_calendar_stops_instead_of_failing() -> None:
    # no future part and the next test start lands exactly one day past the end:
    # Qlib compares None with a date there (TypeError); qcelery simply stops
    cal = TradingCalendar(pd.bdate_range("2024-01-01", periods=30))
    tpl = template(train=["2024-01-01", "2024-01-19"], test=["2024-01-22", None])
    tasks = RollingGen(step=5, calendar=cal).generate(tpl)
    assert [days(test_segments(t))[0] for t in tasks] == ["2024-01-22", "2024-01-29", "2024-02-05"]


def test_handler_mod_extends_end_time_and_leaves_string_handlers_alone() -> None:
    gen = rolling(step=60)
    tasks = gen.generate(template())
    ends = [t["dataset"]["kwargs"]["handler"]["kwargs"]["end_time"] for t in tasks]
    assert ends[0] == "2023-06-30" and ends[-1] == test_segments(tasks[-1])[1]
    tpl = template()
    tpl["dataset"]["kwargs"]["handler"] = "file:///tmp/handler.pkl"
    assert all(t["dataset"]["kwargs"]["handler"] == "file:///tmp/handler.pkl" for t in gen.generate(tpl))
    tpl = template()
    tpl["dataset"]["kwargs"]["handler"]["kwargs"]["end_time"] = None
    assert all(t["dataset"]["kwargs"]["handler"]["kwargs"]["end_time"] is None for t in gen.generate(tpl))
    no_mod = RollingGen(step=60, ds_extra_mod_func=None, calendar=xshg()).generate(template())
    assert {t["dataset"]["kwargs"]["handler"]["kwargs"]["end_time"] for t in no_mod} == {"2023-06-30"}
    handler_mod({"dataset": {"kwargs": {}}}, gen)  # no handler: nothing to do


def test_custom_test_and_train_keys() -> None:
    tpl = template(fit=["2020-01-01", "2021-12-31"], oos=["2022-01-04", "2022-06-30"])
    tasks = rolling(step=40, test_key="oos", train_key="fit").generate(tpl)
    assert len(tasks) == 3
    assert {days(test_segments(t, "fit"))[0] for t in tasks} == {"2020-01-02"}  # expanding keeps the fit start


def test_multi_horizon_truncates_by_horizon_plus_leak_on_the_future_calendar() -> None:
    class Horizon(MultiHorizonGenBase):
        def set_horizon(self, task: dict, hr: int) -> None:
            task["horizon"] = hr

    # Qlib's MultiHorizonGenBase builds TimeAdjuster() whose default is future=True:
    # a test end inside the future part stays where it is
    tpl = template(train=["2023-01-03", "2023-11-30"], test=["2023-12-01", "2024-03-29"])
    tasks = Horizon([1, 10], label_leak_n=2, calendar=xshg()).generate(tpl)
    assert [t["horizon"] for t in tasks] == [1, 10]
    assert days(test_segments(tasks[0])) == ("2023-12-01", "2024-03-29")
    cals = xshg().future_dates
    for task, hr in zip(tasks, [1, 10], strict=True):
        train_end = cals.get_loc(test_segments(task, "train")[1])
        assert cals.get_loc(test_segments(task)[0]) - train_end == hr + 2


def test_label_horizon_gen_writes_qlibs_return_label() -> None:
    tasks = LabelHorizonGen([1, 5], calendar=xshg()).generate(template())
    assert [t["dataset"]["kwargs"]["handler"]["kwargs"]["label"] for t in tasks] == [
        ["Ref($close, -2) / Ref($close, -1) - 1"],
        ["Ref($close, -6) / Ref($close, -1) - 1"],
    ]
    custom = LabelHorizonGen([3], label=["h{hr}"], label_path="model.kwargs.target", calendar=xshg())
    assert custom.generate(template())[0]["model"]["kwargs"]["target"] == ["h3"]


# -- GridGen, ModelGen, composition, dry_run ------------------------------------------
def test_grid_is_a_cartesian_product_in_key_order() -> None:
    gen = GridGen({"model.kwargs.alpha": [0.1, 1.0], "dataset.kwargs.handler.kwargs.seed": [1, 2, 3]})
    tasks = gen.generate(template())
    assert [(t["model"]["kwargs"]["alpha"], t["dataset"]["kwargs"]["handler"]["kwargs"]["seed"]) for t in tasks] == [
        (0.1, 1),
        (0.1, 2),
        (0.1, 3),
        (1.0, 1),
        (1.0, 2),
        (1.0, 3),
    ]


def test_grid_as_a_list_of_points_and_paths_into_lists() -> None:
    gen = GridGen([{"model.kwargs.alpha": 0.5, "record.0.kwargs.model": "<M>"}, {"model.kwargs.alpha": 5.0}])
    tasks = gen.generate(template())
    assert [t["model"]["kwargs"]["alpha"] for t in tasks] == [0.5, 5.0]
    assert tasks[0]["record"][0]["kwargs"]["model"] == "<M>" and tasks[1]["record"][0]["kwargs"]["model"] == "<MODEL>"


def test_grid_creates_a_missing_kwargs_but_refuses_other_missing_keys() -> None:
    tpl = template()
    del tpl["model"]["kwargs"]
    assert GridGen({"model.kwargs.num_leaves": [31]}).generate(tpl)[0]["model"]["kwargs"] == {"num_leaves": 31}
    with pytest.raises(ConfigError, match="'modle' does not exist"):
        GridGen({"modle.kwargs.alpha": [1]}).generate(template())
    with pytest.raises(ConfigError, match="not an index"):
        GridGen({"record.3.kwargs.x": [1]}).generate(template())
    with pytest.raises(ConfigError, match="a str, not a dict"):
        GridGen({"model.class.x": [1]}).generate(template())
    for bad in ({}, {"model.kwargs.alpha": []}, {"model.kwargs.alpha": "0.1"}, {"model..alpha": [1]}, []):
        with pytest.raises(QceleryError):
            GridGen(bad)  # type: ignore[arg-type]  # wrong on purpose


def test_set_path_sets_nested_values() -> None:
    task = {"a": {"b": [{"c": 1}]}}
    set_path(task, "a.b.0.c", 2)
    assert task == {"a": {"b": [{"c": 2}]}}


def test_model_gen_swaps_the_model_section_and_names_it() -> None:
    models = {
        "ridge_small": {"class": "LinearModel", "kwargs": {"alpha": 0.1}},
        "ridge_big": {"class": "LinearModel", "kwargs": {"alpha": 10.0}},
    }
    tasks = ModelGen(models).generate(template())
    assert [t["model"] for t in tasks] == [
        {"class": "LinearModel", "kwargs": {"alpha": 0.1}, "name": "ridge_small"},
        {"class": "LinearModel", "kwargs": {"alpha": 10.0}, "name": "ridge_big"},
    ]
    assert list(tasks[0]) == ["model", "dataset", "record"]
    assert "name" not in models["ridge_small"]
    unnamed = ModelGen([{"class": "LGBModel"}]).generate({"dataset": template()["dataset"]})
    assert unnamed[0]["model"] == {"class": "LGBModel"}
    with pytest.raises(ConfigError, match=r"models\[1\] has no 'class'"):
        ModelGen([{"class": "A"}, {"kwargs": {}}])
    with pytest.raises(ConfigError, match="empty"):
        ModelGen([])


def test_generators_compose_in_order_as_a_cartesian_product() -> None:
    gens: list[TaskGen] = [rolling(step=125), ModelGen([{"class": "A"}, {"class": "B"}]), GridGen({"model.kwargs.alpha": [1, 2, 3]})]
    tasks = task_generator([template(), template()], gens)
    windows = len(rolling(step=125).generate(template()))
    assert windows == 2 and len(tasks) == 2 * windows * 2 * 3
    assert [(t["model"]["class"], t["model"]["kwargs"]["alpha"]) for t in tasks[:6]] == [
        ("A", 1),
        ("A", 2),
        ("A", 3),
        ("B", 1),
        ("B", 2),
        ("B", 3),
    ]
    assert task_generator(template(), rolling(step=125)) == rolling(step=125).generate(template())


def test_dry_run_drops_duplicate_tasks_keeping_the_first() -> None:
    same_alpha = GridGen({"model.kwargs.alpha": [1.0, 2.0, 1.0]})
    tuple_tpl = template()
    tuple_tpl["dataset"]["kwargs"]["segments"] = {k: tuple(v) for k, v in tuple_tpl["dataset"]["kwargs"]["segments"].items()}
    tasks = dry_run([template(), tuple_tpl], [rolling(step=125), same_alpha])
    assert len(tasks) == 2 * 2  # 2 windows x 2 distinct alphas; the copy of the template adds nothing
    assert [t["model"]["kwargs"]["alpha"] for t in tasks] == [1.0, 2.0, 1.0, 2.0]
    with pytest.raises(TaskDefinitionError):
        dry_run(template(train=["2020-01-01", "2021-01-01"]), [rolling()])


def test_a_window_past_the_future_calendar_is_open_ended_and_its_handler_end_is_left_as_copied() -> None:
    cal = TradingCalendar(pd.bdate_range("2024-01-01", periods=30))  # last day 2024-02-09
    tpl = template(train=["2024-01-01", "2024-01-19"], test=["2024-01-22", None])
    tasks = RollingGen(step=7, calendar=cal).generate(tpl)
    assert [days(test_segments(t)) for t in tasks] == [("2024-01-22", "2024-01-30"), ("2024-01-31", "2024-02-08"), ("2024-02-09", None)]
    # as Qlib 0.9.7's handler_mod: an open test end leaves the end time as it was copied,
    # and Qlib's RollingGen copies every following window from the first one
    ends = [t["dataset"]["kwargs"]["handler"]["kwargs"]["end_time"] for t in tasks]
    assert ends == [pd.Timestamp("2024-01-30"), pd.Timestamp("2024-02-08"), pd.Timestamp("2024-01-30")]
