"""``qcelery.serial``: Qlib's ``Serializable`` rules and the allow-listing unpickler."""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import os
import pickle
import subprocess
import uuid
import zoneinfo
from os import system as _shell_alias  # a trusted module that re-exports a shell (see below)

import numpy as np
import pandas as pd
import pytest
from bson import Binary, ObjectId
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from qcelery.errors import ConfigError, DecodeError, TaskTypeError, UnsafePickleError
from qcelery.serial import (
    DEFAULT_ALLOWED_MODULES,
    RestrictedUnpickler,
    Serializable,
    SerializableConfigError,
    dumps,
    restricted_loads,
)

assert _shell_alias is os.system


# ------------------------------------------------------------------------ helpers
class Model(Serializable):
    def __init__(self, **attrs):
        super().__init__()
        self.__dict__.update(attrs)


class WithClassLists(Serializable):
    include_attr = ["_fitted"]
    exclude_attr = ["data", "_fitted"]

    def __init__(self):
        super().__init__()
        self.params = {"lr": 0.1}
        self.data = list(range(5))
        self._fitted = True
        self._cache = "big"


class Lambdas(Serializable):
    pickle_backend = "dill"

    def __init__(self):
        super().__init__()
        self.fn = lambda x: x * 3


class Other(Serializable):
    pass


class Counting(Model):
    """Counts its ``config`` calls (an override, as Qlib's DataHandler and Dataset have)."""

    calls: collections.Counter = collections.Counter()

    def config(self, recursive=False, **kwargs):
        Counting.calls[id(self)] += 1
        super().config(recursive=recursive, **kwargs)


