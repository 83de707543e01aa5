"""Deterministic, BSON-safe form of a task filter and its hash.

Qlib stores the task definition itself as ``filter`` and falls back to ``str()`` of
the top-level values when a definition is not valid BSON, which makes nested keys
unqueryable. qcelery instead normalises every value recursively, the same way on
every machine, so ``{"filter.model.class": "LinearModel"}`` always works and two
producers compute the same hash for the same task.

pandas and numpy are not imported here (they are most of a CLI command's start-up):
a value can only be a pandas or numpy object if its module is already loaded, so
the checks look the modules up in ``sys.modules`` when a value needs them.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import hashlib
import json
import math
import pickle
import re
import sys
import types
from collections.abc import Mapping
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from bson import ObjectId

from .errors import TaskDefinitionError

if TYPE_CHECKING:
    import pandas as pd

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# "<function f at 0x7f...>": the address differs in every process
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PLAIN_CALLABLES = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
# the same few dates recur in thousands of rolling tasks; isoformat is the slow part
_ISO_CACHE: dict[pd.Timestamp, str] = {}


def _iso(value: _dt.datetime | _dt.date | pd.Timestamp) -> str:
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None and value.time() == _dt.time(0):
            return value.date().isoformat()
        return value.isoformat()
    return value.isoformat()


def _dotted(value: Any) -> str:
    module = getattr(value, "__module__", None) or ""
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or repr(value)
    return f"{module}.{name}" if module else name


def _key(key: Any) -> str:
    return str(key).replace("\x00", "\\x00")  # BSON keys are NUL-terminated


def _by_content(value: Any) -> str:
    """``module.Class#sha256:...`` of the pickled object: an identity that holds across
    processes, for objects whose repr carries a memory address or leaves data out."""
    try:
        data = pickle.dumps(value, protocol=4)
    except Exception:  # noqa: BLE001 - not picklable: the definition itself will be refused
        return _ADDRESS.sub("", repr(value))
    return f"{_dotted(type(value))}#sha256:{hashlib.sha256(data).hexdigest()}"


def _normalize(value: Any) -> Any:
    # exact-type fast paths first: task definitions are mostly dicts, lists, strings,
    # numbers and timestamps, and abc/typing isinstance checks are slow
    t = type(value)
    if t is str or t is bool or value is None:
        return value
    if t is dict:
        return _normalize_mapping(value)
    if t is list or t is tuple:
        return [_normalize(v) for v in value]
    if t is int:
        return value if _INT64_MIN <= value <= _INT64_MAX else str(value)  # BSON stops at 64 bits
    if t is float:
        return value if math.isfinite(value) else repr(value)
    pd = sys.modules.get("pandas")
    if pd is not None and t is pd.Timestamp:
        iso = _ISO_CACHE.get(value)
        if iso is None:
            if value is pd.NaT:
                return None
            if len(_ISO_CACHE) > 4096:
                _ISO_CACHE.clear()
            iso = _ISO_CACHE[value] = _iso(value)
        return iso
    return _normalize_other(value)


def _normalize_mapping(value: Mapping) -> dict:
    out = {(k if type(k) is str and "\x00" not in k else _key(k)): _normalize(v) for k, v in value.items()}
    if len(out) < len(value):  # e.g. 1 and "1": keep both, tagging the non-strings
        out = {(_key(k) if isinstance(k, str) else f"{type(k).__name__}:{k!r}"): _normalize(v) for k, v in value.items()}
    return out


def _normalize_other(value: Any) -> Any:
    np = sys.modules.get("numpy")  # None: value is no numpy object
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, int) or (np is not None and isinstance(value, np.integer)):
        n = int(value)  # bool returned above; numpy's bool_ is not an np.integer
        return n if _INT64_MIN <= n <= _INT64_MAX else str(n)  # BSON stops at 64 bits
    if np is not None and isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, float) or (np is not None and isinstance(value, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else repr(f)
    if isinstance(value, _dt.date) or (np is not None and isinstance(value, np.datetime64)):
        if not isinstance(value, _dt.date):  # numpy's datetime64, read as pandas reads it
            import pandas

            value = pandas.Timestamp(value)
        pd = sys.modules.get("pandas")
        if pd is not None and value is pd.NaT:  # NaT is a datetime too
            return None
        return _iso(value)
    if isinstance(value, Mapping):
        return _normalize_mapping(value)
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [_normalize(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if np is not None and isinstance(value, np.ndarray):
        return [_normalize(v) for v in value.tolist()]
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, enum.Enum):
        return _normalize(value.value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, PurePath):
        return str(value)
    if (
        isinstance(value, _PLAIN_CALLABLES)
        or (np is not None and isinstance(value, np.ufunc))
        or (callable(value) and isinstance(getattr(value, "__qualname__", None), str))
    ):
        return _dotted(value)  # functions, classes, numpy's dispatchers; not partials or instances
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(value, (pd.Series, pd.DataFrame, pd.Index)):
        return _by_content(value)  # their repr truncates long data
    text = repr(value)
    return _by_content(value) if _ADDRESS.search(text) else text


def normalize(value: Any) -> Any:
    """Return a JSON- and BSON-safe copy of ``value``, the same in every process.

    tuples and sets become lists (sets sorted), dates and timestamps ISO strings
    (a midnight timestamp is just its day, so ``"2020-01-02"``, ``date(2020, 1, 2)``
    and ``pd.Timestamp("2020-01-02")`` are one filter), numpy scalars and arrays
    Python numbers and lists (integers beyond 64 bits strings), classes and functions
    their dotted path, dict keys strings. Other objects become their repr, unless it
    holds a memory address or truncates data (pandas objects, plain instances,
    ``functools.partial``): those are named by class and a digest of their pickle.
    """
    try:
        return _normalize(value)
    except RecursionError:
        raise TaskDefinitionError(
            "task definition is nested too deeply or contains a reference cycle; task definitions must be trees"
        ) from None


def canonical_json(filt: Any) -> str:
    """The canonical JSON text of an already normalised filter (keys sorted, no spaces)."""
    return json.dumps(filt, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def hash_text(text: str) -> str:
    """SHA-256 (hex) of a canonical JSON text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def filter_hash(filt: Any) -> str:
    """SHA-256 of the canonical JSON of an already normalised filter (key order ignored)."""
    return hash_text(canonical_json(filt))
