"""Serialization: Qlib's ``Serializable``, the allow-listing unpickler, and the one
allow-list that decides what task data may name.

Task definitions (``def``) and results (``res``) are stored pickled, as Qlib stores
them, so a Qlib pool can be read by qcelery and back. They are only ever decoded
through :func:`restricted_loads`, which resolves globals under an allow-list
policy; anything else (``os.system``, ``subprocess.Popen``, ``builtins.eval``...)
is refused before it can run.

The allow-list policy
---------------------
An entry of the allow-list is either a module prefix (``"mypkg"`` admits
``mypkg`` and ``mypkg.models``) or one exact global, ``"module:qualname"``
(``"numpy:savetxt"``). Entries come from :data:`DEFAULT_ALLOWED_MODULES` plus the
caller's (``settings.allowed_modules`` / ``QCELERY_ALLOWED_MODULES``).

* From the **default** modules (qcelery, qlib, lightgbm, xgboost, catboost, sklearn,
  torch, numpy, pandas and the standard data types) a pickle may load classes,
  constants, numpy ufuncs, the
  helpers pickles are rebuilt with (``_reconstruct``, ``_unpickle_block``,
  ``__pyx_unpickle_*``...) and the few data functions fitted objects keep (Qlib's
  ``zscore`` / ``robust_zscore``, held by a fitted handler's ``CSZScoreNorm``), never
  another function: ``numpy.savetxt``,
  ``pandas.read_csv`` or ``qcelery.worker.resolve`` would let a pickle write files
  or import code. Sub-modules that read or write files or run code
  (``pandas.io``, ``numpy.f2py``, ``numpy.testing``, qcelery's server modules...)
  are refused whole, even though their parent is allowed.
* Modules **you** add are trusted: any global in them may be loaded.
* Whatever the tier: a global whose path goes through a module object or a dunder
  (``object.__subclasses__``), whose object really lives in a module outside the
  allow-list (``mypkg.system`` that is ``posix.system`` re-exported), or whose name
  is a loader, shell or evaluator (``load``, ``loads``, ``system``, ``eval``...)
  is refused; only an exact ``"module:qualname"`` entry overrides this.
* The functions pickles are rebuilt with are listed one by one, each read: a name
  pattern would not do (numpy's ``_ufunc_reconstruct(module, name)`` imports
  anything; it is replaced by a version that only returns ufuncs). Likewise
  ``builtins.getattr`` (pickles of ``ZoneInfo`` go through it) is replaced by a
  guarded version that returns class attributes that are classes, members (enums)
  or listed class methods.

The same list decides what a task definition or batch may *import* (a model's
``class`` / ``module_path``, a batch's ``task_func``): :func:`admit_import`. From the
default modules, public classes and functions (never names starting with ``_``), minus
the sub-modules and names that load, import or run what they are handed (the risky
sub-modules above, ``qcelery.instance``, ``qcelery.serial``, ``init``,
``init_instance_by_config``...); from modules you add, anything public; always judged by
where the object really comes from. A refusal is one
:class:`~qcelery.errors.ModuleNotAllowedError` naming the module and
``QCELERY_ALLOWED_MODULES``.

This keeps a hostile document from running code; it does not bound memory or CPU.
"""

from __future__ import annotations

import _compat_pickle
import contextvars
import functools
import importlib
import io
import pickle
import re
import types
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, DecodeError, ModuleNotAllowedError, SerializableConfigError, TaskTypeError, UnsafePickleError

#: the packages task data may name when nothing is configured: the models, datasets,
#: handlers and records of this field, and the standard types their pickles are made of.
#: A prefix admits its sub-modules too; ``settings.allowed_modules`` adds to this list.
DEFAULT_ALLOWED_MODULES: tuple[str, ...] = (
    "qcelery",
    "qlib",
    "lightgbm",
    "xgboost",
    "catboost",
    "sklearn",
    "torch",
    "numpy",
    "pandas",
    "datetime",
    "collections",
    "builtins",
    "copyreg",
    "decimal",
    "fractions",
    "uuid",
    "pathlib",
    "bson",
    "zoneinfo",
    "pytz",
    "dateutil",
    "_codecs",
    "enum",
)

