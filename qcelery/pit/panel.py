"""PIT columns for a daily (datetime, instrument) panel, as a data handler needs them.

``pit_panel(store, instruments, days, spec)`` evaluates every call of ``spec`` (column
name -> call, in the string or tuple form of :mod:`qcelery.pit.expr`) for every
instrument over every day, and returns one DataFrame indexed like Qlib's handler
data, ``(datetime, instrument)``, ready to be joined onto the price panel::

    pit_panel(store, ["SH600000", "SH600519"], calendar_days, {
        "roe": "P($$roewa_q)",
        "roe_4q": ("P", "roewa_q", {"window": 4, "how": "mean"}),
        "roe_2019q4": ("PRef", "roewa_q", 201904),
    })

Each value on day t was published on or before t, whatever the spec: that is what
makes the columns safe in rolling backtests. Like Qlib, an instrument with no file for
a field gets NaN in that column (one warning lists them); ``missing="raise"`` makes
it an error instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .errors import PITDataNotFoundError, PITQueryError
from .expr import PITCall, parse_call
from .periods import observation_days
from .store import PITStore, evaluate_on_days

log = logging.getLogger(__name__)


def parse_spec(spec: Mapping[str, Any]) -> dict[str, PITCall]:
    """Column name -> :class:`~qcelery.pit.expr.PITCall`, validated as a whole before any file is read."""
    if not isinstance(spec, Mapping) or not spec:
        raise PITQueryError(f"PIT spec must be a non-empty mapping of column name -> call, e.g. {{'roe': 'P($$roewa_q)'}}, got {spec!r}")
    calls = {}
    for name, entry in spec.items():
        if not isinstance(name, str) or not name:
            raise PITQueryError(f"PIT spec: column name {name!r} must be a non-empty string")
        calls[name] = parse_call(entry, name=f"PIT spec[{name!r}]")
    return calls


def pit_panel(
    store: PITStore | str | os.PathLike[str],
    instruments: Sequence[str],
    days: Any,
    spec: Mapping[str, Any],
    missing: str = "nan",
) -> pd.DataFrame:
    """Evaluate ``spec`` for ``instruments`` over ``days``; index ``(datetime, instrument)``.

    Rows are ordered by day then by instrument in the given order; columns follow
    ``spec``; values are float64.
    """
    if missing not in ("nan", "raise"):
        raise PITQueryError(f"pit_panel: missing={missing!r} must be 'nan' or 'raise'")
    if not isinstance(store, PITStore):
        store = PITStore(store)
    calls = parse_spec(spec)
    if isinstance(instruments, str) or not all(isinstance(i, str) and i for i in instruments):
        raise PITQueryError(f"pit_panel: instruments must be a list of instrument codes, got {instruments!r}")
    instruments = list(instruments)
    day_index, day_ints = observation_days(days)

    values = np.full((len(day_ints), len(instruments), len(calls)), np.nan)
    absent: list[str] = []
    for i, instrument in enumerate(instruments):
        for c, call in enumerate(calls.values()):
            try:
                pit = store.load(instrument, call.field)
            except PITDataNotFoundError:
                if missing == "raise":
                    raise
                absent.append(f"{instrument}/{call.field.name}")
                continue
            values[:, i, c] = evaluate_on_days(pit, call, day_ints)
    if absent:
        unique = sorted(set(absent))
        log.warning(
            "no PIT data under %s for %d instrument/field pair(s) (NaN columns): %s%s",
            store.root,
            len(unique),
            ", ".join(unique[:10]),
            " ..." if len(unique) > 10 else "",
        )
    index = pd.MultiIndex.from_product([day_index, instruments], names=["datetime", "instrument"])
    return pd.DataFrame(values.reshape(-1, len(calls)), index=index, columns=list(calls))
