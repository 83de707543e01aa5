"""P and PRef against a slow, obviously-correct reference; bad queries; call specs."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcelery.pit import PITQueryError, PITStore, parse_call
from qcelery.pit.expr import PITCall

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ORIGIN = pd.Timestamp("2015-01-01")
BASE_YEAR = 2015


def period_of(k: int, quarterly: bool) -> int:
    """The k-th period from the first quarter (or year) of BASE_YEAR."""
    if quarterly:
        return (BASE_YEAR + k // 4) * 100 + k % 4 + 1
    return BASE_YEAR + k


def day_int(offset: int) -> int:
    return int((ORIGIN + pd.Timedelta(days=offset)).strftime("%Y%m%d"))


# -- the reference: loops over days and statements, nothing clever -------------------


def ref_known(rows, k, t):
    """Period k's value as known on day t: its last statement (in file order) dated <= t."""
    value = math.nan
    for date, period_k, v in rows:
        if date <= t and period_k == k:
            value = v
    return value


def ref_p(rows, t, window, how, offset):
    published = [k for date, k, _ in rows if date <= t]
    if not published:
        return math.nan
    end = max(published) - offset
    if how == "last":
        return ref_known(rows, end, t)
    known = [ref_known(rows, end - w, t) for w in range(window)]
    known = [v for v in known if not math.isnan(v)]
    if not known:
        return math.nan
    return sum(known) / len(known) if how == "mean" else sum(known)


values = st.one_of(st.floats(-100, 100, allow_nan=False), st.just(math.nan))


@st.composite
def statements(draw):
    """Statements over up to 12 periods with many revisions, some published the same day."""
    spread = draw(st.sampled_from([30, 400, 1500]))
    rows = draw(st.lists(st.tuples(st.integers(0, spread), st.integers(0, 11), values), min_size=1, max_size=40))
    rows.sort(key=lambda r: r[0])  # stable: same-day statements keep their drawn order, as the store does
    return [(day_int(d), k, v) for d, k, v in rows], spread


@st.composite
def observation_days(draw, spread):
    extra = draw(st.lists(st.integers(-5, spread + 5), max_size=30))
    return sorted(set(extra) | {0, spread})


def store_with(rows, quarterly: bool, directory: str) -> tuple[PITStore, str]:
    field = "roe_q" if quarterly else "roe_a"
    store = PITStore(directory)
    frame = pd.DataFrame(
        {"date": [r[0] for r in rows], "period": [period_of(r[1], quarterly) for r in rows], "value": [r[2] for r in rows]}
    )
    store.write("SH600000", field, frame)
    return store, field


def days_around(rows, offsets):
    """The drawn days plus each publication day and the day before it."""
    pubs = {pd.Timestamp(str(r[0])) for r in rows}
    days = {ORIGIN + pd.Timedelta(days=o) for o in offsets} | pubs | {d - pd.Timedelta(days=1) for d in pubs}
    return pd.DatetimeIndex(sorted(days))


def same(actual: np.ndarray, expected: list[float]) -> bool:
    return bool(np.allclose(actual, np.array(expected, dtype=float), rtol=1e-12, atol=1e-12, equal_nan=True))


@PROPS
@given(data=st.data(), quarterly=st.booleans())
def test_p_and_windowed_p_equal_the_reference(data, quarterly):
    rows, spread = data.draw(statements())
    offsets = data.draw(observation_days(spread))
    window = data.draw(st.integers(1, 5))
    how = "last" if window == 1 and data.draw(st.booleans()) else data.draw(st.sampled_from(["mean", "sum"]))
    offset = data.draw(st.integers(0, 3))
    with tempfile.TemporaryDirectory() as directory:
        store, field = store_with(rows, quarterly, directory)
        days = days_around(rows, offsets)
        day_ints = [int(d.strftime("%Y%m%d")) for d in days]
        plain = store.P("SH600000", field, days)
        assert same(plain.to_numpy(), [ref_p(rows, t, 1, "last", 0) for t in day_ints])
        windowed = store.P("SH600000", field, days, window=window, how=how, offset=offset)
        assert same(windowed.to_numpy(), [ref_p(rows, t, window, how, offset) for t in day_ints])


