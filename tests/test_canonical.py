"""``qcelery.canonical``: the BSON-safe filter of a task and the hash that deduplicates it.

Two producers (two processes, two machines) must compute the same hash for the
same task, and different tasks must not share a hash; the filter must be storable
as BSON whatever the definition holds.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import functools
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import bson
import numpy as np
import pandas as pd
import pytest
from bson import ObjectId
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as hs

from qcelery.canonical import filter_hash, normalize
from qcelery.errors import TaskDefinitionError

ROOT = Path(__file__).resolve().parents[1]


class Color(enum.Enum):
    RED = "red"


class Plain:
    """An object with Python's default repr (which holds a memory address)."""

    def __init__(self, n):
        self.n = n


def scale(x, k=1):
    return x * k


def assert_bson_safe(value):
    bson.encode({"filter": value})  # raises if not


# ------------------------------------------------------------------ normalisation
def test_tuples_become_lists_and_dict_keys_strings():
    assert normalize({"a": (1, 2), 3: [(4,)]}) == {"a": [1, 2], "3": [[4]]}


def test_dates_and_timestamps_of_one_day_are_one_filter():
    forms = ["2020-01-02", dt.date(2020, 1, 2), dt.datetime(2020, 1, 2), pd.Timestamp("2020-01-02"), np.datetime64("2020-01-02")]
    assert {normalize(f) for f in forms} == {"2020-01-02"}


def test_timestamps_keep_their_time_and_zone():
    assert normalize(pd.Timestamp("2020-01-02 09:30")) == "2020-01-02T09:30:00"
    assert normalize(pd.Timestamp("2020-01-02", tz="UTC")) == "2020-01-02T00:00:00+00:00"


def test_missing_timestamps_are_none():
    assert normalize(pd.NaT) is None
    assert normalize(np.datetime64("NaT")) is None