#: sub-modules of allowed prefixes that open files or URLs, compile, load or run code;
#: refused unless the caller allows the sub-module itself (not just its parent)
_RISKY_MODULES: tuple[str, ...] = (
    "numpy.f2py",
    "numpy.distutils",
    "numpy.testing",
    "numpy.ctypeslib",
    "numpy._pytesttester",
    "numpy.lib.npyio",
    "numpy.lib._npyio_impl",
    "numpy.lib.format",
    "numpy.lib._format_impl",
    "numpy.lib._datasource",
    "numpy.lib._utils_impl",
    "numpy.lib.utils",
    "numpy._core._internal",
    "numpy.core._internal",
    "numpy.conftest",
    "numpy.tests",
    "pandas.io",
    "pandas._testing",
    "pandas.testing",
    "pandas.util",
    "pandas.plotting",
    "pandas.core.computation",
    "pandas.compat",
    "pandas._config",
    "pandas.conftest",
    "pandas.tests",
    "pandas._libs.parsers",
    "pandas._libs.json",
    "pandas._libs.writers",
    "pandas._libs.testing",
    "pandas._libs.sas",
    # Qlib's own loaders import anything a config names, or unpickle files
    "qlib.utils.mod",
    "qlib.utils.pickle_utils",
    "qlib.utils.objm",
    "qlib.config",
    "qlib.cli",
    "qlib.run",
    "qlib.workflow.cli",
    "qlib.tests",
    # compile or load code, spawn processes, fetch from the network
    "torch.hub",
    "torch.package",
    "torch.jit",
    "torch.serialization",
    "torch.storage",
    "torch.utils.cpp_extension",
    "torch.utils.benchmark",
    "torch.distributed",
    "torch.multiprocessing",
    "torch.testing",
    "torch.onnx",
    "torch.export",
    "torch.compiler",
    "torch._dynamo",
    "torch._inductor",
    "sklearn.datasets",
    "sklearn.externals",
    "sklearn.utils._testing",
    "sklearn.tests",
    "xgboost.testing",
    "xgboost.spark",
    "xgboost.dask",
    "xgboost.tracker",
    "xgboost.collective",
    "catboost.datasets",
    "catboost.utils",
    # qcelery modules that hold servers, processes, connections and settings, not values
    "qcelery.embedded",
    "qcelery.cluster",
    "qcelery.cli",
    "qcelery.celery_app",
    "qcelery.worker",
    "qcelery.beat",
    "qcelery.producer",
    "qcelery.store",
    "qcelery.manage",
    "qcelery.settings",
)

#: what a pickle may not load from, even under an allowed prefix
_DENIED_MODULES: tuple[str, ...] = (*_RISKY_MODULES, "qcelery.probes")

#: what a task definition or batch may not import from, even under an allowed prefix:
#: qcelery's own loaders (``init_instance_by_config``, ``restricted_loads``) would import
#: or unpickle anything handed to them. (The probes are task functions, so they may.)
_IMPORT_DENIED_MODULES: tuple[str, ...] = (*_RISKY_MODULES, "qcelery.instance", "qcelery.serial")

#: names that load, evaluate, spawn or open; refused anywhere in a global's path
_DENIED_NAMES = frozenset(
    {
        "eval",
        "exec",
        "compile",
        "system",
        "popen",
        "spawn",
        "execv",
        "execve",
        "fork",
        "open",
        "load",
        "loads",
        "read_pickle",
        "to_pickle",
        "import_module",
        "getattr",
        "setattr",
        "delattr",
        "memmap",
        "fromfile",
        "tofile",
        "save",
        "savez",
        "savez_compressed",
        "savetxt",
        "loadtxt",
        "genfromtxt",
        "fromregex",
        "DataSource",
        "dump",
        "dumps",
    }
)

#: builtins that are classes but would let a pickle build or reach arbitrary types
_DENIED_BUILTINS = frozenset(
    {
        "type",
        "super",
        "property",
        "classmethod",
        "staticmethod",
        "memoryview",
    }
)