@PROPS
@given(data=st.data(), quarterly=st.booleans())
def test_pref_equals_the_reference(data, quarterly):
    rows, spread = data.draw(statements())
    offsets = data.draw(observation_days(spread))
    k = data.draw(st.integers(0, 13))  # 12 and 13 are never published
    with tempfile.TemporaryDirectory() as directory:
        store, field = store_with(rows, quarterly, directory)
        days = days_around(rows, offsets)
        pref = store.PRef("SH600000", field, period_of(k, quarterly), days)
        assert same(pref.to_numpy(), [ref_known(rows, k, int(d.strftime("%Y%m%d"))) for d in days])


@pytest.fixture
def store(tmp_path) -> PITStore:
    store = PITStore(tmp_path)
    rows = [
        ("2019-04-26", 201901, 1.0),
        ("2019-08-20", 201902, 2.0),
        ("2019-10-22", 201903, 3.0),
        ("2020-03-30", 201904, 4.0),
        ("2020-04-28", 202001, 5.0),
        ("2020-05-15", 201902, 20.0),  # a revision of an old quarter, after newer quarters
    ]
    store.write("SH600000", "roe_q", pd.DataFrame(rows, columns=["date", "period", "value"]))
    return store


def test_revision_of_an_old_quarter_changes_the_window_from_its_day_on_never_before(store):
    days = pd.bdate_range("2020-04-28", "2020-05-20")
    s = store.P("SH600000", "roe_q", days, window=4, how="sum")  # 201902..202001
    assert (s[:"2020-05-14"] == 2.0 + 3.0 + 4.0 + 5.0).all()
    assert (s["2020-05-15":] == 20.0 + 3.0 + 4.0 + 5.0).all()
    assert (store.P("SH600000", "roe_q", days)[:] == 5.0).all()  # P of the latest quarter is not affected
    pref = store.PRef("SH600000", "roe_q", 201902, days)
    assert (pref[:"2020-05-14"] == 2.0).all() and (pref["2020-05-15":] == 20.0).all()


def test_days_keep_their_order_and_times_of_day_do_not_matter(store):
    days = pd.DatetimeIndex(["2020-04-28 16:00", "2019-04-25", "2019-08-20 09:30", "2019-08-20"])
    s = store.P("SH600000", "roe_q", days)
    assert s.index.equals(days.rename("datetime"))
    assert s.tolist()[0] == 5.0 and math.isnan(s.iloc[1]) and s.tolist()[2:] == [2.0, 2.0]
    assert store.P("SH600000", "roe_q", []).empty


def test_window_reaching_before_the_first_statement_uses_what_exists(store):
    s = store.P("SH600000", "roe_q", ["2019-08-20"], window=4, how="mean")
    assert s.iloc[0] == 1.5
    assert math.isnan(store.P("SH600000", "roe_q", ["2019-08-20"], offset=2).iloc[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"field": "roe"}, "must end in '_q'"),
        ({"window": 0}, "window=0 must be at least 1"),
        ({"window": 4}, "window=4 needs how='mean' or how='sum'"),
        ({"how": "median", "window": 4}, "how='median' is not one of"),
        ({"offset": -1}, "offset=-1 refers to a future period"),
        ({"window": 2.5, "how": "mean"}, "window=2.5 must be an integer"),
        ({"days": "2020-01-02"}, "is one day"),
        ({"days": ["2020-01-02", None]}, "contains NaT"),
    ],
)
def test_bad_p_queries(store, kwargs, message):
    args = {"field": "roe_q", "days": ["2020-01-02"], **kwargs}
    with pytest.raises(PITQueryError, match=message) as err:
        store.P("SH600000", **args)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("field", "period", "message"),
    [
        ("roe_q", 2019, r"period 2019 does not exist: a quarterly field \(roe_q\) takes periods year\*100\+quarter"),
        ("roe_q", 201905, "period 201905 does not exist"),
        ("roe_a", 201904, r"period 201904 does not exist: an annual field \(roe_a\) takes periods as a year"),
        ("roe_q", "201904", "is not an integer"),
        ("roe_q", 201904.0, "is not an integer"),
    ],
)
def test_bad_pref_periods(store, field, period, message):
    with pytest.raises(PITQueryError, match=message):
        store.PRef("SH600000", field, period, ["2020-01-02"])


