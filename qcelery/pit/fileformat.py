"""The PIT file pair, byte for byte as Qlib's ``scripts/dump_pit.py`` writes it.

``<field>.data`` is a run of 20-byte records in native byte order (struct ``IIdI``):
``date`` (uint32 ``YYYYMMDD``, publication day), ``period`` (uint32), ``value``
(float64) and ``_next`` (uint32 byte offset of the next revision of the same period,
``0xFFFFFFFF`` for none), sorted by ``date``. ``<field>.index`` is a uint32 first
year followed by one uint32 per period from that year's first period on (4 per year
for ``_q`` fields, 1 for ``_a``): the byte offset of the period's first record, or
``0xFFFFFFFF``.

Different from Qlib: a pair is checked when read (sizes, days, periods, sort order,
every ``_next`` link and index entry against the record order) and a damaged file
raises :class:`~qcelery.pit.errors.PITFormatError` naming the byte offset; Qlib reads
whatever is there. Files are replaced atomically (write to a temporary file, then
rename) instead of patched in place.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np

from .errors import PITFormatError
from .periods import Field, period_from_ordinal, period_ordinals, valid_yyyymmdd

RECORD_DTYPE = np.dtype([("date", "=u4"), ("period", "=u4"), ("value", "=f8"), ("_next", "=u4")])
INDEX_DTYPE = np.dtype("=u4")
RECORD_SIZE = RECORD_DTYPE.itemsize  # 20, as struct.calcsize("IIdI")
NO_RECORD = 0xFFFFFFFF
_MAX_RECORDS = NO_RECORD // RECORD_SIZE

assert RECORD_SIZE == 20


@dataclass(frozen=True, eq=False)
class PITFile:
    """One field of one instrument: the checked content of a ``.data``/``.index`` pair.

    ``records`` is in file order; ``ordinals`` are the records' periods as ordinals
    (see :mod:`qcelery.pit.periods`). ``revision_keys``/``revision_order`` sort the
    records by (period, file position) so that "the latest revision of period q among
    the first j records" is one ``searchsorted`` for any number of (q, j) at once.
    """

    field: Field
    first_year: int
    index: np.ndarray
    records: np.ndarray
    dates: np.ndarray = dc_field(init=False)
    ordinals: np.ndarray = dc_field(init=False)
    values: np.ndarray = dc_field(init=False)
    revision_order: np.ndarray = dc_field(init=False)
    revision_keys: np.ndarray = dc_field(init=False)

    def __post_init__(self) -> None:
        ordinals, _ = period_ordinals(self.records["period"], self.field)
        order = np.argsort(ordinals, kind="stable")
        n = len(self.records)
        set_ = object.__setattr__  # frozen dataclass: derived arrays are computed once here
        set_(self, "dates", self.records["date"].astype(np.int64))
        set_(self, "ordinals", ordinals)
        set_(self, "values", self.records["value"].astype(np.float64))
        set_(self, "revision_order", order)
        set_(self, "revision_keys", ordinals[order] * max(n, 1) + order)

    def __len__(self) -> int:
        return len(self.records)


def encode(
    dates: np.ndarray,
    periods: np.ndarray,
    values: np.ndarray,
    field: Field,
    first_year: int | None = None,
    min_index_entries: int = 0,
) -> tuple[bytes, bytes]:
    """Bytes of the ``.data`` and ``.index`` files for records already in file order.

    ``first_year`` defaults to the year of the smallest period (as Qlib's dump);
    the index covers every period up to the largest one's year and is never shorter
    than ``min_index_entries`` (an existing index is extended, not shrunk).
    """
    n = len(dates)
    if n > _MAX_RECORDS:
        raise PITFormatError(f"{n} records do not fit a PIT .data file (uint32 byte offsets allow {_MAX_RECORDS})")
    ordinals, _ = period_ordinals(periods, field)
    per_year = field.periods_per_year
    if first_year is None:
        first_year = int(ordinals.min()) // per_year if n else 0
    base = first_year * per_year
    n_entries = max(min_index_entries, ((int(ordinals.max()) // per_year) - first_year + 1) * per_year if n else 0)

    records = np.empty(n, dtype=RECORD_DTYPE)
    records["date"] = dates
    records["period"] = periods
    records["value"] = values
    records["_next"] = NO_RECORD
    index = np.full(n_entries, NO_RECORD, dtype=INDEX_DTYPE)
    if n:
        order = np.argsort(ordinals, kind="stable")
        same_as_next = ordinals[order[1:]] == ordinals[order[:-1]]
        records["_next"][order[:-1][same_as_next]] = order[1:][same_as_next] * RECORD_SIZE
        group_start = np.ones(n, dtype=bool)
        group_start[1:] = ~same_as_next
        heads = order[group_start]
        index[ordinals[heads] - base] = heads * RECORD_SIZE
    header = np.array([first_year], dtype=INDEX_DTYPE)
    return records.tobytes(), header.tobytes() + index.tobytes()


def decode(data: bytes, index_bytes: bytes, field: Field, data_path: Path, index_path: Path) -> PITFile:
    """Parse and check a file pair; raise :class:`PITFormatError` on any inconsistency."""
    fix = "rewrite the field with PITStore.write(..., overwrite=True) or Qlib's dump_pit"
    if len(data) % RECORD_SIZE:
        raise PITFormatError(
            f"{data_path}: {len(data)} bytes is not a whole number of {RECORD_SIZE}-byte records "
            f"(truncated after record {len(data) // RECORD_SIZE}); {fix}"
        )
    if len(index_bytes) < INDEX_DTYPE.itemsize or len(index_bytes) % INDEX_DTYPE.itemsize:
        raise PITFormatError(f"{index_path}: {len(index_bytes)} bytes is not a first year plus whole uint32 entries (truncated); {fix}")
    raw_index = np.frombuffer(index_bytes, dtype=INDEX_DTYPE)
    first_year = int(raw_index[0])
    index = raw_index[1:]
    per_year = field.periods_per_year
    if len(index) % per_year:
        raise PITFormatError(
            f"{index_path}: {len(index)} index entries is not a whole number of years of "
            f"{per_year} {field.frequency} periods (truncated); {fix}"
        )
    if not 1000 <= first_year <= 9999:
        raise PITFormatError(f"{index_path}: first year {first_year} at byte 0 is not a year; {fix}")
    records = np.frombuffer(data, dtype=RECORD_DTYPE)

    def where(i: int) -> str:
        return f"{data_path}: record {i} (byte {i * RECORD_SIZE})"

    bad = np.flatnonzero(~valid_yyyymmdd(records["date"]))
    if len(bad):
        raise PITFormatError(f"{where(bad[0])}: date {records['date'][bad[0]]} is not a YYYYMMDD day; {fix}")
    unsorted = np.flatnonzero(np.diff(records["date"].astype(np.int64)) < 0)
    if len(unsorted):
        i = int(unsorted[0]) + 1
        raise PITFormatError(
            f"{where(i)}: date {records['date'][i]} is before the previous record's "
            f"{records['date'][i - 1]}; records must be sorted by publication date; {fix}"
        )
    ordinals, ok = period_ordinals(records["period"], field)
    bad = np.flatnonzero(~ok)
    if len(bad):
        raise PITFormatError(f"{where(bad[0])}: period {records['period'][bad[0]]} is not a {field.frequency} period; {fix}")
    base = first_year * per_year
    slot = ordinals - base
    bad = np.flatnonzero((slot < 0) | (slot >= len(index)))
    if len(bad):
        last = period_from_ordinal(base + len(index) - 1, field) if len(index) else None
        raise PITFormatError(
            f"{where(bad[0])}: period {records['period'][bad[0]]} is outside the index "
            f"{index_path} (periods {period_from_ordinal(base, field)} to {last}; truncated index?); {fix}"
        )
    # The links must be exactly those implied by the record order (what dump_pit writes).
    expected_data, expected_index = encode(records["date"], records["period"], records["value"], field, first_year, len(index))
    expected_next = np.frombuffer(expected_data, dtype=RECORD_DTYPE)["_next"]
    bad = np.flatnonzero(expected_next != records["_next"])
    if len(bad):
        i = int(bad[0])
        raise PITFormatError(
            f"{where(i)}: _next is {records['_next'][i]:#x}, expected {expected_next[i]:#x} "
            f"(the next revision of period {records['period'][i]}); broken revision chain; {fix}"
        )
    expected = np.frombuffer(expected_index, dtype=INDEX_DTYPE)[1:]
    bad = np.flatnonzero(expected != index)
    if len(bad):
        s = int(bad[0])
        raise PITFormatError(
            f"{index_path}: entry of period {period_from_ordinal(base + s, field)} (byte {4 + 4 * s}) is "
            f"{index[s]:#x}, expected {expected[s]:#x} (offset of its first record in {data_path.name}); {fix}"
        )
    return PITFile(field=field, first_year=first_year, index=index.copy(), records=records.copy())


def write_pair(data_path: Path, index_path: Path, data: bytes, index_bytes: bytes) -> None:
    """Replace both files atomically, one after the other (data first).

    A crash between the two renames leaves a new ``.data`` beside an old ``.index``,
    which :func:`decode` reports as corrupt instead of reading wrong values.
    """
    data_path.parent.mkdir(parents=True, exist_ok=True)
    for path, content in ((data_path, data), (index_path, index_bytes)):
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
            os.chmod(tmp, mode)  # mkstemp creates 0600; keep the file readable as dump_pit's are
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
