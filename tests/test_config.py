"""Workflow YAML files: the shipped configs and the loader's errors."""

from __future__ import annotations

import textwrap
from functools import lru_cache
from pathlib import Path

import pandas as pd
import pytest

from qcelery.calendar import TradingCalendar
from qcelery.config import GENERATOR_NAMES, load_workflow
from qcelery.errors import ConfigError
from qcelery.gen import GridGen, ModelGen, RollingGen, dry_run, task_generator
from qcelery.settings import Settings

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
# the built-in-classes workflows; those with qlib_init use Qlib's classes on a Qlib provider (tests/test_qlib_example.py)
WORKFLOWS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if "generators:" in p.read_text() and "qlib_init:" not in p.read_text())


@lru_cache(maxsize=1)
def xshg() -> TradingCalendar:
    """Fixed XSHG calendar (whatever today is): known days to 2025-12-31, future to 2026-12-31."""
    return TradingCalendar.from_exchange("XSHG", start="2015-01-01", end="2025-12-31", future_end="2026-12-31")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "workflow.yaml"
    path.write_text(textwrap.dedent(text))
    return path


MINIMAL = textwrap.dedent("""
    task:
        model: {class: LinearModel, module_path: qcelery.models, kwargs: {alpha: 1.0}}
        dataset:
            class: DatasetH
            module_path: qcelery.data
            kwargs:
                handler: {class: SyntheticAlphaHandler, module_path: qcelery.data, kwargs: {end_time: 2023-06-30}}
                segments:
                    train: [2020-01-01, 2021-12-31]
                    valid: [2022-01-01, 2022-06-30]
                    test: [2022-07-01, 2023-06-30]
        record: [{class: SignalRecord, module_path: qcelery.records}]
""")