def test_future_period_in_pref_is_nan_until_published(store):
    s = store.PRef("SH600000", "roe_q", 202304, ["2020-01-02", "2024-01-02"])
    assert s.isna().all()


# -- call specs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tuple_form", "canonical"),
    [
        ("P($$roewa_q)", ("P", "roewa_q"), "P($$roewa_q)"),
        ("P(Mean($$roewa_q, 4))", ("P", "roewa_q", {"window": 4, "how": "mean"}), "P(Mean($$roewa_q, 4))"),
        ("P(Sum($$ROEWA_Q,4))", ["P", "$$roewa_q", {"window": 4, "how": "sum"}], "P(Sum($$roewa_q, 4))"),
        ("P(Ref($$roewa_q, 1))", ("P", "roewa_q", {"offset": 1}), "P(Ref($$roewa_q, 1))"),
        (
            " P( Mean( Ref($$roewa_q, 1), 4) ) ",
            ("P", "roewa_q", {"window": 4, "how": "mean", "offset": 1}),
            "P(Mean(Ref($$roewa_q, 1), 4))",
        ),
        ("P(Ref(Mean($$roewa_q, 4), 1))", ("P", "roewa_q", {"window": 4, "how": "mean", "offset": 1}), "P(Mean(Ref($$roewa_q, 1), 4))"),
        ("P(Ref(Ref($$eps_a, 1), 2))", ("P", "eps_a", {"offset": 3}), "P(Ref($$eps_a, 3))"),
        ("PRef($$roewa_q, 201904)", ("PRef", "roewa_q", 201904), "PRef($$roewa_q, 201904)"),
    ],
)
def test_string_and_tuple_specs_name_the_same_call(text, tuple_form, canonical):
    call = parse_call(text)
    assert call == parse_call(tuple_form)
    assert str(call) == canonical
    assert parse_call(canonical) == call
    assert isinstance(call, PITCall)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("P($$roewa_q", "expected \\), found the end"),
        ("P(Ref($$roewa_q, -1))", "refers to a future period"),
        ("P(Max($$roewa_q, 4))", "operator 'Max' is not supported inside P"),
        ("P(Mean(Sum($$roewa_q, 2), 2))", "over another Mean/Sum is not supported"),
        ("P(Mean($$roewa_q, 0))", "window=0 must be at least 1"),
        ("PRef($$roewa_q, 2019)", "period 2019 does not exist"),
        ("P($$roewa)", "must end in '_q'"),
        ("Mean($$roewa_q, 4)", "the outer operator must be P or PRef"),
        ("P($$roewa_q) + 1", "unexpected character '\\+'"),
        ("__import__('os').system('true')", "unexpected character"),
        (("P", "roewa_q", {"windw": 4}), "unknown P option\\(s\\) \\['windw'\\]"),
        (("P", "roewa_q", {"offset": -2}), "offset=-2 refers to a future period"),
        (("PRef", "roewa_q"), "takes a field and a period"),
        (("Q", "roewa_q"), "is not a PIT call"),
        (42, "is not a PIT call"),
    ],
)
def test_bad_specs_are_refused_with_the_column_name(spec, message):
    with pytest.raises(PITQueryError, match=message) as err:
        parse_call(spec, name="spec['roe']")
    assert str(err.value).startswith("spec['roe']")
