"""Qlib's ``P`` and ``PRef`` computed for every observation day at once.

Qlib evaluates ``P(expr)`` one day at a time: it reads the ``.data`` file, finds the
records published on or before the day, takes the latest period among them, reads
each needed period's revision chain again from disk, and evaluates ``expr`` on that
short period series. Here the same answers come from the record order alone:

* the state of knowledge only changes when a record is published, so there is one
  answer per *prefix* of the file (records ``0..j``), and a day's answer is the
  answer of the prefix published by then (one ``searchsorted`` over all days);
* for prefix ``j`` the latest period is ``maximum.accumulate(ordinals)[j]`` and the
  value of period ``q`` as known then is its last revision among records ``0..j``,
  looked up for all (q, j) pairs together in the records sorted by (period, position).

Semantics kept from Qlib (``LocalPITProvider.period_feature`` with ``Rolling``
operators inside ``P``):

* ``P(f)``: the latest period published by day t, in its latest revision by t;
* ``P(Mean(f, k))`` / ``P(Sum(f, k))``: the k consecutive periods ending at that
  latest period, each in its revision known on t; periods not (yet) published are
  skipped, as pandas' ``rolling(k, min_periods=1)`` does; NaN only if none is known;
* ``P(Ref(f, o))`` (``offset=o``): the window ends ``o`` periods before the latest;
  a negative ``o`` is a future reference and is refused, as in Qlib;
* ``PRef(f, period)``: that period's latest revision published by t, NaN before.

Different from Qlib: results are float64 (Qlib's ``P`` returns float32), and an
unknown ``how``, ``window < 1`` (Qlib's expanding ``N=0``) or a bad period raise
:class:`~qcelery.pit.errors.PITQueryError` instead of computing something else.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import PITQueryError
from .fileformat import PITFile

HOWS = ("last", "mean", "sum")


def check_window(window: Any, how: Any, offset: Any) -> tuple[int, str, int]:
    """Validate the window arguments of ``P``."""
    for name, value in (("window", window), ("offset", offset)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise PITQueryError(f"P: {name}={value!r} must be an integer number of periods")
    if how not in HOWS:
        raise PITQueryError(f"P: how={how!r} is not one of {', '.join(map(repr, HOWS))}")
    if window < 1:
        raise PITQueryError(f"P: window={window} must be at least 1 period (Qlib's expanding window N=0 is not supported)")
    if how == "last" and window != 1:
        raise PITQueryError(f"P: window={window} needs how='mean' or how='sum' (how='last' reads one period)")
    if offset < 0:
        raise PITQueryError(
            f"P: offset={offset} refers to a future period (like Qlib's Ref($$field, {offset})); "
            f"the PIT operators only look back: use offset >= 0"
        )
    return int(window), str(how), int(offset)


def values_known(pit: PITFile, ordinals: np.ndarray, prefix: np.ndarray) -> np.ndarray:
    """Value of period ``ordinals[i]`` in its last revision among records ``0..prefix[i]``."""
    n = len(pit)
    if n == 0:
        return np.full(np.shape(ordinals), np.nan)
    pos = np.searchsorted(pit.revision_keys, ordinals * n + prefix, side="right") - 1
    record = pit.revision_order[np.maximum(pos, 0)]
    found = (pos >= 0) & (pit.ordinals[record] == ordinals)
    return np.where(found, pit.values[record], np.nan)


def p_by_prefix(pit: PITFile, window: int, how: str, offset: int) -> np.ndarray:
    """Answer of ``P`` once records ``0..j`` are published, for every j."""
    n = len(pit)
    if n == 0:
        return np.empty(0, dtype=np.float64)
    latest = np.maximum.accumulate(pit.ordinals)
    wanted = latest[:, None] - offset - np.arange(window)[None, :]
    prefix = np.broadcast_to(np.arange(n)[:, None], wanted.shape)
    known = values_known(pit, wanted, prefix)
    if how == "last":
        return known[:, 0]
    present = ~np.isnan(known)
    count = present.sum(axis=1)
    total = np.where(present, known, 0.0).sum(axis=1)
    if how == "mean":
        total = total / np.maximum(count, 1)
    return np.where(count > 0, total, np.nan)


def pref_by_prefix(pit: PITFile, ordinal: int) -> np.ndarray:
    """Answer of ``PRef`` for one period once records ``0..j`` are published."""
    n = len(pit)
    return values_known(pit, np.full(n, ordinal, dtype=np.int64), np.arange(n))


def on_days(pit: PITFile, by_prefix: np.ndarray, day_ints: np.ndarray) -> np.ndarray:
    """Spread per-prefix answers over observation days (``YYYYMMDD`` integers)."""
    published = np.searchsorted(pit.dates, day_ints, side="right") - 1
    out = np.full(len(day_ints), np.nan)
    seen = published >= 0
    out[seen] = by_prefix[published[seen]]
    return out