#: the functions pickles of the default modules' types are rebuilt with, each read and
#: found to build only the value it is given (a name pattern would not do: numpy's
#: ``_ufunc_reconstruct(module, name)`` imports anything, see ``_guarded_ufunc``)
_RECONSTRUCTORS = frozenset(
    {
        ("copyreg", "_reconstructor"),
        ("copyreg", "__newobj__"),
        ("copyreg", "__newobj_ex__"),
        ("_codecs", "encode"),
        *((core, name) for core in ("numpy._core", "numpy.core") for name in ("_DType_reconstruct",)),
        *((f"{core}.multiarray", name) for core in ("numpy._core", "numpy.core") for name in ("_reconstruct", "scalar")),
        *((f"{core}.numeric", "_frombuffer") for core in ("numpy._core", "numpy.core")),
        ("numpy.ma.core", "_mareconstruct"),
        ("numpy.ma.mrecords", "_mrreconstruct"),
        ("numpy.random._pickle", "__bit_generator_ctor"),
        ("numpy.random._pickle", "__generator_ctor"),
        ("numpy.random._pickle", "__randomstate_ctor"),
        ("numpy.random", "__RandomState_ctor"),
        ("pandas._libs.internals", "_unpickle_block"),
        ("pandas._libs.tslibs.nattype", "__nat_unpickle"),
        ("pandas._libs.tslibs.timedeltas", "_timedelta_unpickle"),
        ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas.core.indexes.datetimes", "_new_DatetimeIndex"),
        ("pandas.core.indexes.interval", "_new_IntervalIndex"),
        ("pandas.core.indexes.period", "_new_PeriodIndex"),
        ("pandas.core.internals.blocks", "new_block"),
        ("pytz", "_p"),
        ("pytz", "_UTC"),
    }
)
#: functions of the default modules that fitted objects keep as attributes, so their pickles
#: name them; each read and found to compute on the data it is given, nothing else (Qlib's
#: ``CSZScoreNorm`` processor, in every fitted ``Alpha158`` / ``Alpha360``, keeps one)
_DATA_FUNCTIONS = frozenset({("qlib.utils.data", "zscore"), ("qlib.utils.data", "robust_zscore")})
#: Cython's generated rebuilders (``__pyx_unpickle_X(type, checksum, state)`` makes an X
#: with ``X.__new__`` and sets its fields)
_CYTHON_RECONSTRUCTOR = re.compile(r"^__pyx_unpickle_\w+$")
#: class methods of the default modules that pickles call (``getattr(ZoneInfo, "_unpickle")``)
_RECONSTRUCTOR_METHODS = frozenset({("zoneinfo", "ZoneInfo._unpickle")})
#: numpy 1.x pickled ufuncs as ``_ufunc_reconstruct(module, name)``, which imports anything
_UFUNC_RECONSTRUCT = frozenset({("numpy.core", "_ufunc_reconstruct"), ("numpy._core", "_ufunc_reconstruct")})

#: Python 2 module names that protocol 0-2 pickles may still carry
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg", "exceptions": "builtins"}

_DEFAULT, _USER = "default", "user"


