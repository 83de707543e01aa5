"""Deterministic, BSON-safe form of a task filter and its hash.

Qlib stores the task definition itself as ``filter`` and falls back to ``str()`` of
the top-level values when a definition is not valid BSON, which makes nested keys
unqueryable. qcelery instead normalises every value recursively, the same way on
every machine, so ``{"filter.model.class": "LinearModel"}`` always works and two
producers compute the same hash for the same task.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import hashlib
import json
import math
from pathlib import PurePath
from typing import Any, Mapping

import numpy as np
import pandas as pd
from bson import ObjectId


def _iso(value: _dt.datetime | _dt.date | pd.Timestamp) -> str:
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None and value.time() == _dt.time(0):
            return value.date().isoformat()
        return value.isoformat()
    return value.isoformat()


def normalize(value: Any) -> Any:
    """Return a JSON- and BSON-safe copy of ``value``.

    tuples and sets become lists (sets sorted), dates and timestamps ISO strings
    (a midnight timestamp is just its day, so ``"2020-01-02"``, ``date(2020, 1, 2)``
    and ``pd.Timestamp("2020-01-02")`` are one filter), numpy scalars and arrays
    Python numbers and lists, classes and functions their dotted path, dict keys strings.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else repr(f)
    if isinstance(value, (pd.Timestamp, _dt.datetime, _dt.date)):
        if value is pd.NaT:
            return None
        return _iso(value)
    if isinstance(value, (np.datetime64,)):
        return _iso(pd.Timestamp(value))
    if isinstance(value, Mapping):
        return {str(k): normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [normalize(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, np.ndarray):
        return [normalize(v) for v in value.tolist()]
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, enum.Enum):
        return normalize(value.value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, type) or callable(value):
        module = getattr(value, "__module__", None) or ""
        name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or repr(value)
        return f"{module}.{name}" if module else name
    return repr(value)


def filter_hash(filt: Any) -> str:
    """SHA-256 of the canonical JSON of an already normalised filter (key order ignored)."""
    text = json.dumps(filt, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
