"""Built-in data: the synthetic handler, DatasetH and the GridFS handler cache."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import time

import numpy as np
import pandas as pd
import pytest

from qcelery.calendar import default_calendar
from qcelery.data import DatasetH, HandlerCache, SyntheticAlphaHandler, handler_key, replace_task_handler_with_cache
from qcelery.data.cache import BUCKET, BUILDS, clear_memory
from qcelery.data.features import alpha_features, next_day_return_label
from qcelery.errors import ConfigError, TaskTypeError

KW = dict(instruments=20, start_time="2020-01-02", end_time="2020-12-31", fit_start_time="2020-01-02", fit_end_time="2020-06-30", seed=5)
CONFIG = {"class": "SyntheticAlphaHandler", "module_path": "qcelery.data", "kwargs": KW}


@pytest.fixture(scope="module")
def handler():
    return SyntheticAlphaHandler(**KW)


def test_panel_covers_instruments_by_trading_days_of_the_calendar(handler):
    raw = handler.fetch(data_key="raw")
    assert raw.index.names == ["datetime", "instrument"]
    assert list(raw.columns.get_level_values(0).unique()) == ["feature", "label"]
    days = raw.index.get_level_values("datetime").unique()
    cal = default_calendar("XSHG").dates
    assert days.equals(cal[(cal >= "2020-01-02") & (cal <= "2020-12-31")])
    assert raw.index.get_level_values("instrument").nunique() == 20
    assert {"ROC5", "ROC60", "STD20", "VMA5", "RSV20", "CORR20", "KMID"} <= set(raw["feature"].columns)
    # features of the first day are computed from the warm-up history, not NaN
    assert raw["feature"].loc[days[0]].notna().all().all()


def test_same_seed_same_data_other_seed_other_data_and_a_longer_span_keeps_the_past(handler):
    again = SyntheticAlphaHandler(**KW).fetch(data_key="raw")
    raw = handler.fetch(data_key="raw")
    pd.testing.assert_frame_equal(raw, again)
    other = SyntheticAlphaHandler(**{**KW, "seed": 6}).fetch(data_key="raw")
    assert not np.allclose(raw["feature"].to_numpy(), other["feature"].to_numpy(), equal_nan=True)
    longer = SyntheticAlphaHandler(**{**KW, "end_time": "2021-03-31"})
    pd.testing.assert_frame_equal(longer.fetch(slice(None, "2020-12-28"), data_key="raw"), raw.loc[:"2020-12-28"])
    # normalisation is fitted on the fit period only: more data afterwards changes nothing
    pd.testing.assert_frame_equal(
        longer.fetch(slice(None, "2020-12-28"), col_set="feature"), handler.fetch(slice(None, "2020-12-28"), col_set="feature")
    )


def test_features_are_robust_zscored_with_fit_period_statistics(handler):
    raw = handler.fetch(slice("2020-01-02", "2020-06-30"), col_set="feature", data_key="raw")
    median = raw.median()
    mad = (raw - median).abs().median() * 1.4826
    infer = handler.fetch(col_set="feature")
    expected = ((handler.fetch(col_set="feature", data_key="raw") - median) / mad).clip(-3, 3).fillna(0)
    np.testing.assert_allclose(infer.to_numpy(), expected.to_numpy(), atol=1e-4)
    refit = SyntheticAlphaHandler(**{**KW, "fit_end_time": "2020-03-31"}).fetch(col_set="feature")
    assert not np.allclose(infer.to_numpy(), refit.to_numpy())


def test_label_is_the_return_from_t_plus_1_to_t_plus_2_and_learn_label_is_zscored_per_day(handler):
    close = pd.DataFrame({"A": [10.0, 11.0, 12.1, 12.1, 9.68]}, index=pd.date_range("2020-01-01", periods=5))
    label = next_day_return_label(close)["A"]
    np.testing.assert_allclose(label.iloc[:3], [0.1, 0.0, -0.2])
    assert label.iloc[3:].isna().all()

    learn = handler.fetch(col_set="label", data_key="learn")["LABEL0"]
    by_day = learn.groupby(level="datetime")
    np.testing.assert_allclose(by_day.mean(), 0, atol=1e-9)
    np.testing.assert_allclose(by_day.std(), 1, atol=1e-9)
    raw_label = handler.fetch(col_set="label", data_key="raw")["LABEL0"]
    assert raw_label.isna().sum() == 2 * 20  # the last two days have no label yet
    assert len(learn) == len(raw_label) - 2 * 20


def test_features_use_only_the_past():
    rng = np.random.default_rng(0)
    close = pd.DataFrame(100 * np.exp(np.cumsum(rng.normal(0, 0.01, (120, 3)), axis=0)))
    frames = dict(
        open_=close.shift(1).fillna(100),
        high=close * 1.01,
        low=close * 0.99,
        close=close,
        volume=pd.DataFrame(rng.uniform(1e5, 2e5, (120, 3))),
    )
    full = alpha_features(**frames)
    cut = alpha_features(**{k: v.iloc[:100] for k, v in frames.items()})
    for name in full:
        pd.testing.assert_frame_equal(full[name].iloc[:100], cut[name], check_exact=False, atol=1e-9)


def test_dataset_prepares_segments_like_qlib(handler):
    ds = DatasetH(handler, {"train": ("2020-01-02", "2020-06-30"), "test": ("2020-07-01", "2020-12-31")})
    train, test = ds.prepare(["train", "test"], col_set=["feature", "label"])
    assert train.index.get_level_values("datetime").max() <= pd.Timestamp("2020-06-30")
    assert test.index.get_level_values("datetime").min() >= pd.Timestamp("2020-07-01")
    assert list(train.columns.get_level_values(0).unique()) == ["feature", "label"]
    assert list(ds.prepare("test", col_set="label").columns) == ["LABEL0"]
    with pytest.raises(ConfigError, match="unknown segment 'valid'"):
        ds.prepare("valid")
    with pytest.raises(ConfigError, match="segment 'test' starts 2020-12-31 after it ends"):
        DatasetH(handler, {"test": ("2020-12-31", "2020-07-01")})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"start_time": "2021-01-04", "end_time": "2020-01-02"}, "start_time 2021-01-04 is after end_time"),
        ({"calendar": "NOPE"}, "unknown exchange calendar 'NOPE'"),
        ({"instruments": 1}, "instruments must be an int >= 2"),
        ({"signal_strength": 1.5}, "signal_strength must be a number in"),
        ({"start_time": "yesterday-ish"}, "start_time: 'yesterday-ish' is not a date"),
    ],
)
def test_bad_handler_config_is_a_clear_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SyntheticAlphaHandler(**{**KW, **kwargs})


@pytest.mark.parametrize("number", [20200102, 1.5, np.int64(20200102)])
def test_a_number_as_handler_date_is_a_type_error(number):
    # pandas would read it as nanoseconds after 1970; numpy integers used to slip through
    with pytest.raises(TaskTypeError, match="SyntheticAlphaHandler start_time: .* is a number, not a date"):
        SyntheticAlphaHandler(**{**KW, "start_time": number})


def test_handler_key_ignores_how_dates_are_written():
    as_dates = {**CONFIG, "kwargs": {**KW, "start_time": dt.date(2020, 1, 2), "end_time": pd.Timestamp("2020-12-31")}}
    assert handler_key(as_dates) == handler_key(CONFIG)
    assert handler_key({**CONFIG, "kwargs": {**KW, "seed": 7}}) != handler_key(CONFIG)


def _load_in_child(settings, out) -> None:
    cache = HandlerCache(settings)
    handler = cache.get(CONFIG)
    out.put((dict(cache.stats), float(handler.fetch(data_key="raw")["feature"].sum().sum())))


def test_a_built_handler_is_stored_in_gridfs_and_loaded_by_other_processes(settings, mongo_db):
    clear_memory()
    cache = HandlerCache(settings)
    built = cache.get(CONFIG)
    assert cache.stats == {"built": 1}
    assert mongo_db[f"{BUCKET}.files"].count_documents({"filename": handler_key(CONFIG)}) == 1
    assert cache.get(CONFIG) is built and cache.stats["memory"] == 1

    clear_memory()
    # spawn: a forked child would inherit (and try to close) earlier tests' broker connections
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_load_in_child, args=(settings, out))
    proc.start()
    stats, total = out.get(timeout=120)
    proc.join(timeout=30)
    assert stats == {"store": 1}  # the other process did not build it again
    assert total == pytest.approx(float(built.fetch(data_key="raw")["feature"].sum().sum()))

    task = {"dataset": {"class": "DatasetH", "kwargs": {"handler": CONFIG, "segments": {"test": ("2020-07-01", None)}}}}
    replaced = replace_task_handler_with_cache(task, cache)
    assert isinstance(replaced["dataset"]["kwargs"]["handler"], SyntheticAlphaHandler)
    assert task["dataset"]["kwargs"]["handler"] is CONFIG  # the task itself is untouched
    assert cache.remove(CONFIG) >= 1


def test_a_pickled_dataset_keeps_the_handler_config_not_its_data(handler):
    from qcelery.serial import dumps, restricted_loads

    ds = DatasetH(handler, {"test": ("2020-07-01", "2020-12-31")})
    data = dumps(ds)
    assert len(data) < 5000
    back = restricted_loads(data)
    assert back.handler.init_kwargs == handler.init_kwargs
    with pytest.raises(ConfigError, match="unpickled without its data"):
        back.prepare("test")


def test_pit_columns_join_as_features_known_on_each_day(tmp_path):
    from qcelery.pit import PITStore, pit_panel, write_synthetic_statements

    names = [f"SYN{i:04d}" for i in range(4)]
    store = write_synthetic_statements(PITStore(tmp_path / "pit"), names, 2018, 2020, ["roewa_q"], seed=1)
    spec = {"roe": "P($$roewa_q)", "roe_4q": "P(Mean($$roewa_q, 4))"}
    h = SyntheticAlphaHandler(**{**KW, "instruments": 4, "pit": {"fields": spec, "store": str(tmp_path / "pit")}})
    raw = h.fetch(data_key="raw")["feature"]
    days = raw.index.get_level_values("datetime").unique()
    expected = pit_panel(store, names, days, spec)
    np.testing.assert_allclose(raw[["roe", "roe_4q"]].to_numpy(), expected.to_numpy(), rtol=1e-6)
    assert "roe" in h.fetch(col_set="feature").columns  # normalised like the other features

    synthetic = SyntheticAlphaHandler(**{**KW, "instruments": 4, "pit": {"fields": {"roe": "P($$roewa_q)"}}})
    assert synthetic.fetch(data_key="raw")["feature"]["roe"].notna().mean() > 0.9
    with pytest.raises(ConfigError, match="pit must look like"):
        SyntheticAlphaHandler(**{**KW, "pit": {"roe": "P($$roewa_q)"}})
    with pytest.raises(ConfigError, match="SyntheticAlphaHandler pit:"):
        SyntheticAlphaHandler(**{**KW, "pit": {"fields": {"roe": "Q($$roewa_q)"}}})


def test_a_feature_with_no_value_in_the_fit_period_is_left_unscaled_and_named(tmp_path, caplog):
    import warnings

    from qcelery.pit import PITStore, write_synthetic_statements

    # statements of 2020 only: the first is published in spring, after the fit period ends
    write_synthetic_statements(PITStore(tmp_path / "pit"), [f"SYN{i:04d}" for i in range(4)], 2020, 2020, ["roewa_q"], seed=1)
    kw = {**KW, "instruments": 4, "fit_end_time": "2020-02-28", "pit": {"fields": {"roe": "P($$roewa_q)"}, "store": str(tmp_path / "pit")}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's "All-NaN slice" no more
        h = SyntheticAlphaHandler(**kw)
        raw = h.fetch(data_key="raw")["feature"]
        learn = h.fetch(col_set="feature")
    fit_days = raw.index.get_level_values("datetime") <= pd.Timestamp("2020-02-28")
    assert raw.loc[fit_days, "roe"].isna().all() and raw["roe"].notna().any()
    # unscaled: the processed column is the raw one (median 0, MAD 1), the others are scaled
    later = raw["roe"].notna()
    np.testing.assert_allclose(learn.loc[later, "roe"].to_numpy(), raw.loc[later, "roe"].clip(-3, 3).to_numpy(), rtol=1e-6)
    assert "no value of roe in the fit period" in caplog.text


# ------------------------------------------------------------------ one build per cluster
def _get_together(settings, config, barrier, out) -> None:
    cache = HandlerCache(settings)
    barrier.wait(timeout=120)  # every process misses the cache at the same moment
    handler = cache.get(config)
    out.put((dict(cache.stats), handler.value))


def _get_alone(settings, config, out) -> None:
    cache = HandlerCache(settings)
    handler = cache.get(config)
    out.put((dict(cache.stats), handler.value))


@pytest.fixture
def slow_handler(settings, tmp_path):
    """Settings admitting the tests' slow handler, its config, the file counting its builds
    and the file holding its build time."""
    count, delay = tmp_path / "builds", tmp_path / "delay"
    delay.write_text("3")
    config = {"class": "SlowCountingHandler", "module_path": "qlib_support", "kwargs": {"count_file": str(count), "delay_file": str(delay)}}
    return settings.model_copy(update={"allowed_modules": ["qlib_support"]}), config, count, delay


def _builds(count) -> int:
    return len(count.read_text().split()) if count.exists() else 0


def test_workers_missing_the_cache_at_once_build_the_handler_once(slow_handler, mongo_db):
    settings, config, count, _ = slow_handler
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_get_together, args=(settings, config, barrier, out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert _builds(count) == 1
    stats = sorted((s.get("built", 0), s.get("waited", 0)) for s, _ in results)
    assert stats == [(0, 1), (0, 1), (1, 0)]  # one built it, the two others waited for its copy
    assert [value for _, value in results] == [42, 42, 42]
    assert mongo_db[BUILDS].count_documents({}) == 0  # the build lease is released


def test_a_build_whose_worker_died_is_taken_over_once_its_lease_runs_out(slow_handler, mongo_db):
    settings, config, count, delay = slow_handler
    delay.write_text("600")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    dying = ctx.Process(target=_get_alone, args=(settings, config, out))
    dying.start()
    deadline = time.monotonic() + 120
    while mongo_db[BUILDS].count_documents({}) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _builds(count) == 1, "the first worker never started its build"
    waiting = ctx.Process(target=_get_alone, args=(settings, config, out))
    waiting.start()
    time.sleep(2)  # the second worker finds the build under way and waits for it
    delay.write_text("0.1")
    dying.kill()
    dying.join(timeout=30)

    stats, value = out.get(timeout=120)  # after at most one lease (6 s in the tests' settings)
    waiting.join(timeout=30)
    assert (stats, value) == ({"built": 1}, 42) and _builds(count) == 2
    assert mongo_db[BUILDS].count_documents({}) == 0