def test_numpy_scalars_and_arrays_become_python_values():
    out = normalize({"i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True), "a": np.arange(3)})
    assert out == {"i": 3, "f": 0.5, "b": True, "a": [0, 1, 2]}
    assert type(out["i"]) is int and type(out["f"]) is float and type(out["b"]) is bool


def test_non_finite_floats_are_stable_strings():
    assert normalize([float("nan"), float("inf"), -np.inf]) == ["nan", "inf", "-inf"]


def test_integers_beyond_64_bits_become_strings():
    # BSON holds at most a signed 64-bit integer; a bigger one would fail at insert time
    big = 2**70
    assert normalize(big) == str(big)
    assert normalize(2**63 - 1) == 2**63 - 1
    assert normalize(-(2**63)) == -(2**63)
    assert_bson_safe(normalize({"n": big, "m": np.uint64(2**64 - 1)}))


def test_sets_are_sorted_whatever_the_insertion_order():
    assert normalize({"b", "a", "c"}) == ["a", "b", "c"]
    assert normalize(frozenset({3, 1, 2})) == [1, 2, 3]


def test_classes_and_functions_become_dotted_paths():
    assert normalize(Plain) == f"{__name__}.Plain"
    assert normalize(scale) == f"{__name__}.scale"
    assert normalize(np.mean) == "numpy.mean"


def test_other_values():
    assert normalize(Color.RED) == "red"
    assert normalize(decimal.Decimal("1.10")) == "1.10"
    assert normalize(PurePosixPath("/a/b")) == "/a/b"
    oid = ObjectId()
    assert normalize(oid) == str(oid)
    assert normalize(OrderedDict(a=1)) == {"a": 1}


def test_objects_with_default_repr_are_identified_by_content_not_address():
    one, same, other = normalize(Plain(1)), normalize(Plain(1)), normalize(Plain(2))
    assert one == same != other
    assert "0x" not in one


def test_partials_are_identified_by_function_and_arguments():
    a, b = normalize(functools.partial(scale, k=2)), normalize(functools.partial(scale, k=2))
    assert a == b != normalize(functools.partial(scale, k=3))
    assert "0x" not in a


def test_pandas_objects_are_identified_by_their_whole_content():
    # a repr truncates long data: two frames differing in the middle must differ
    x = pd.Series(np.zeros(1000))
    y = x.copy()
    y.iloc[500] = 1.0
    assert normalize(x) == normalize(x.copy()) != normalize(y)
    df = pd.DataFrame({"a": np.arange(200)})
    df2 = df.copy()
    df2.iloc[100, 0] = -1
    assert normalize(df) != normalize(df2)


def test_keys_that_collide_as_strings_are_kept_apart():
    a, b = normalize({1: "x", "1": "y"}), normalize({"1": "y", 1: "x"})
    assert a == b
    assert sorted(a.values()) == ["x", "y"]


def test_reference_cycle_is_a_clear_error():
    loop: list = []
    loop.append(loop)
    with pytest.raises(TaskDefinitionError, match="cycle"):
        normalize({"a": loop})


# --------------------------------------------------------------------------- hash
def test_hash_ignores_key_order():
    assert filter_hash(normalize({"a": 1, "b": {"c": 2, "d": 3}})) == filter_hash(normalize({"b": {"d": 3, "c": 2}, "a": 1}))


def test_hash_tells_different_tasks_apart():
    base = {"model": {"class": "LGBModel", "kwargs": {"lr": 0.1}}, "seg": ("2020-01-01", "2020-06-30")}
    other = {"model": {"class": "LGBModel", "kwargs": {"lr": 0.2}}, "seg": ("2020-01-01", "2020-06-30")}
    assert filter_hash(normalize(base)) != filter_hash(normalize(other))
    # a list and a dict holding the same items are different filters
    assert filter_hash(normalize({"a": [1, 2]})) != filter_hash(normalize({"a": {"0": 1, "1": 2}}))
    # a string that looks like a number is not the number
    assert filter_hash(normalize({"a": "1"})) != filter_hash(normalize({"a": 1}))


def test_hash_is_the_same_in_another_process():
    # another interpreter has another PYTHONHASHSEED and other memory addresses
    task = {
        "model": {"class": "LGBModel", "module_path": "qlib.contrib.model.gbdt"},
        "seg": (pd.Timestamp("2020-01-02"), dt.date(2020, 6, 30)),
        "tags": {"b", "a", "c"},
        "n": np.int64(5),
        "obj": Plain(3),
        "f": functools.partial(scale, k=2),
    }
    code = (
        "import sys, numpy as np, pandas as pd, datetime as dt, functools;"
        "sys.path.insert(0, 'tests');"
        "from test_canonical import Plain, scale;"
        "from qcelery.canonical import filter_hash, normalize;"
        "task = {'model': {'class': 'LGBModel', 'module_path': 'qlib.contrib.model.gbdt'},"
        " 'seg': (pd.Timestamp('2020-01-02'), dt.date(2020, 6, 30)), 'tags': {'b', 'a', 'c'},"
        " 'n': np.int64(5), 'obj': Plain(3), 'f': functools.partial(scale, k=2)};"
        "print(filter_hash(normalize(task)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    # run as a module there, so the class and function paths must match ours
    assert out.stdout.strip() == filter_hash(normalize(_as_module_objects(task)))


def _run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter from the project root; its stdout."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_a_status_command_does_not_load_pandas():
    # the modules `qcelery status` / `wait` / `list` import: pandas is most of their start-up
    code = (
        "import sys, qcelery.cli.main, qcelery.manage, qcelery.batch, qcelery.store;"
        "print(sorted(m for m in ('pandas', 'numpy') if m in sys.modules))"
    )
    assert _run_fresh(code) == "[]"


def test_numpy_values_normalise_the_same_before_pandas_is_imported():
    # datetime64 is read through pandas, which canonical imports only then
    code = (
        "import datetime as dt, numpy as np;"
        "from qcelery.canonical import normalize;"
        "print(normalize([np.datetime64('2020-01-02'), np.datetime64('NaT'), np.int64(5), np.float32(1.5),"
        " np.bool_(True), np.arange(2), np.sqrt, dt.datetime(2020, 1, 2, 3)]))"
    )
    assert _run_fresh(code) == "['2020-01-02', None, 5, 1.5, True, [0, 1], 'numpy.sqrt', '2020-01-02T03:00:00']"


def _as_module_objects(task):
    """The same task built from ``test_canonical`` imported as a top-level module, as
    the subprocess does (pytest may import this file under another name)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import test_canonical as mod
    finally:
        sys.path.pop(0)
    return {**task, "obj": mod.Plain(3), "f": functools.partial(mod.scale, k=2)}


values = hs.recursive(
    hs.none()
    | hs.booleans()
    | hs.integers()
    | hs.floats(allow_nan=True)
    | hs.text(max_size=5)
    | hs.dates().map(lambda d: d)
    | hs.builds(np.int32, hs.integers(-1000, 1000)),
    lambda inner: (
        hs.lists(inner, max_size=4) | hs.tuples(inner, inner) | hs.dictionaries(hs.text(max_size=4) | hs.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=20,
)


@hsettings(max_examples=150, deadline=None)
@given(values)
def test_normalised_values_are_bson_safe_and_idempotent(value):
    out = normalize(value)
    assert_bson_safe(out)
    assert normalize(out) == out
    assert filter_hash(normalize(out)) == filter_hash(out)
