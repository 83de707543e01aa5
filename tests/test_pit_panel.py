"""PIT columns on a daily panel, synthetic statements, and no look-ahead across rolling tasks."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from qcelery.gen import RollingGen, task_generator
from qcelery.instance import init_instance_by_config
from qcelery.pit import (
    PITDataNotFoundError,
    PITQueryError,
    PITStore,
    pit_panel,
    synthetic_pit_panel,
    synthetic_statements,
    write_synthetic_statements,
)

SPEC = {
    "roe": "P($$roewa_q)",
    "roe_4q": ("P", "roewa_q", {"window": 4, "how": "mean"}),
    "roe_prev": "P(Ref($$roewa_q, 1))",
    "roe_2017q4": ("PRef", "roewa_q", 201704),
    "eps": "P($$eps_a)",
    "eps_2y": "P(Sum($$eps_a, 2))",
}
# columns whose value on a day is one published statement value (no arithmetic)
SINGLE_STATEMENT = {"roe": "roewa_q", "roe_prev": "roewa_q", "roe_2017q4": "roewa_q", "eps": "eps_a"}


@pytest.fixture
def store(tmp_path) -> PITStore:
    return write_synthetic_statements(
        PITStore(tmp_path / "pit"), ["SYN0000", "SYN0001", "SYN0002"], 2015, 2019, ["roewa_q", "eps_a"], seed=11
    )


def test_panel_is_indexed_by_day_then_instrument_and_equals_the_operators(store):
    days = pd.bdate_range("2016-01-01", "2019-12-31")
    instruments = ["SYN0002", "SYN0000"]
    panel = pit_panel(store, instruments, days, SPEC)
    assert panel.index.names == ["datetime", "instrument"]
    assert list(panel.columns) == list(SPEC)
    assert panel.index.get_level_values("datetime")[:2].tolist() == [days[0], days[0]]
    assert panel.index.get_level_values("instrument")[:2].tolist() == instruments
    assert (panel.dtypes == np.float64).all()
    for instrument in instruments:
        rows = panel.xs(instrument, level="instrument")
        pd.testing.assert_series_equal(rows["roe"], store.P(instrument, "roewa_q", days), check_names=False)
        pd.testing.assert_series_equal(rows["roe_4q"], store.P(instrument, "roewa_q", days, window=4, how="mean"), check_names=False)
        pd.testing.assert_series_equal(rows["roe_2017q4"], store.PRef(instrument, "roewa_q", 201704, days), check_names=False)
        pd.testing.assert_series_equal(rows["eps_2y"], store.P(instrument, "eps_a", days, window=2, how="sum"), check_names=False)
    assert panel["roe"].notna().mean() > 0.9


def test_instrument_without_statements_gets_nan_and_one_warning(store, caplog):
    days = pd.bdate_range("2018-01-01", "2018-03-01")
    with caplog.at_level(logging.WARNING, logger="qcelery.pit"):
        panel = pit_panel(str(store.root), ["SYN0000", "NOPE"], days, {"roe": "P($$roewa_q)"})
    assert panel.xs("NOPE", level="instrument")["roe"].isna().all()
    assert panel.xs("SYN0000", level="instrument")["roe"].notna().all()
    assert [r.message for r in caplog.records if "NOPE/roewa_q" in r.message]
    with pytest.raises(PITDataNotFoundError, match="'NOPE'"):
        pit_panel(store, ["SYN0000", "NOPE"], days, {"roe": "P($$roewa_q)"}, missing="raise")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spec": {}}, "non-empty mapping"),
        ({"spec": ["P($$roewa_q)"]}, "non-empty mapping"),
        ({"spec": {"roe": "P($$roewa)"}}, r"PIT spec\['roe'\].*must end in '_q'"),
        ({"spec": {"": "P($$roewa_q)"}}, "column name '' must be a non-empty string"),
        ({"instruments": "SYN0000"}, "list of instrument codes"),
        ({"missing": "skip"}, "missing='skip'"),
    ],
)
def test_bad_panel_requests(store, kwargs, message):
    args = {"instruments": ["SYN0000"], "days": ["2018-01-02"], "spec": {"roe": "P($$roewa_q)"}, **kwargs}
    with pytest.raises(PITQueryError, match=message):
        pit_panel(store, **args)


# -- synthetic statements -----------------------------------------------------------


def test_synthetic_statements_publish_late_and_revise_later():
    statements = synthetic_statements([f"I{i}" for i in range(40)], 2010, 2019, "roewa_q", seed=5)
    revisions = 0
    for frame in statements.values():
        assert list(frame.columns) == ["date", "period", "value"]
        assert frame["date"].is_monotonic_increasing
        first = frame.drop_duplicates("period", keep="first").set_index("period")
        assert sorted(first.index) == [y * 100 + q for y in range(2010, 2020) for q in range(1, 5)]
        quarter_end = pd.PeriodIndex([f"{p // 100}Q{p % 100}" for p in first.index], freq="Q").end_time.normalize()
        lag = (first["date"].to_numpy() - quarter_end.to_numpy()) / np.timedelta64(1, "D")
        assert lag.min() >= 20 and lag.max() <= 90
        later = frame[frame["period"].duplicated(keep="first")]
        assert (later["date"].to_numpy() > first.loc[later["period"], "date"].to_numpy()).all()
        revisions += len(later)
    assert 0.15 < revisions / (40 * 40) < 0.4  # about 20% revised, a third of them twice


def test_synthetic_statements_are_deterministic_and_independent_per_instrument_and_year():
    a = synthetic_statements(["X", "Y"], 2015, 2016, "eps_a", seed=1)
    b = synthetic_statements(["Y"], 2015, 2016, "eps_a", seed=1)
    pd.testing.assert_frame_equal(a["Y"], b["Y"])
    longer = synthetic_statements(["X"], 2010, 2020, "roewa_q", seed=1)["X"]
    shorter = synthetic_statements(["X"], 2010, 2016, "roewa_q", seed=1)["X"]
    pd.testing.assert_frame_equal(longer[longer["period"] < 201700].reset_index(drop=True), shorter)
    assert a["Y"]["period"].min() == 2015
    assert not a["X"]["value"].equals(synthetic_statements(["X"], 2015, 2016, "eps_a", seed=2)["X"]["value"])
    with pytest.raises(PITQueryError, match="start_year=2017 is after end_year=2016"):
        synthetic_statements(["X"], 2017, 2016, "eps_a", seed=1)
    with pytest.raises(PITQueryError, match="must end in '_q'"):
        synthetic_statements(["X"], 2015, 2016, "eps", seed=1)


def test_synthetic_pit_panel_is_pit_panel_over_synthetic_statements(tmp_path):
    days = pd.bdate_range("2018-01-01", "2019-06-30")
    spec = {"roe": "P($$roewa_q)", "eps_2y": "P(Sum($$eps_a, 2))"}
    names = ["SYN0000", "SYN0001"]
    panel = synthetic_pit_panel(names, days, spec, seed=4)
    store = write_synthetic_statements(PITStore(tmp_path), names, 2000, 2019, ["roewa_q", "eps_a"], seed=4)
    pd.testing.assert_frame_equal(panel, pit_panel(store, names, days, spec))
    assert panel.notna().all().all()
    later = synthetic_pit_panel(names, pd.bdate_range("2018-01-01", "2020-06-30"), spec, seed=4)
    pd.testing.assert_frame_equal(later.loc[: pd.Timestamp("2019-06-28")], panel.loc[: pd.Timestamp("2019-06-28")])


# -- no look-ahead across the rolling tasks of an experiment ----------------------------


def rolling_tasks(pit_store: str) -> list[dict]:
    """A rolling experiment whose handler carries the PIT columns of SPEC (its ``pit=`` option)."""
    handler = {
        "class": "SyntheticAlphaHandler",
        "module_path": "qcelery.data",
        "kwargs": {
            "instruments": 4,
            "start_time": "2017-01-03",
            "end_time": "2019-06-28",
            "fit_start_time": "2017-01-03",
            "fit_end_time": "2017-12-29",
            "seed": 3,
            "calendar": "XSHG",
            "pit": {"fields": SPEC, "store": pit_store},
        },
    }
    template = {
        "model": {"class": "LinearModel", "module_path": "qcelery.models"},
        "dataset": {
            "class": "DatasetH",
            "module_path": "qcelery.data",
            "kwargs": {
                "handler": handler,
                "segments": {
                    "train": ["2017-01-03", "2017-12-29"],
                    "valid": ["2018-01-02", "2018-06-29"],
                    "test": ["2018-07-02", "2019-06-28"],
                },
            },
        },
        "record": [],
    }
    return task_generator(template, RollingGen(step=60, calendar="XSHG"))


def test_no_value_published_after_a_day_appears_in_that_days_features_across_rolling_tasks(tmp_path):
    instruments = [f"SYN{i:04d}" for i in range(4)]  # SyntheticAlphaHandler's names
    statements = {field: synthetic_statements(instruments, 2015, 2019, field, seed=23, revision_rate=0.5) for field in ("roewa_q", "eps_a")}
    store = PITStore(tmp_path / "full")
    for field, by_instrument in statements.items():
        for instrument, frame in by_instrument.items():
            store.write(instrument, field, frame)
    tasks = rolling_tasks(str(store.root))
    assert len(tasks) >= 4
    # (instrument, field, value) -> the day it was first published. Values are continuous,
    # hence unique, also after the handler's cast of its features to float32.
    published = (
        pd.concat(
            frame.assign(instrument=instrument, field=field, value=frame["value"].astype(np.float32))
            for field, by_instrument in statements.items()
            for instrument, frame in by_instrument.items()
        )
        .groupby(["instrument", "field", "value"])["date"]
        .min()
    )

    checked = 0
    panels = []
    for task in tasks:
        dataset = init_instance_by_config(task["dataset"])
        for segment in ("train", "valid", "test"):
            features = dataset.prepare(segment, col_set="feature", data_key="raw")
            assert set(SPEC) <= set(features.columns)
            for column, field in SINGLE_STATEMENT.items():
                seen_values = features[column].dropna()
                keys = pd.MultiIndex.from_arrays(
                    [seen_values.index.get_level_values("instrument"), [field] * len(seen_values), seen_values]
                )
                first_day = published.reindex(keys).to_numpy()
                day = seen_values.index.get_level_values("datetime").to_numpy()
                assert not pd.isna(first_day).any(), f"{column}: a value that was never published"
                late = first_day > day
                assert not late.any(), f"{column}: {seen_values[late].head()} published after the day"
                checked += len(seen_values)
            panels.append(features[list(SPEC)].astype(np.float64))
    assert checked > 5000

    # Every column (windows included) equals what a store holding only the statements
    # published by that day gives. Values only change on publication days, so one
    # truncated store per "statements published so far" state covers every day.
    seen = pd.concat(panels)
    seen = seen[~seen.index.duplicated()].sort_index()
    all_dates = np.sort(
        np.concatenate([frame["date"].to_numpy() for by_instrument in statements.values() for frame in by_instrument.values()])
    )
    state = np.searchsorted(all_dates, seen.index.get_level_values("datetime").to_numpy(), side="right")
    revised_after = 0
    for n_known in np.unique(state):
        cutoff = all_dates[n_known - 1] if n_known else np.datetime64("1900-01-01")
        truncated = PITStore(tmp_path / f"known_{n_known}")
        for field, by_instrument in statements.items():
            for instrument, frame in by_instrument.items():
                known = frame[frame["date"] <= cutoff]
                if len(known):
                    truncated.write(instrument, field, known)
                revised_after += (frame["date"] > cutoff).sum()
        rows = seen[state == n_known]
        days = rows.index.get_level_values("datetime").unique()
        expected = pit_panel(truncated, instruments, days, SPEC).reindex(rows.index)
        pd.testing.assert_frame_equal(rows, expected.astype(np.float32).astype(np.float64))
    assert revised_after > 0

    # The checks have teeth: a store that backdates each period's final revision to its
    # first publication (the classic leak) gives different values on many rows.
    leaky = PITStore(tmp_path / "leaky")
    for field, by_instrument in statements.items():
        for instrument, frame in by_instrument.items():
            first = frame.drop_duplicates("period", keep="first").set_index("period")["date"]
            final = frame.drop_duplicates("period", keep="last").set_index("period")["value"]
            leaky.write(instrument, field, pd.DataFrame({"date": first, "value": final}).reset_index())
    leaked = pit_panel(leaky, instruments, seen.index.get_level_values("datetime").unique(), SPEC).reindex(seen.index)
    assert (~np.isclose(leaked, seen, rtol=1e-6, equal_nan=True)).sum() > 100