class Shell:
    """Pickles as a call of ``os.system`` (which pickle records as ``posix.system``)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class Spawn:
    def __reduce__(self):
        return subprocess.Popen, (["true"],)


class Evaluate:
    def __reduce__(self):
        return eval, ("1 + 1",)


class NestedLoads:
    """Unpickles by calling ``pickle.loads`` on an inner pickle, which would bypass the allow-list."""

    def __init__(self, inner: bytes):
        self.inner = inner

    def __reduce__(self):
        return pickle.loads, (self.inner,)


def _str(s: str) -> bytes:
    data = s.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + b"\x93"  # STACK_GLOBAL: protocol 4 names may be dotted


def _call(func: bytes, *args: bytes) -> bytes:
    return func + b"(" + b"".join(args) + b"tR"  # MARK args TUPLE REDUCE


def _pickle(expr: bytes) -> bytes:
    return b"\x80\x04" + expr + b"."


def kept(obj: Serializable) -> set[str]:
    return set(obj.__getstate__())


# ------------------------------------------------------------------------ Serializable: keep/drop rules
def test_public_attributes_are_kept_and_private_ones_dropped_by_default():
    m = Model(a=1, _b=2)
    assert kept(m) == {"a"}
    back = pickle.loads(pickle.dumps(m))
    assert back.a == 1 and not hasattr(back, "_b")


def test_dump_all_keeps_private_attributes():
    m = Model(a=1, _b=2)
    m.config(dump_all=True)
    assert kept(m) == {"a", "_b", "_dump_all"}
    assert pickle.loads(pickle.dumps(m))._b == 2


def test_exclude_drops_a_public_attribute_even_with_dump_all():
    m = Model(a=1, big=[0] * 10, _b=2)
    m.config(dump_all=True, exclude=["big"])
    assert "big" not in kept(m) and {"a", "_b"} <= kept(m)


def test_include_keeps_a_private_attribute_without_dump_all():
    m = Model(a=1, _b=2, _c=3)
    m.config(include=["_b"])
    assert kept(m) == {"a", "_b"}


def test_include_beats_exclude_as_in_qlib():
    # Qlib checks the include list before the exclude list: a name in both is kept
    m = Model(a=1, _b=2)
    m.config(include=["a", "_b"], exclude=["a", "_b"])
    assert kept(m) == {"a", "_b"}


def test_config_attributes_are_dropped_even_when_included():
    m = Model(a=1)
    m.config(include=["_include", "_exclude", "a"], exclude=["x"], dump_all=True)
    assert "_include" not in kept(m) and "_exclude" not in kept(m)


def test_class_lists_apply_when_the_object_has_none_configured():
    obj = WithClassLists()
    # _fitted: included (beats its exclusion); data: excluded; _cache: private
    assert kept(obj) == {"params", "_fitted"}
    back = pickle.loads(pickle.dumps(obj))
    assert back.params == {"lr": 0.1} and back._fitted is True
    assert not hasattr(back, "data") and not hasattr(back, "_cache")


def test_configured_lists_replace_the_class_lists():
    obj = WithClassLists()
    obj.config(exclude=["params"], include=[])
    assert kept(obj) == {"data"}
    obj.config(exclude=None, include=None)  # back to the class lists
    assert kept(obj) == {"params", "_fitted"}


def test_dump_all_defaults_to_the_class_default():
    class Everything(Serializable):
        default_dump_all = True

    e = Everything()
    e._secret = 1
    assert e.dump_all is True and "_secret" in kept(e)
    bare = Everything.__new__(Everything)  # never ran __init__
    assert bare.dump_all is True


def test_config_rejects_unknown_options_with_a_key_error():
    with pytest.raises(SerializableConfigError, match=r"unknown option\(s\) \['dumpall'\]") as info:
        Model().config(dumpall=True)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ConfigError)


def test_config_rejects_a_string_where_a_list_of_names_is_expected():
    with pytest.raises(TaskTypeError, match=r"include=\['_b'\]"):
        Model().config(include="_b")
    with pytest.raises(TaskTypeError, match="dump_all"):
        Model().config(dump_all="yes")


# ------------------------------------------------------------------------ Serializable: recursion
def test_recursive_config_reaches_nested_serializables():
    leaf = Model(_w=1)
    mid = Model(leaf=leaf, _m=2)
    root = Model(mid=mid)
    root.config(recursive=True, dump_all=True)
    assert leaf.dump_all and mid.dump_all and root.dump_all
    back = pickle.loads(pickle.dumps(root))
    assert back.mid._m == 2 and back.mid.leaf._w == 1


def test_non_recursive_config_leaves_children_alone():
    child = Model(_w=1)
    root = Model(child=child)
    root.config(dump_all=True)
    assert root.dump_all and not child.dump_all


def test_recursive_config_ends_on_a_cycle_and_visits_each_object_once():
    calls = Counting.calls = collections.Counter()
    a, b = Counting(), Counting()
    shared = Counting()
    a.peer, b.peer = b, a  # a cycle
    a.shared = b.shared = shared  # a diamond
    a.me = a  # a self-loop
    a.config(recursive=True, exclude=["shared"])
    assert calls == {id(a): 1, id(b): 1, id(shared): 1}
    assert b._exclude == ["shared"] and shared._exclude == ["shared"]
    assert not any(k.startswith("_qlib") for obj in (a, b, shared) for k in vars(obj))
    back = pickle.loads(pickle.dumps(a))
    assert back.peer.peer is back and not hasattr(back, "shared")


def test_a_failing_child_config_does_not_break_the_next_recursive_config():
    class Broken(Model):
        def config(self, recursive=False, **kwargs):
            raise RuntimeError("child refuses")

    root = Model(child=Broken())
    with pytest.raises(RuntimeError):
        root.config(recursive=True, dump_all=True)
    other_child = Model()
    Model(c=other_child).config(recursive=True, dump_all=True)
    assert other_child.dump_all


# ------------------------------------------------------------------------ Serializable: files
def test_to_pickle_applies_its_options_and_load_returns_the_object(tmp_path):
    path = tmp_path / "m.pkl"
    Model(a=1, _b=2, big=[1]).to_pickle(path, dump_all=True, exclude=["big"])
    back = Model.load(path)
    assert isinstance(back, Model) and back.a == 1 and back._b == 2 and not hasattr(back, "big")


def test_load_refuses_an_object_of_another_class(tmp_path):
    path = tmp_path / "o.pkl"
    Other().to_pickle(path)
    with pytest.raises(TaskTypeError, match=r"holds a .*Other, not a Model") as info:
        Model.load(path)
    assert isinstance(info.value, TypeError)
    assert isinstance(Serializable.load(path), Other)  # the base class accepts any subclass


def test_dill_backend_round_trips_a_lambda_attribute(tmp_path):
    path = tmp_path / "l.pkl"
    Lambdas().to_pickle(path)
    assert Lambdas.load(path).fn(5) == 15
    with pytest.raises((pickle.PicklingError, AttributeError)):  # which plain pickle cannot do
        pickle.dumps(Lambdas())


def test_unknown_backend_is_a_config_error(tmp_path):
    class Bad(Serializable):
        pickle_backend = "json"

    with pytest.raises(ConfigError, match="pickle_backend is 'json'"):
        Bad().to_pickle(tmp_path / "x")


def test_general_dump_uses_to_pickle_for_serializables_and_pickle_otherwise(tmp_path):
    m = Model(a=1, _b=2)
    m.config(include=["_b"])
    Serializable.general_dump(m, tmp_path / "m.pkl")
    assert Model.load(tmp_path / "m.pkl")._b == 2
    Serializable.general_dump({"x": [1, 2]}, tmp_path / "d.pkl")
    with open(tmp_path / "d.pkl", "rb") as f:
        assert pickle.load(f) == {"x": [1, 2]}
    Serializable.general_dump(Lambdas(), tmp_path / "l.pkl")  # dill, chosen by the class
    assert Lambdas.load(tmp_path / "l.pkl").fn(1) == 3


def test_untrusted_load_goes_through_the_allow_list(tmp_path):
    path = tmp_path / "m.pkl"
    Model(a=np.arange(3), when=pd.Timestamp("2020-01-02")).to_pickle(path)
    back = Model.load(path, trusted=False)  # the class itself is allowed implicitly
    assert back.a.tolist() == [0, 1, 2] and back.when == pd.Timestamp("2020-01-02")

    with open(path, "wb") as f:
        pickle.dump(Shell(f"echo pwned > {tmp_path / 'pwned'}"), f)
    with pytest.raises(UnsafePickleError, match=r"posix\.system"):
        Model.load(path, trusted=False)
    assert not (tmp_path / "pwned").exists()


def test_untrusted_load_needs_the_other_modules_of_the_object(tmp_path):
    path = tmp_path / "m.pkl"
    Model(child=Other()).to_pickle(path)
    with pytest.raises(UnsafePickleError, match=f"{__name__}.Other"):
        Model.load(path, trusted=False)
    assert isinstance(Model.load(path, trusted=False, allowed_modules=[f"{__name__}:Other"]).child, Other)


def test_untrusted_load_refuses_dill_functions_unless_dill_is_trusted(tmp_path):
    path = tmp_path / "l.pkl"
    Lambdas().to_pickle(path)
    with pytest.raises(UnsafePickleError, match="refusing to load global"):
        Lambdas.load(path, trusted=False)
    with pytest.raises(UnsafePickleError, match="dunder"):  # dill rebuilds the lambda's globals from __dict__
        Lambdas.load(path, trusted=False, allowed_modules=["dill", __name__])
    trusting = ["dill", f"{__name__}:__dict__"]
    assert Lambdas.load(path, trusted=False, allowed_modules=trusting).fn(2) == 6


# ------------------------------------------------------------------------ restricted_loads: refusals
def test_os_system_pickle_is_refused_and_does_not_run(tmp_path):
    target = tmp_path / "pwned"
    data = pickle.dumps(Shell(f"echo pwned > {target}"))
    with pytest.raises(UnsafePickleError) as info:
        restricted_loads(data, context="task 1 def")
    assert not target.exists()
    message = str(info.value)
    assert "posix.system" in message or "os.system" in message
    assert message.startswith("task 1 def: refusing")


def test_os_system_is_refused_even_if_posix_or_os_is_trusted(tmp_path):
    target = tmp_path / "pwned"
    data = pickle.dumps(Shell(f"echo pwned > {target}"))
    with pytest.raises(UnsafePickleError, match="'system' loads, evaluates, runs"):
        restricted_loads(data, allowed_modules=["posix", "os"])
    assert not target.exists()


@pytest.mark.parametrize("payload, name", [(Spawn(), "subprocess.Popen"), (Evaluate(), "builtins.eval")])
def test_popen_and_eval_are_refused(payload, name):
    with pytest.raises(UnsafePickleError, match=name.replace(".", r"\.")):
        restricted_loads(pickle.dumps(payload))


def test_a_nested_pickle_loads_is_refused(tmp_path):
    target = tmp_path / "pwned"
    inner = pickle.dumps(Shell(f"echo pwned > {target}"))
    with pytest.raises(UnsafePickleError, match=r"_?pickle\.loads"):
        restricted_loads(pickle.dumps(NestedLoads(inner)))
    assert not target.exists()
    # a pickle kept as bytes inside the data is just bytes
    assert restricted_loads(dumps({"blob": inner})) == {"blob": inner}


@pytest.mark.parametrize(
    "module, name, why",
    [
        ("builtins", "__import__", "dunder"),
        ("builtins", "object.__subclasses__", "dunder"),  # the classic sandbox escape
        ("builtins", "list.__getitem__", "dunder"),
        ("builtins", "print", "builtin functions"),
        ("builtins", "type", "arbitrary types"),
        ("builtins", "license", "_sitebuiltins"),  # a callable instance defined elsewhere
        ("builtins", "open", "opens"),
        ("numpy", "load", "loads"),
        ("numpy", "savetxt", "opens"),
        ("numpy", "memmap", "opens"),  # a class that creates and truncates files
        ("numpy", "frompyfunc", "not for its other functions"),
        ("numpy.f2py", "compile", "run code"),
        ("numpy.ctypeslib", "load_library", "run code"),
        ("numpy.testing", "assert_equal", "run code"),
        ("numpy.lib.npyio", "NpzFile", "run code"),
        ("pandas", "read_csv", "pandas.io.parsers"),
        ("pandas", "read_pickle", "loads"),
        ("pandas.io.pickle", "read_pickle", "run code"),
        ("pandas.io.parsers.readers", "read_csv", "run code"),
        ("pandas", "HDFStore", "pandas.io.pytables"),
        ("pandas", "eval", "loads, evaluates"),
        ("pandas", "set_option", "pandas._config"),
        ("pandas", "DataFrame.to_csv", "not for its other functions"),
        ("pandas", "DataFrame.from_dict", "not for its other functions"),  # class methods only when listed
        ("numpy._core", "_internal", "module object"),
        ("pandas.io.formats.style", "Styler", "run code"),
        ("collections", "namedtuple", "not for its other functions"),  # namedtuple runs exec
        ("qcelery.worker", "resolve", "run code"),  # imports any dotted path
        ("qcelery.embedded", "EmbeddedMongo", "run code"),  # starts a server
        ("copyreg", "add_extension", "not for its other functions"),
        ("_codecs", "decode", "not for its other functions"),
        ("numpy._core.multiarray", "_reconstruct.__globals__", "dunder"),
        ("pandas.core.algorithms", "_reconstruct_data", "not for its other functions"),  # private is not enough
        ("os", "system", "not in the allow-list"),
        ("posix", "system", "not in the allow-list"),
        ("subprocess", "Popen", "not in the allow-list"),
        ("pickle", "loads", "not in the allow-list"),
    ],
)
def test_globals_that_could_run_code_or_touch_files_are_refused(module, name, why):
    data = _pickle(_global(module, name))
    with pytest.raises(UnsafePickleError, match=f"{module}.{name}".replace(".", r"\.")) as info:
        restricted_loads(data)
    assert why in str(info.value)


def test_a_module_reached_through_an_allowed_module_is_refused():
    # qcelery.serial imports pickle: qcelery.serial.pickle.loads must not resolve
    with pytest.raises(UnsafePickleError, match="is a module object"):
        restricted_loads(_pickle(_global("qcelery.serial", "pickle")))
    with pytest.raises(UnsafePickleError, match="'loads'"):
        restricted_loads(_pickle(_global("qcelery.serial", "pickle.loads")))
    with pytest.raises(UnsafePickleError, match="module object"):
        restricted_loads(_pickle(_global("qcelery.serial", "re.escape")), allowed_modules=["qcelery.serial"])


def test_a_trusted_module_does_not_expose_what_it_imports():
    # this test module is trusted below, yet its alias of os.system stays out of reach
    with pytest.raises(UnsafePickleError, match=r"really posix\.system"):
        restricted_loads(_pickle(_call(_global(__name__, "_shell_alias"), _str("true"))), allowed_modules=[__name__])


def test_a_trusted_module_lends_its_functions():
    data = _pickle(_call(_global(__name__, "kept"), _call(_global(__name__, "Model"))))
    with pytest.raises(UnsafePickleError, match="not in the allow-list"):
        restricted_loads(data)
    assert restricted_loads(data, allowed_modules=[__name__]) == set()


def test_an_exact_global_entry_allows_just_that_global():
    data = _pickle(_call(_global("collections", "namedtuple"), _str("P"), _str("x y")))
    point = restricted_loads(data, allowed_modules=["collections:namedtuple"])
    assert point._fields == ("x", "y")
    with pytest.raises(UnsafePickleError):
        restricted_loads(_pickle(_global("numpy", "frompyfunc")), allowed_modules=["collections:namedtuple"])


def test_a_denied_submodule_needs_to_be_allowed_by_its_own_name():
    data = _pickle(_global("pandas.io.pickle", "to_pickle"))
    with pytest.raises(UnsafePickleError):
        restricted_loads(data, allowed_modules=["pandas"])  # the parent is not enough
    with pytest.raises(UnsafePickleError, match="'to_pickle'"):  # the name stays refused
        restricted_loads(data, allowed_modules=["pandas.io"])
    assert restricted_loads(_pickle(_global("pandas.io.common", "is_url")), allowed_modules=["pandas.io"])("x") is False


def test_guarded_getattr_only_returns_class_members_and_class_methods():
    zone = restricted_loads(pickle.dumps(zoneinfo.ZoneInfo("Asia/Shanghai")))  # pickles via getattr
    assert zone == zoneinfo.ZoneInfo("Asia/Shanghai")
    member = _call(_global("builtins", "getattr"), _global("uuid", "SafeUUID"), _str("safe"))
    assert restricted_loads(_pickle(member)) is uuid.SafeUUID.safe
    refused = {
        ("pandas", "DataFrame", "to_csv"): "only classes, members and the class methods",
        ("builtins", "dict", "fromkeys"): "only classes, members and the class methods",  # harmless, but not listed
        ("pathlib", "Path", "home"): "only classes, members and the class methods",
        ("pandas", "DataFrame", "eval"): "loader/shell",
        ("qcelery.serial", "Serializable", "load"): "loader/shell",
        ("builtins", "object", "__subclasses__"): "dunder",
    }
    for (module, cls, attr), why in refused.items():
        data = _pickle(_call(_global("builtins", "getattr"), _global(module, cls), _str(attr)))
        with pytest.raises(UnsafePickleError, match=why):
            restricted_loads(data)
    fromkeys = _pickle(_call(_call(_global("builtins", "getattr"), _global("builtins", "dict"), _str("fromkeys")), _str("ab")))
    assert restricted_loads(fromkeys, allowed_modules=["builtins:dict.fromkeys"]) == {"a": None, "b": None}
    on_instance = _call(_global("builtins", "getattr"), _call(_global("builtins", "dict")), _str("get"))
    with pytest.raises(UnsafePickleError, match="instance"):
        restricted_loads(_pickle(on_instance))


def test_numpy_ufunc_reconstruct_only_rebuilds_ufuncs():
    # numpy 1.x pickled ufuncs through _ufunc_reconstruct(module, name), which imports anything
    for core in ("numpy.core", "numpy._core"):
        rebuild = _global(core, "_ufunc_reconstruct")
        assert restricted_loads(_pickle(_call(rebuild, _str("numpy"), _str("add")))) is np.add
        for module, name, why in [
            ("os", "system", "only ufuncs of allowed modules"),
            ("posix", "system", "only ufuncs of allowed modules"),
            ("numpy", "savetxt", "not a ufunc"),
            ("numpy", "__builtins__", "only ufuncs"),
        ]:
            with pytest.raises(UnsafePickleError, match=why):
                restricted_loads(_pickle(_call(rebuild, _str(module), _str(name))))


def test_an_unknown_global_in_an_allowed_module_is_a_decode_error():
    with pytest.raises(DecodeError, match="numpy.no_such_thing"):
        restricted_loads(_pickle(_global("numpy", "no_such_thing")))


def test_allowed_modules_must_be_a_list_not_a_string():
    with pytest.raises(TaskTypeError, match=r"\['mypkg'\]"):
        restricted_loads(dumps(1), allowed_modules="mypkg")


# ------------------------------------------------------------------------ restricted_loads: what is accepted
ACCEPTED = {
    "dataframe": pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"], "t": pd.to_datetime(["2020-01-01", "2020-01-02"])}),
    "multiindex": pd.DataFrame(
        {"label": [0.1, 0.2]},
        index=pd.MultiIndex.from_tuples(
            [(pd.Timestamp("2020-01-02"), "SH600000"), (pd.Timestamp("2020-01-03"), "SZ000001")], names=["datetime", "instrument"]
        ),
    ),
    "series_tz": pd.Series([1, 2], index=pd.date_range("2020-01-01", periods=2, tz="Asia/Shanghai")),
    "categorical": pd.Categorical(["a", "b", "a"]),
    "nullable": pd.array([1, None], dtype="Int64"),
    "periods": pd.period_range("2020-01", periods=3, freq="M"),
    "intervals": pd.interval_range(0, 3),
    "offsets": [pd.offsets.BDay(2), pd.DateOffset(months=1), pd.Timedelta("1D"), pd.NaT],
    "array": np.arange(12.0).reshape(3, 4),
    "object_array": np.array([1, "a", None], dtype=object),
    "structured": np.zeros(2, dtype=[("a", "i4"), ("b", "f8")]),
    "scalars": [np.float32(1.5), np.int64(3), np.bool_(True), np.datetime64("2020-01-01")],
    "masked": np.ma.masked_array([1, 2], mask=[0, 1]),
    "generator": np.random.default_rng(0),
    "ufunc": np.log,
    "datetimes": [dt.datetime(2020, 1, 2, 3, tzinfo=dt.timezone.utc), dt.date(2020, 1, 2), dt.timedelta(3), dt.time(4)],
    "zones": [zoneinfo.ZoneInfo("Asia/Shanghai"), __import__("pytz").timezone("Asia/Shanghai"), __import__("dateutil").tz.tzutc()],
    "values": [decimal.Decimal("1.1"), uuid.UUID(int=7), ObjectId("65f000000000000000000000"), uuid.SafeUUID.safe, ValueError("x")],
    "collections": [
        collections.OrderedDict(a=1),
        collections.defaultdict(list, a=[1]),
        collections.deque([1]),
        collections.Counter("aab"),
        {1, 2},
        frozenset([3]),
        bytearray(b"x"),
        range(3),
        slice(1, 2),
        1j,
    ],
    "nested": {
        "model": {"class": "LGBModel", "kwargs": {"lr": 0.1, "segments": {"train": ("2008-01-01", "2014-12-31")}}},
        "record": [{"class": "SignalRecord"}],
        "empty": {},
        "none": None,
    },
}


def _equal(a, b) -> bool:
    if isinstance(a, (pd.DataFrame, pd.Series)):
        return a.equals(b)
    if isinstance(a, np.ma.MaskedArray):
        return bool((a == b).all()) and (a.mask == b.mask).all()
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=False)
    if isinstance(a, (pd.Categorical, pd.api.extensions.ExtensionArray, pd.Index)):
        return a.equals(b) if hasattr(a, "equals") else list(a) == list(b)
    if isinstance(a, np.random.Generator):
        return a.bit_generator.state == b.bit_generator.state
    if isinstance(a, Exception):
        return type(a) is type(b) and a.args == b.args
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if a is pd.NaT:
        return b is pd.NaT
    return a == b


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_plain_data_and_scientific_types_are_accepted(name, protocol):
    value = ACCEPTED[name]
    assert _equal(value, restricted_loads(pickle.dumps(value, protocol=protocol)))


def test_the_default_allow_list_and_unpickler_keep_their_public_shape():
    assert {"numpy", "pandas", "builtins", "qcelery"} <= set(DEFAULT_ALLOWED_MODULES)
    import io

    unpickler = RestrictedUnpickler(io.BytesIO(dumps([1])), ["mypkg"], context="ctx")
    assert unpickler.load() == [1] and "mypkg" in unpickler.allowed and unpickler.context == "ctx"


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.datetimes()
    | st.decimals(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
        | st.frozensets(st.integers(), max_size=4)
    ),
    max_leaves=20,
)


@hsettings(max_examples=60, deadline=None)
@given(plain)
def test_plain_data_round_trips_through_dumps_and_restricted_loads(value):
    assert restricted_loads(dumps(value)) == value


# ------------------------------------------------------------------------ through the task pool
def test_a_hostile_def_in_the_pool_is_refused_when_read(settings, tmp_path):
    from qcelery.manage import TaskManager

    tm = TaskManager("serial_pool", settings)
    task_def = {"model": {"class": "M"}, "dataset": {"segments": {"test": (pd.Timestamp("2020-01-01"), None)}}, "record": []}
    [task_id] = tm.create_task([task_def])
    assert tm.re_query(task_id)["def"] == task_def
    target = tmp_path / "pwned"
    tm.task_pool.update_one({"_id": task_id}, {"$set": {"def": Binary(pickle.dumps(Shell(f"echo pwned > {target}")))}})
    with pytest.raises(UnsafePickleError, match=rf"task {task_id} in pool 'serial_pool', field 'def'.*posix\.system"):
        tm.re_query(task_id)
    assert not target.exists()