# -- the shipped configs -------------------------------------------------------------
def test_config_dir_ships_the_contracted_workflows() -> None:
    assert {p.name for p in WORKFLOWS} >= {"demo.yaml", "rolling_synthetic.yaml", "lightgbm_rolling.yaml"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_shipped_workflow_loads_and_uses_the_builtin_classes(path: Path) -> None:
    templates, generators = load_workflow(path, calendar=xshg())
    tasks = dry_run(templates, generators)
    assert len(tasks) > 1
    for task in tasks:
        assert task["model"]["module_path"] == "qcelery.models"
        assert task["model"]["class"] in {"LinearModel", "LGBModel"}
        dataset = task["dataset"]
        assert (dataset["class"], dataset["module_path"]) == ("DatasetH", "qcelery.data")
        handler = dataset["kwargs"]["handler"]
        assert (handler["class"], handler["module_path"]) == ("SyntheticAlphaHandler", "qcelery.data")
        hk = handler["kwargs"]
        assert set(hk) == {"instruments", "start_time", "end_time", "fit_start_time", "fit_end_time", "seed", "signal_strength", "calendar"}
        assert isinstance(hk["instruments"], int) and isinstance(hk["seed"], int)
        assert isinstance(hk["signal_strength"], float) and hk["calendar"] == "XSHG"
        # handler_mod: the handler's data reach the end of the window's test segment
        assert pd.Timestamp(hk["end_time"]) >= dataset["kwargs"]["segments"]["test"][1]
        assert set(dataset["kwargs"]["segments"]) == {"train", "valid", "test"}
        records = {r["class"]: r for r in task["record"]}
        assert all(r["module_path"] == "qcelery.records" for r in records.values())
        assert records["SignalRecord"]["kwargs"] == {"model": "<MODEL>", "dataset": "<DATASET>"}
        assert set(records["SigAnaRecord"]["kwargs"]) == {"ana_long_short", "ann_scaler"}
        if "PortAnaRecord" in records:
            assert set(records["PortAnaRecord"]["kwargs"]) == {"topk"}


def test_demo_is_two_distinct_linear_models_over_eight_windows() -> None:
    templates, generators = load_workflow(CONFIG_DIR / "demo.yaml", calendar=xshg())
    assert [type(g) for g in generators] == [RollingGen, ModelGen]
    tasks = dry_run(templates, generators)
    assert len(tasks) == 16
    models = {(t["model"]["name"], t["model"]["class"], t["model"]["kwargs"]["alpha"]) for t in tasks}
    assert len(models) == 2 and {m[1] for m in models} == {"LinearModel"} and len({m[2] for m in models}) == 2
    windows = sorted({t["dataset"]["kwargs"]["segments"]["test"] for t in tasks})
    assert len(windows) == 8
    handler = templates[0]["dataset"]["kwargs"]["handler"]["kwargs"]
    data_days = xshg().days(future=True)
    data_days = data_days[(data_days >= pd.Timestamp(handler["start_time"])) & (data_days <= pd.Timestamp(handler["end_time"]))]
    assert 480 <= len(data_days) <= 900  # a few years of XSHG days: small and fast
    assert windows[-1][1] <= pd.Timestamp(handler["end_time"])  # no window needs data past the handler's end


def test_lightgbm_workflow_resolves_qlib_style_anchors_and_merges() -> None:
    path = CONFIG_DIR / "lightgbm_rolling.yaml"
    text = path.read_text()
    assert "&data_handler_config" in text and "*data_handler_config" in text and "<<: *" in text
    templates, generators = load_workflow(path, calendar=xshg())
    model = templates[0]["model"]
    assert model["class"] == "LGBModel" and {"loss", "learning_rate", "num_leaves", "num_boost_round"} <= set(model["kwargs"])
    assert any(isinstance(g, GridGen) for g in generators) and any(isinstance(g, RollingGen) for g in generators)


def test_loaded_templates_do_not_share_objects_through_yaml_aliases(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        shared: &shared {alpha: 1.0}
        task:
            model: {class: A, kwargs: *shared}
            dataset: {class: D, kwargs: {segments: {test: [2022-07-01, null]}, extra: *shared}}
    """,
    )
    templates, _ = load_workflow(path, calendar=xshg())
    tpl = templates[0]
    assert tpl["model"]["kwargs"] == tpl["dataset"]["kwargs"]["extra"]
    assert tpl["model"]["kwargs"] is not tpl["dataset"]["kwargs"]["extra"]


def test_generators_section_builds_each_generator_in_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + textwrap.dedent("""
        generators:
            - rolling: {step: 125, rtype: sliding, trunc_days: 2}
            - horizon: {horizon: [1, 5], label_leak_n: 1}
            - models: [{class: LinearModel, module_path: qcelery.models, kwargs: {alpha: 0.1}}]
            - grid: [{model.kwargs.alpha: 0.5}, {model.kwargs.alpha: 5.0}]
    """),
    )
    templates, generators = load_workflow(path, calendar=xshg())
    assert [type(g).__name__ for g in generators] == ["RollingGen", "LabelHorizonGen", "ModelGen", "GridGen"]
    assert generators[0].step == 125 and generators[0].rtype == "sliding" and generators[0].trunc_days == 2
    assert len(task_generator(templates, generators)) == 2 * 2 * 1 * 2
    assert list(GENERATOR_NAMES) == ["rolling", "horizon", "grid", "models"]


def test_calendar_comes_from_the_argument_then_the_file_then_the_settings(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "generators: [{rolling: {step: 60}}]\n")
    (gen,) = load_workflow(path, calendar=xshg())[1]
    assert gen.ta.calendar is xshg()
    (gen,) = load_workflow(path, settings=Settings(calendar="XNYS"))[1]
    assert gen.ta.calendar.name == "XNYS"
    path = write(tmp_path, "calendar: XSHE\n" + MINIMAL + "generators: [{rolling: {step: 60}}]\n")
    (gen,) = load_workflow(path, settings=Settings(calendar="XNYS"))[1]
    assert gen.ta.calendar.name == "XSHE"


# -- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (MINIMAL + "generators:\n  - rolling: {step: 40\n", r"line \d+, column \d+: YAML error"),
        ("task:\n  model: {class: A}\n  model: {class: B}\n", r"duplicate key 'model' \(first at line 2\)"),
        (MINIMAL + "generators: [{rollin: {step: 40}}]\n", r"generators\[0\]: unknown generator 'rollin'; known: rolling"),
        (MINIMAL + "generators: [{rolling: {step: 0}}]\n", r"generators\[0\]\.rolling: step must be a positive"),
        (MINIMAL + "generators: [{rolling: {step: -5}}]\n", "-5"),
        (MINIMAL + "generators: [{rolling: {rtype: rolling}}]\n", "rtype must be"),
        (MINIMAL + "generators: [{rolling: {setp: 40}}]\n", "unknown parameter 'setp'"),
        (MINIMAL + "generators: [{horizon: {label_leak_n: 2}}]\n", "needs 'horizon'"),
        (MINIMAL + "generators: [{grid: {model.kwargs.alpha: []}}]\n", "empty list"),
        (MINIMAL + "generators: [{models: [{kwargs: {}}]}]\n", r"models\[0\] has no 'class'"),
        (MINIMAL + "generators: {rolling: {step: 40}}\n", "generators must be a list"),
        (MINIMAL + "generators: [{rolling: {}, grid: {}}]\n", "exactly one generator"),
        (MINIMAL + "calendar: XXXX\n", "unknown exchange calendar 'XXXX'"),
        ("model: {class: A}\n", "no 'task' section"),
        ("- just\n- a list\n", "must be a mapping"),
        ("task:\n  dataset: {class: D, kwargs: {segments: {test: [2022-01-04, null]}}}\n", "task has no 'model'"),
        (MINIMAL.replace("test:", "tst:") + "generators: [{rolling: {step: 40}}]\n", "no 'test' segment"),
        (MINIMAL.replace("[2020-01-01, 2021-12-31]", "[2021-12-31, 2020-01-01]"), "start 2021-12-31 is after end 2020-01-01"),
    ],
)
def test_bad_workflow_files_raise_config_errors_naming_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=fragment) as info:
        load_workflow(path)  # the file's calendar, if any, or the default one
    assert str(path) in str(info.value)


def test_yaml_syntax_error_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "task:\n  model: {class: A}\n  dataset: [oops\n")
    with pytest.raises(ConfigError, match=r"line 4"):
        load_workflow(path, calendar=xshg())


def test_merge_keys_may_be_overridden_without_a_duplicate_key_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        base: &base {class: A, kwargs: {alpha: 1}}
        task:
            model: {<<: *base, class: B}
            dataset: {class: D, kwargs: {segments: {test: [2022-07-01, null]}}}
    """,
    )
    assert load_workflow(path, calendar=xshg())[0][0]["model"] == {"class": "B", "kwargs": {"alpha": 1}}


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_workflow(tmp_path / "nope.yaml")