def _covers(prefix: str, module: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _is_dunder(part: str) -> bool:
    return len(part) > 4 and part.startswith("__") and part.endswith("__")


def _is_ufunc(obj: Any) -> bool:
    kind = type(obj)
    return kind.__name__ == "ufunc" and kind.__module__ == "numpy"


@dataclass(frozen=True)
class _Policy:
    """Which globals a pickle may load (hashable, so decisions can be cached)."""

    user_prefixes: tuple[str, ...]
    exact: frozenset[tuple[str, str]]

    @classmethod
    def build(cls, allowed_modules: Iterable[str]) -> _Policy:
        if isinstance(allowed_modules, str):
            raise TaskTypeError(
                f"allowed_modules must be a list of module names, got the string {allowed_modules!r} (write [{allowed_modules!r}])"
            )
        prefixes: list[str] = []
        exact: set[tuple[str, str]] = set()
        for entry in allowed_modules:
            if not isinstance(entry, str) or not entry.strip():
                raise ConfigError(f"allowed_modules entry {entry!r} is not a module name or 'module:qualname'")
            module, sep, qualname = entry.strip().partition(":")
            if sep:
                exact.add((module, qualname))
            elif module not in DEFAULT_ALLOWED_MODULES and module not in prefixes:
                prefixes.append(module)
        return cls(tuple(prefixes), frozenset(exact))

    def tier(self, module: str, denied: tuple[str, ...] = _DENIED_MODULES) -> str | None:
        """``"default"``/``"user"`` for an allowed module, ``"denied"`` or ``None``;
        ``denied`` lists the sub-modules refused under allowed prefixes."""
        best = max((p for p in (*DEFAULT_ALLOWED_MODULES, *self.user_prefixes) if _covers(p, module)), key=len, default=None)
        if best is None:
            return None
        user = best in self.user_prefixes
        # a denied sub-module stays denied unless the caller allowed it (or something inside it) by name
        if any(_covers(d, module) and not (user and _covers(d, best)) for d in denied):
            return "denied"
        return _USER if user else _DEFAULT


def _origin_problem(policy: _Policy, obj: Any, module: str, name: str, denied: tuple[str, ...] = _DENIED_MODULES) -> str | None:
    """Why ``obj`` may not be loaded given where it really comes from, or ``None``."""
    if isinstance(obj, types.ModuleType):
        return "it is a module object, which no pickle of data refers to"
    origin = getattr(obj, "__module__", None) if (isinstance(obj, type) or callable(obj)) else type(obj).__module__
    if isinstance(origin, str) and origin != module and policy.tier(origin, denied) not in (_DEFAULT, _USER):
        qualname = getattr(obj, "__qualname__", name)
        return f"it is really {origin}.{qualname}, from a module the allow-list does not admit"
    return None


@functools.lru_cache(maxsize=2048)
def _decide(policy: _Policy, module: str, name: str) -> tuple[Any, str | None]:
    """``(object, None)`` when ``module.name`` may be loaded, else ``(None, reason)``.

    Import and attribute errors propagate (they are not decisions, and not cached).
    """
    if (module, name) in policy.exact:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj, None
    tier = policy.tier(module)
    if tier is None:
        return None, (
            f"module {module!r} is not in the allow-list (add it to settings.allowed_modules / "
            "QCELERY_ALLOWED_MODULES if you trust all of its code)"
        )
    if tier == "denied":
        return None, (
            f"module {module!r} can read or write files or run code; it is refused even though "
            f"its parent package is allowed (add {module!r} itself to allowed_modules to trust it)"
        )
    parts = name.split(".")
    for part in parts:
        if _is_dunder(part) and (module, name) not in _RECONSTRUCTORS:
            return None, f"{part!r} is a dunder attribute, the way out of every sandbox"
        if part in _DENIED_NAMES:
            return None, f"{part!r} loads, evaluates, runs or opens something"

    obj = importlib.import_module(module)
    owner: Any = None
    for i, part in enumerate(parts):
        if i and not isinstance(obj, type):
            return None, f"the path goes through {'.'.join(parts[:i])!r}, which is not a class"
        owner, obj = obj, getattr(obj, part)
        if isinstance(obj, types.ModuleType):
            return None, f"{'.'.join(parts[: i + 1])!r} is a module object, which no pickle of data refers to"
    problem = _origin_problem(policy, obj, module, name)
    if problem:
        return None, problem
    if module == "builtins":
        if name in _DENIED_BUILTINS:
            return None, f"builtins.{name} would let a pickle build or reach arbitrary types"
        if not isinstance(obj, type) and callable(obj):
            return None, "builtin functions are not loaded (only builtin classes and constants)"
    if tier == _USER:
        return obj, None
    # default tier: classes, constants, ufuncs and reconstruction helpers only
    if isinstance(obj, type) or not callable(obj) or _is_ufunc(obj):
        return obj, None
    if len(parts) > 1 and isinstance(obj, owner):
        return obj, None  # an enum member
    if len(parts) > 1 and getattr(obj, "__self__", None) is owner and (owner.__module__, name) in _RECONSTRUCTOR_METHODS:
        return obj, None
    if len(parts) == 1 and ((module, name) in _RECONSTRUCTORS or (module, name) in _DATA_FUNCTIONS or _CYTHON_RECONSTRUCTOR.match(name)):
        return obj, None
    return None, (
        f"{module!r} is allowed for its classes, constants and pickle reconstruction helpers, not for its other functions and methods"
    )


# ---------------------------------------------------------------------------- imports
# The same allow-list decides what a task definition (``class`` / ``module_path`` /
# ``func``) or a batch (``task_func``, ``aggregate.func``) may import and call. From the
# default packages: public classes and functions, minus the sub-modules and names that
# load, import or run whatever they are handed; from modules you add: anything public.

_DOTTED_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")

#: names a task part may not be, in any module: generic loaders (``init_instance_by_config``
#: imports whatever config it gets) and library start-up (``qlib.init`` builds the classes
#: its arguments name)
_IMPORT_DENIED_NAMES = frozenset(
    {
        "init",
        "auto_init",
        "init_instance_by_config",
        "get_callable_kwargs",
        "get_module_by_module_path",
        "resolve",
        "import_string",
        "locate",
    }
)


@functools.lru_cache(maxsize=64)
def _policy_for(allowed_modules: tuple[str, ...]) -> _Policy:
    return _Policy.build(allowed_modules)


def allow_list(allowed_modules: Iterable[str] = ()) -> tuple[str, ...]:
    """The module prefixes and ``"module:qualname"`` entries in force: the defaults plus
    ``allowed_modules`` (``settings.allowed_modules``), for messages and status output."""
    policy = _policy_for(_as_entries(allowed_modules))
    return (*DEFAULT_ALLOWED_MODULES, *policy.user_prefixes, *sorted(f"{m}:{q}" for m, q in policy.exact))


def _as_entries(allowed_modules: Iterable[str]) -> tuple[str, ...]:
    if isinstance(allowed_modules, str):
        _Policy.build(allowed_modules)  # raises: a lone string is not split into letters
    return tuple(allowed_modules)


@functools.lru_cache(maxsize=1024)
def _import_refusal(policy: _Policy, module: str, name: str) -> str | None:
    """Why a task part may not name ``module.name``, judged from the names alone (nothing
    imported), or ``None``."""
    if (module, name) in policy.exact:
        return None
    if not _DOTTED_NAME.match(module):
        return f"{module!r} is not a module name (a dotted Python path: files and URLs are never imported)"
    if not _DOTTED_NAME.match(name):
        return f"{name!r} is not a Python name"
    tier = policy.tier(module, _IMPORT_DENIED_MODULES)
    if tier is None:
        return f"module {module!r} is not in the allow-list"
    if tier == "denied":
        return (
            f"module {module!r} loads or runs code, or reaches files, processes and servers; it is refused "
            f"even though its parent package is allowed (allow {module!r} itself to trust it)"
        )
    for part in name.split("."):
        if _is_dunder(part) or (tier == _DEFAULT and part.startswith("_")):
            return f"{part!r} is not public"
        if part in _DENIED_NAMES or part in _IMPORT_DENIED_NAMES:
            return f"{part!r} loads, imports, evaluates, runs or opens something"
    return None


@functools.lru_cache(maxsize=1024)
def _import_decide(policy: _Policy, module: str, name: str) -> tuple[Any, str | None]:
    """``(object, None)`` when a task part may be ``module.name``, else ``(None, reason)``.

    Import and attribute errors propagate (they are not decisions, and not cached)."""
    reason = _import_refusal(policy, module, name)
    if reason:
        return None, reason
    obj: Any = importlib.import_module(module)
    parts = name.split(".")
    for i, part in enumerate(parts):
        if i and not isinstance(obj, type):
            return None, f"the path goes through {'.'.join(parts[:i])!r}, which is not a class"
        obj = getattr(obj, part)
        if isinstance(obj, types.ModuleType):
            return None, f"{'.'.join(parts[: i + 1])!r} is a module, not a class or function"
    if (module, name) not in policy.exact:
        problem = _origin_problem(policy, obj, module, name, _IMPORT_DENIED_MODULES)
        if problem:
            return None, problem
        if module == "builtins" and (not isinstance(obj, type) or name in _DENIED_BUILTINS):
            return None, "only builtin value types are task parts"
    if not callable(obj):
        return None, f"it is a {type(obj).__name__}, not a class or function"
    return obj, None


def admit_import(module: str, name: str, allowed_modules: Iterable[str] = (), *, what: str = "task part", load: bool = True) -> Any:
    """The class or function ``module.name``, if the allow-list admits it as a task part.

    ``allowed_modules`` are added to :data:`DEFAULT_ALLOWED_MODULES` (module prefixes, or
    ``"module:qualname"`` for one object); ``what`` names the part in the error
    ("task 65f... model class"). With ``load=False`` only the names are judged: nothing
    is imported and ``None`` is returned (a producer need not have the task's packages).
    Raises :class:`~qcelery.errors.ModuleNotAllowedError`, naming the module and
    ``QCELERY_ALLOWED_MODULES``; an admitted module that does not import raises
    ``ImportError`` / ``AttributeError`` as usual.
    """
    policy = _policy_for(_as_entries(allowed_modules))
    if load:
        obj, reason = _import_decide(policy, module, name)
    else:
        obj, reason = None, _import_refusal(policy, module, name)
    if reason is not None:
        fix = (
            f"add the module to QCELERY_ALLOWED_MODULES (settings.allowed_modules) if you trust all of its code, "
            f"or allow just this object with '{module}:{name}'"
            if _DOTTED_NAME.match(module)
            else "name a class or function by its dotted Python path, within QCELERY_ALLOWED_MODULES (settings.allowed_modules)"
        )
        raise ModuleNotAllowedError(
            f"{what} {module}.{name} is refused: {reason}. Task data may only name modules of the allow-list: {fix}"
        )
    return obj


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves globals only under the allow-list policy.

    ``allowed_modules`` adds module prefixes (trusted: any global in them) or exact
    ``"module:qualname"`` globals to :data:`DEFAULT_ALLOWED_MODULES`; ``context``
    names what is decoded (e.g. ``"task 65f... res"``) in error messages. Refusals
    raise :class:`~qcelery.errors.UnsafePickleError` before anything is called.
    Qlib has no such unpickler: it loads pool documents with plain ``pickle``.
    """

    def __init__(self, file: io.BufferedIOBase, allowed_modules: Iterable[str] = (), context: str = "pickle"):
        super().__init__(file)
        self.policy = _Policy.build(allowed_modules)
        self.allowed = tuple(DEFAULT_ALLOWED_MODULES) + self.policy.user_prefixes
        self.context = context

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names of protocol 0-2 pickles
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _PY2_MODULES.get(module, module)
        if (module, name) == ("builtins", "getattr"):  # ZoneInfo and class methods pickle through it
            return self._guarded_getattr
        if (module, name) in _UFUNC_RECONSTRUCT:
            return self._guarded_ufunc
        try:
            obj, reason = _decide(self.policy, module, name)
        except (ImportError, AttributeError) as exc:
            raise DecodeError(f"{self.context}: global {module}.{name} cannot be resolved: {exc}") from exc
        if reason is not None:
            raise UnsafePickleError(
                f"{self.context}: refusing to load global {module}.{name}: {reason}. "
                f"If this pickle is trusted, allow just this global with '{module}:{name}' in allowed_modules"
            )
        return obj

    def _guarded_getattr(self, obj: Any, attr: Any, *default: Any) -> Any:
        """``getattr`` for pickles: on a default-module class, only attributes that are
        classes, members, or class methods listed in ``_RECONSTRUCTOR_METHODS`` or
        allowed exactly (``"zoneinfo:ZoneInfo._unpickle"``); anything on a trusted module's
        classes and instances except dunders, loader names and modules."""
        where = f"getattr({getattr(obj, '__qualname__', type(obj).__qualname__)}, {attr!r})"
        if default or not isinstance(attr, str):
            raise UnsafePickleError(f"{self.context}: refusing {where}: only getattr(class, 'name') is supported")
        if _is_dunder(attr) or attr in _DENIED_NAMES:
            raise UnsafePickleError(f"{self.context}: refusing {where}: {attr!r} is a dunder or a loader/shell name")
        owner = obj if isinstance(obj, type) else type(obj)
        owner_tier = self.policy.tier(owner.__module__)
        if owner_tier not in (_DEFAULT, _USER):
            raise UnsafePickleError(f"{self.context}: refusing {where}: {owner.__module__!r} is not allowed")
        if not isinstance(obj, type) and owner_tier != _USER:
            raise UnsafePickleError(f"{self.context}: refusing {where}: getattr on an instance of a default-module class")
        value = getattr(obj, attr)
        problem = _origin_problem(self.policy, value, owner.__module__, attr)
        if problem:
            raise UnsafePickleError(f"{self.context}: refusing {where}: {problem}")
        if owner_tier == _USER or isinstance(value, (type, obj)):
            return value  # (obj is a class from here on)
        qualname = f"{obj.__qualname__}.{attr}"
        listed = (owner.__module__, qualname) in _RECONSTRUCTOR_METHODS | self.policy.exact
        if listed and getattr(value, "__self__", None) is obj:
            return value
        raise UnsafePickleError(
            f"{self.context}: refusing {where}: only classes, members and the class methods pickles "
            f"are rebuilt with are looked up on default-module classes (allow '{owner.__module__}:{qualname}' "
            "if this pickle is trusted)"
        )

    def _guarded_ufunc(self, module: Any, name: Any) -> Any:
        """numpy's ``_ufunc_reconstruct``, limited to ufuncs of allowed modules."""
        where = f"_ufunc_reconstruct({module!r}, {name!r})"
        if not (isinstance(module, str) and isinstance(name, str)) or self.policy.tier(module) not in (_DEFAULT, _USER) or _is_dunder(name):
            raise UnsafePickleError(f"{self.context}: refusing {where}: only ufuncs of allowed modules are rebuilt")
        value = getattr(importlib.import_module(module), name)
        if not _is_ufunc(value):
            raise UnsafePickleError(f"{self.context}: refusing {where}: {module}.{name} is not a ufunc")
        return value


def restricted_loads(data: bytes, allowed_modules: Iterable[str] = (), context: str = "pickle") -> Any:
    """Unpickle ``data`` through :class:`RestrictedUnpickler`.

    ``allowed_modules``: extra module prefixes or ``"module:qualname"`` globals;
    ``context`` names what is decoded (e.g. ``"task 65f... res"``) for error messages.
    """
    return RestrictedUnpickler(io.BytesIO(data), allowed_modules, context).load()


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` the way Qlib stores ``def``/``res`` (highest protocol)."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


# ---------------------------------------------------------------------------- Serializable

#: objects whose ``config(recursive=True)`` is under way in this context (the loop guard)
_CONFIGURING: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar("qcelery_serial_configuring", default=None)

_CONFIG_KEYS = ("dump_all", "exclude", "include")


def _attr_names(value: Any, option: str) -> list[str] | None:
    """``include``/``exclude`` as a list of names (``None`` stays ``None``: use the class list)."""
    if value is None:
        return None
    problem = f"Serializable.config({option}=...) takes a list of attribute names, got {value!r}"
    if isinstance(value, (str, bytes)):
        # a string would match by substring ("a" in "_data"): refuse it rather than guess
        raise TaskTypeError(f"{problem} (write {option}=[{value!r}] for one name)")
    try:
        names = list(value)
    except TypeError:
        raise TaskTypeError(problem) from None
    if not all(isinstance(n, str) for n in names):
        raise TaskTypeError(problem)
    return names


class Serializable:
    """Qlib's ``Serializable``: pickling that keeps some attributes and drops others.

    Whether ``__getstate__`` keeps an attribute, first matching rule wins:

    1. named in ``config_attr`` (``_include``, ``_exclude``): dropped;
    2. named in the include list: kept;
    3. named in the exclude list: dropped;
    4. name not starting with ``_``: kept;
    5. name starting with ``_``: kept only when ``dump_all`` is true.

    The include/exclude lists are those set with :meth:`config` on the object, else
    the class attributes ``include_attr``/``exclude_attr``. So an attribute both
    included and excluded is kept, and ``include`` rescues a ``_private`` one.

    Differences from Qlib:

    * the class ``exclude_attr`` applies whenever no exclude list was configured on the
      object (Qlib's ``__init__`` sets ``_exclude = None``, which silently disables
      ``exclude_attr`` until the object has been through a pickle round trip);
    * ``dump_all`` of an object that never ran ``__init__`` is the class's ``default_dump_all``;
    * ``config(recursive=True)`` visits each reachable ``Serializable`` attribute once,
      guarded by a context variable instead of a flag written into ``__dict__`` (a
      cycle or a shared child is configured once, and nothing leaks into a pickle if a
      child's ``config`` raises); unknown options raise :class:`SerializableConfigError`
      (a ``KeyError``), a string given as ``include``/``exclude`` a ``TypeError``;
    * :meth:`load` can decode through the restricted unpickler (``trusted=False``);
    * pickles are written with the highest protocol.
    """

    #: "pickle" or "dill" (dill can pickle lambdas and local functions); chooses the
    #: module :meth:`to_pickle` and :meth:`load` use
    pickle_backend = "pickle"
    #: ``dump_all`` of a new object
    default_dump_all = False
    #: attributes that hold the configuration itself; never pickled
    config_attr: tuple[str, ...] | list[str] = ("_include", "_exclude")
    #: dropped when pickling, unless the object was configured with its own ``exclude``
    exclude_attr: tuple[str, ...] | list[str] = ()
    #: kept when pickling (even ``_private`` ones), unless configured with its own ``include``
    include_attr: tuple[str, ...] | list[str] = ()

    def __init__(self) -> None:
        self._dump_all = self.default_dump_all

    # ------------------------------------------------------------ what is kept
    @property
    def dump_all(self) -> bool:
        """Whether attributes starting with ``_`` are pickled too."""
        return bool(self.__dict__.get("_dump_all", type(self).default_dump_all))

    def _attr_list(self, kind: str) -> Iterable[str]:
        configured: Iterable[str] | None = self.__dict__.get(f"_{kind}")
        if configured is not None:
            return configured
        return getattr(type(self), f"{kind}_attr", None) or ()

    def _is_kept(self, key: str) -> bool:
        if key in self.config_attr:
            return False
        if key in self._attr_list("include"):
            return True
        if key in self._attr_list("exclude"):
            return False
        return self.dump_all or not key.startswith("_")

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if self._is_kept(k)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------ configuration
    def config(self, recursive: bool = False, **kwargs: Any) -> None:
        """Set what pickling keeps: ``dump_all`` (bool), ``exclude`` and ``include``
        (lists of attribute names, ``None`` to fall back to the class lists).

        With ``recursive=True`` the same options go to every ``Serializable`` held
        directly in an attribute, and on down; each object is configured once, so
        cycles end. As in Qlib, objects inside lists or dicts are not visited.
        """
        unknown = sorted(set(kwargs) - set(_CONFIG_KEYS))
        if unknown:
            raise SerializableConfigError(
                f"{type(self).__qualname__}.config got unknown option(s) {unknown}; the options are {list(_CONFIG_KEYS)}"
            )
        for key, value in kwargs.items():
            if key == "dump_all":
                if not isinstance(value, bool):
                    raise TaskTypeError(f"Serializable.config(dump_all=...) takes a bool, got {value!r}")
            else:
                value = _attr_names(value, key)
            setattr(self, f"_{key}", value)
        if not recursive:
            return
        seen = _CONFIGURING.get()
        token = None
        if seen is None:  # the outermost call of this recursion
            seen = set()
            token = _CONFIGURING.set(seen)
        seen.add(id(self))
        try:
            for value in list(self.__dict__.values()):
                if isinstance(value, Serializable) and id(value) not in seen:
                    value.config(recursive=True, **kwargs)
        finally:
            if token is not None:
                _CONFIGURING.reset(token)

    # ------------------------------------------------------------ files
    @classmethod
    def get_backend(cls) -> types.ModuleType:
        """The module named by ``pickle_backend``: :mod:`pickle` or :mod:`dill`."""
        if cls.pickle_backend == "pickle":
            return pickle
        if cls.pickle_backend == "dill":
            return importlib.import_module("dill")  # optional: imported only when asked for
        raise ConfigError(f"{cls.__qualname__}.pickle_backend is {cls.pickle_backend!r}; it must be 'pickle' or 'dill'")

    def to_pickle(self, path: Path | str, **kwargs: Any) -> None:
        """Pickle this object to ``path`` with its class's backend.

        ``kwargs`` (``dump_all``, ``exclude``, ``include``) go to :meth:`config` first
        and stay configured on the object, as in Qlib.
        """
        self.config(**kwargs)
        with Path(path).open("wb") as f:
            self.get_backend().dump(self, f, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def load(cls, filepath: Path | str, *, trusted: bool = True, allowed_modules: Iterable[str] = ()) -> Any:
        """Load an instance of ``cls`` (or of a subclass) pickled at ``filepath``.

        ``trusted=True`` (the default, as in Qlib) unpickles with the class's backend:
        a hostile file runs code. ``trusted=False`` goes through
        :class:`RestrictedUnpickler` whatever the backend, allowing the default modules,
        ``allowed_modules`` and ``cls`` itself; a pickle needing anything else (another
        class of your package, dill's function rebuilders) raises
        :class:`~qcelery.errors.UnsafePickleError` naming the global to allow.
        Raises :class:`~qcelery.errors.TaskTypeError` (a ``TypeError``) when the file
        holds something else than a ``cls``.
        """
        path = Path(filepath)
        if trusted:
            with path.open("rb") as f:
                obj = cls.get_backend().load(f)
        else:
            if isinstance(allowed_modules, str):
                _Policy.build(allowed_modules)  # raises: a lone string is refused, not split into letters
            allowed = [*allowed_modules, f"{cls.__module__}:{cls.__qualname__}"]
            obj = restricted_loads(path.read_bytes(), allowed, context=f"{cls.__qualname__}.load({str(path)!r})")
        if not isinstance(obj, cls):
            raise TaskTypeError(
                f"{path} holds a {type(obj).__module__}.{type(obj).__qualname__}, not a {cls.__qualname__}; "
                f"load it with its own class (or Serializable.load to accept any Serializable)"
            )
        return obj

    @staticmethod
    def general_dump(obj: Any, path: Path | str) -> None:
        """Pickle any object to ``path``: a ``Serializable`` through its
        :meth:`to_pickle` (so its keep/drop rules and backend apply), anything else
        with :mod:`pickle`."""
        if isinstance(obj, Serializable):
            obj.to_pickle(path)
            return
        with Path(path).open("wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
