"""``PITStore``: a folder of PIT files, as Qlib's provider lays them out.

``<root>/financial/<instrument lower-case>/<field>.data`` and ``.index``, the format
of :mod:`qcelery.pit.fileformat`. A Qlib ``provider_uri`` can be used as ``root``
directly, and Qlib reads what :meth:`PITStore.write` writes.

Different from Qlib:

* :meth:`PITStore.P` and :meth:`PITStore.PRef` answer every observation day in one
  vectorised pass (see :mod:`qcelery.pit.operators`); Qlib re-reads the files for
  each day;
* writing is a method of the store, not a separate script; a second write appends
  (see :meth:`PITStore.write` for what happens with late-arriving older statements,
  which Qlib's ``dump_pit`` drops);
* files are checked when read and cached per process until they change on disk.

About appending with Qlib: ``dump_pit``'s update mode (``overwrite=False`` on an
existing folder) in Qlib 0.9.7 writes the new records over the *start* of the
``.data`` file (it opens it ``rb+`` and never seeks to the end), and skips (with a
warning) a batch whose periods all fall in years the index already covers. Files damaged that
way are reported by :meth:`PITStore.load` instead of read; re-dump with
``overwrite=True`` or append with :meth:`PITStore.write`, whose result is the file
``dump_pit`` writes from all statements at once.

Not safe for two processes writing the same field at the same time (neither is
``dump_pit``); any number of readers is fine, since files are replaced by rename.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import PITDataNotFoundError, PITFormatError, PITQueryError
from .expr import PITCall, p_call, pref_call
from .fileformat import PITFile, decode, encode, write_pair
from .operators import on_days, p_by_prefix, pref_by_prefix
from .periods import (
    Field,
    check_period,
    date_ints,
    describe_period_rule,
    observation_days,
    parse_field,
    period_ordinals,
    plain_value,
)

log = logging.getLogger(__name__)

FINANCIAL_DIR = "financial"
DATA_SUFFIX = ".data"
INDEX_SUFFIX = ".index"

# Names Windows reserves for devices; Qlib's reader prefixes them (``code_to_fname``).
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


def instrument_dir_name(instrument: Any) -> str:
    """The folder name of an instrument, as Qlib's PIT reader derives it."""
    if not isinstance(instrument, str) or not instrument.strip():
        raise PITQueryError(f"instrument {instrument!r} must be a non-empty string such as 'SH600519'")
    code = instrument.strip()
    if any(sep in code for sep in ("/", "\\", "\0")) or code in (".", ".."):
        raise PITQueryError(f"instrument {instrument!r} cannot name a folder (contains a path separator)")
    if code.upper() in _RESERVED:
        code = "_qlib_" + code
    return code.lower()


class PITStore:
    """Point-in-time statements under ``root`` and the ``P``/``PRef`` operators over them.

    ``cache_size`` bounds how many parsed (instrument, field) files stay in memory;
    a cached file is re-read as soon as its size, inode or modification time change.
    """

    def __init__(self, root: str | os.PathLike[str], cache_size: int = 4096) -> None:
        self.root = Path(root)
        self._cache: OrderedDict[tuple[str, str], tuple[tuple[int, ...], PITFile]] = OrderedDict()
        self._cache_size = cache_size

    def __repr__(self) -> str:
        return f"PITStore({str(self.root)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled (e.g. inside a task definition) as its folder, without the parsed-file cache
        return (PITStore, (str(self.root), self._cache_size))

    # -- files -----------------------------------------------------------------

    def paths(self, instrument: str, field: str | Field) -> tuple[Path, Path]:
        """The ``.data`` and ``.index`` paths of one instrument and field."""
        f = field if isinstance(field, Field) else parse_field(field)
        folder = self.root / FINANCIAL_DIR / instrument_dir_name(instrument)
        return folder / (f.name + DATA_SUFFIX), folder / (f.name + INDEX_SUFFIX)

    def exists(self, instrument: str, field: str | Field) -> bool:
        data_path, index_path = self.paths(instrument, field)
        return data_path.exists() and index_path.exists()

    def instruments(self) -> list[str]:
        """Folder names of the instruments that have any PIT file (lower-case)."""
        base = self.root / FINANCIAL_DIR
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def fields(self, instrument: str) -> list[str]:
        """The fields stored for one instrument (those with both files)."""
        folder = self.root / FINANCIAL_DIR / instrument_dir_name(instrument)
        if not folder.is_dir():
            return []
        stems = {p.name[: -len(DATA_SUFFIX)] for p in folder.glob("*" + DATA_SUFFIX)}
        return sorted(s for s in stems if (folder / (s + INDEX_SUFFIX)).exists())

    def load(self, instrument: str, field: str | Field) -> PITFile:
        """The checked content of one file pair (cached until the files change)."""
        f = field if isinstance(field, Field) else parse_field(field)
        data_path, index_path = self.paths(instrument, f)
        try:
            signature = tuple(x for st in (data_path.stat(), index_path.stat()) for x in (st.st_ino, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            self._raise_missing(instrument, f, data_path, index_path)
        key = (str(data_path.parent), f.name)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == signature:
            self._cache.move_to_end(key)
            return hit[1]
        pit = decode(data_path.read_bytes(), index_path.read_bytes(), f, data_path, index_path)
        self._cache[key] = (signature, pit)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return pit

    def _raise_missing(self, instrument: str, f: Field, data_path: Path, index_path: Path) -> None:
        have = [p for p in (data_path, index_path) if p.exists()]
        if have:
            missing = index_path if have[0] == data_path else data_path
            raise PITFormatError(f"{missing} is missing beside {have[0]}; rewrite the field with PITStore.write(..., overwrite=True)")
        raise PITDataNotFoundError(
            f"no PIT data for instrument {instrument!r}, field {f.name!r}: {data_path} does not exist; "
            f"write it with PITStore.write or Qlib's dump_pit"
        )

    def read(self, instrument: str, field: str | Field) -> pd.DataFrame:
        """The statements in file order: ``date`` (datetime64), ``period``, ``value``.

        Use :meth:`load` for the raw records, including each ``_next`` link.
        """
        pit = self.load(instrument, field)
        dates = pd.to_datetime(pit.dates.astype(str), format="%Y%m%d") if len(pit) else pd.DatetimeIndex([])
        return pd.DataFrame({"date": dates, "period": pit.records["period"].astype(np.int64), "value": pit.values})

    def write(self, instrument: str, field: str | Field, statements: pd.DataFrame, overwrite: bool = False) -> int:
        """Store statements (columns ``date``, ``period``, ``value``); return how many were new.

        ``date`` is the publication day (datetimes, ISO strings or ``YYYYMMDD``
        integers); other columns are ignored. The first write creates both files,
        byte for byte as Qlib's ``dump_pit`` would from the same rows (except that
        ``dump_pit`` rounds values to float32 first). Statements with equal dates keep
        their order in ``statements``.

        A later write appends: the new records go at the end and the last revision
        of each period they revise is linked to them (what ``dump_pit``'s update mode
        intends; see the module doc for what Qlib 0.9.7's does), and the index grows
        (also backwards) to cover new periods. Rows equal
        to a stored record (same date, period and value) are taken as already stored
        and skipped, so writing the same table twice changes nothing. Unlike ``dump_pit``, which drops statements
        dated before the last stored one, such statements are merged into date order
        (after the stored ones of the same day); the file is then rewritten and byte
        offsets of later records move.

        ``overwrite=True`` replaces whatever is stored (also a damaged pair).
        """
        f = field if isinstance(field, Field) else parse_field(field)
        data_path, index_path = self.paths(instrument, f)
        dates, periods, values = _statement_arrays(statements, f)
        on_disk = data_path.exists() or index_path.exists()
        existing = self.load(instrument, f) if on_disk and not overwrite else None

        fresh = _not_yet_stored(dates, periods, values, existing)
        order = np.argsort(dates[fresh], kind="stable")
        dates, periods, values = dates[fresh][order], periods[fresh][order], values[fresh][order]
        if not len(dates):
            log.debug("PIT write %s/%s: nothing new", instrument, f.name)
            return 0

        first_year, min_entries = None, 0
        if existing is not None:
            per_year = f.periods_per_year
            new_first = int(period_ordinals(periods, f)[0].min()) // per_year
            first_year = min(existing.first_year, new_first)
            min_entries = len(existing.index) + (existing.first_year - first_year) * per_year
            old = existing.records
            if len(old) and dates[0] < old["date"][-1]:
                log.info(
                    "PIT write %s/%s: %d statement(s) dated before the last stored one (%d); rewriting in date order",
                    instrument,
                    f.name,
                    int((dates < old["date"][-1]).sum()),
                    int(old["date"][-1]),
                )
            dates = np.concatenate([old["date"].astype(np.int64), dates])
            periods = np.concatenate([old["period"].astype(np.int64), periods])
            values = np.concatenate([old["value"], values])
            order = np.argsort(dates, kind="stable")  # identity when every new date is >= the last stored
            dates, periods, values = dates[order], periods[order], values[order]
        data, index = encode(dates, periods, values, f, first_year, min_entries)
        write_pair(data_path, index_path, data, index)
        return int(fresh.sum())

    # -- operators ---------------------------------------------------------------

    def P(self, instrument: str, field: str, days: Any, window: int = 1, how: str = "last", offset: int = 0) -> pd.Series:
        """Qlib's ``P`` on every day of ``days`` (e.g. the trading calendar).

        ``window=1`` (``P($$f)``): on day t, the latest period published on or before
        t, in its latest revision published on or before t. ``window=k`` with
        ``how="mean"``/``"sum"`` (``P(Mean($$f, k))``): the k periods ending at that
        latest period, each as known on t; unpublished periods are skipped.
        ``offset=o`` (``P(Ref($$f, o))``) ends the window o periods earlier.
        Returns float64 (Qlib: float32), NaN before the first publication.
        """
        return self.evaluate(instrument, p_call(field, window=window, how=how, offset=offset), days)

    def PRef(self, instrument: str, field: str, period: int, days: Any) -> pd.Series:
        """Qlib's ``PRef``: on each day, ``period``'s value as known then (NaN before its first publication)."""
        return self.evaluate(instrument, pref_call(field, period), days)

    def evaluate(self, instrument: str, call: PITCall, days: Any) -> pd.Series:
        """One :class:`~qcelery.pit.expr.PITCall` over ``days``, as a Series named like Qlib's column."""
        index, day_ints = observation_days(days)
        values = evaluate_on_days(self.load(instrument, call.field), call, day_ints)
        return pd.Series(values, index=index, name=str(call))


def evaluate_on_days(pit: PITFile, call: PITCall, day_ints: np.ndarray) -> np.ndarray:
    """Values of ``call`` over days given as ``YYYYMMDD`` integers."""
    if call.op == "PRef":
        by_prefix = pref_by_prefix(pit, check_period(call.period, call.field))
    else:
        by_prefix = p_by_prefix(pit, call.window, call.how, call.offset)
    return on_days(pit, by_prefix, day_ints)


def _statement_arrays(statements: Any, f: Field) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``date`` (YYYYMMDD), ``period`` and ``value`` arrays of a statement table."""
    if not isinstance(statements, pd.DataFrame):
        raise PITQueryError(f"statements must be a pandas DataFrame with columns date, period, value, not {type(statements).__name__}")
    missing = [c for c in ("date", "period", "value") if c not in statements.columns]
    if missing:
        raise PITQueryError(f"statements lack column(s) {missing}; they need date (publication day), period and value")
    dates = date_ints(statements["date"].to_numpy(), "statements['date']")
    try:
        raw_periods = pd.to_numeric(statements["period"]).to_numpy(dtype=np.float64)
        values = pd.to_numeric(statements["value"]).to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise PITQueryError(f"statements: period and value must be numbers ({exc})") from exc
    not_int = ~np.isfinite(raw_periods) | (raw_periods != np.round(raw_periods))
    periods = np.where(not_int, 0, raw_periods).astype(np.int64)
    _, valid = period_ordinals(periods, f)
    bad = np.flatnonzero(not_int | ~valid)
    if len(bad):
        i = int(bad[0])
        raise PITQueryError(
            f"statements: period {plain_value(statements['period'].iloc[i])!r} (row {i}) does not exist; {describe_period_rule(f)}"
        )
    return dates, periods, values


def _not_yet_stored(dates: np.ndarray, periods: np.ndarray, values: np.ndarray, existing: PITFile | None) -> np.ndarray:
    """Mask of the rows not already stored.

    Repeats *within* one batch are kept: with several same-day statements of a period
    their order decides which is the revision known that day, and dropping a repeat
    could change it.
    """
    if existing is None or not len(existing):
        return np.ones(len(dates), dtype=bool)
    old = existing.records
    stored = set(zip(old["date"].tolist(), old["period"].tolist(), _bits(old["value"]).tolist(), strict=True))
    keys = zip(dates.tolist(), periods.tolist(), _bits(values).tolist(), strict=True)
    return np.fromiter((key not in stored for key in keys), dtype=bool, count=len(dates))


def _bits(values: np.ndarray) -> np.ndarray:
    """The float64 values as integers, so that NaN equals NaN when comparing statements."""
    return np.ascontiguousarray(values, dtype=np.float64).view(np.int64)
