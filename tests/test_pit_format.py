"""The PIT file pair: interchange with Qlib's dump_pit, appending, and damaged files."""

from __future__ import annotations

import base64
import io
import os
import pickle
import struct

import numpy as np
import pandas as pd
import pytest

from qcelery.errors import QceleryError
from qcelery.pit import PITDataNotFoundError, PITFormatError, PITQueryError, PITStore
from qcelery.pit.fileformat import encode
from qcelery.pit.periods import parse_field

# Two statement tables and the files Qlib 0.9.7's scripts/dump_pit.py wrote from them
# (`dump --interval quarterly`, field "roe" -> roe_q). Values are exact in float32,
# since dump_pit rounds values to float32.
BATCH_1 = """date,period,value
2018-04-20,201801,0.125
2018-08-10,201802,0.25
2018-10-25,201803,0.375
2019-03-15,201804,0.5
2019-04-02,201804,0.53125
2019-04-26,201901,0.0625
2019-05-10,201803,0.40625
2019-08-20,201902,-0.1875
"""
BATCH_2 = """date,period,value
2019-10-22,201903,0.3125
2019-11-05,201804,0.5625
2020-03-30,201904,0.75
2020-04-28,202001,0.09375
2020-06-01,201902,-0.125
"""
# dump_pit of BATCH_1
QLIB_1_DATA = (
    "xO0zAUkUAwAAAAAAAADAP/////9K7zMBShQDAAAAAAAAANA//////yHwMwFLFAMAAAAAAAAA2D94AAAAaxQ0AUwUAwAAAAAAAADg"
    "P1AAAADCFDQBTBQDAAAAAAAAAOE//////9oUNAGtFAMAAAAAAAAAsD//////LhU0AUsUAwAAAAAAAADaP/////9kFjQBrhQDAAAA"
    "AAAAAMi//////w=="
)
QLIB_1_INDEX = "4gcAAAAAAAAUAAAAKAAAADwAAABkAAAAjAAAAP//////////"
# dump_pit of BATCH_1 and BATCH_2 together
QLIB_12_DATA = (
    "xO0zAUkUAwAAAAAAAADAP/////9K7zMBShQDAAAAAAAAANA//////yHwMwFLFAMAAAAAAAAA2D94AAAAaxQ0AUwUAwAAAAAAAADg"
    "P1AAAADCFDQBTBQDAAAAAAAAAOE/tAAAANoUNAGtFAMAAAAAAAAAsD//////LhU0AUsUAwAAAAAAAADaP/////9kFjQBrhQDAAAA"
    "AAAAAMi/8AAAAC4XNAGvFAMAAAAAAAAA1D//////gRc0AUwUAwAAAAAAAADiP/////+KOzQBsBQDAAAAAAAAAOg//////+w7NAER"
    "FQMAAAAAAAAAuD//////mTw0Aa4UAwAAAAAAAADAv/////8="
)
QLIB_12_INDEX = "4gcAAAAAAAAUAAAAKAAAADwAAABkAAAAjAAAAKAAAADIAAAA3AAAAP///////////////w=="
# dump_pit of BATCH_1, then dump_pit of BATCH_2 in its update mode: Qlib 0.9.7 writes the
# new records over the start of the file (it opens it "rb+" and never seeks to the end).
QLIB_UPDATE_DATA = (
    "Lhc0Aa8UAwAAAAAAAADUP/////+BFzQBTBQDAAAAAAAAAOI//////4o7NAGwFAMAAAAAAAAA6D//////7Ds0AREVAwAAAAAAAAC4"
    "P/////+ZPDQBrhQDAAAAAAAAAMC//////9oUNAGtFAMAAAAAAAAAsD//////LhU0AUsUAwAAAAAAAADaP/////9kFjQBrhQDAAAA"
    "AAAAAMi/UAAAAA=="
)
QLIB_UPDATE_INDEX = "4gcAAAAAAAAUAAAAKAAAADwAAABkAAAAjAAAAAAAAAAoAAAAPAAAAP///////////////w=="

needs_little_endian = pytest.mark.skipif(
    struct.pack("I", 1) != b"\x01\x00\x00\x00", reason="the Qlib files above were written on a little-endian machine"
)


def table(csv: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(csv))


def files(store: PITStore, instrument: str = "SH600000", field: str = "roe_q") -> tuple[bytes, bytes]:
    data_path, index_path = store.paths(instrument, field)
    return data_path.read_bytes(), index_path.read_bytes()


def put(store: PITStore, data: bytes, index: bytes, instrument: str = "SH600000", field: str = "roe_q") -> None:
    data_path, index_path = store.paths(instrument, field)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_bytes(data)
    index_path.write_bytes(index)


@needs_little_endian
def test_first_write_is_byte_identical_to_qlib_dump_pit(tmp_path):
    store = PITStore(tmp_path)
    assert store.write("SH600000", "roe_q", table(BATCH_1)) == 8
    assert files(store) == (base64.b64decode(QLIB_1_DATA), base64.b64decode(QLIB_1_INDEX))


@needs_little_endian
def test_append_gives_the_bytes_qlib_dumps_for_all_statements_at_once(tmp_path):
    store = PITStore(tmp_path)
    store.write("SH600000", "roe_q", table(BATCH_1))
    assert store.write("SH600000", "roe_q", table(BATCH_2)) == 5
    assert files(store) == (base64.b64decode(QLIB_12_DATA), base64.b64decode(QLIB_12_INDEX))
    # the old revision chains were extended: 201804 (3 revisions) and 201902 (2)
    pit = store.load("SH600000", "roe_q")
    assert pit.records["_next"][3:5].tolist() == [80, 180]
    assert pit.records["_next"][7] == 240


@needs_little_endian
def test_files_written_by_qlib_are_read(tmp_path):
    store = PITStore(tmp_path)
    put(store, base64.b64decode(QLIB_12_DATA), base64.b64decode(QLIB_12_INDEX))
    back = store.read("SH600000", "roe_q")
    expected = pd.concat([table(BATCH_1), table(BATCH_2)], ignore_index=True)
    assert back["date"].dt.strftime("%Y-%m-%d").tolist() == expected["date"].tolist()
    assert back["period"].tolist() == expected["period"].tolist()
    assert back["value"].tolist() == expected["value"].tolist()
    p = store.P("SH600000", "roe_q", ["2019-10-21", "2019-11-05", "2020-06-01"], window=4, how="sum")
    # windows 201803..201902, then 201804..201903 (201804 revised that day), then 201902..202001
    assert p.tolist() == [0.40625 + 0.53125 + 0.0625 - 0.1875, 0.5625 + 0.0625 - 0.1875 + 0.3125, -0.125 + 0.3125 + 0.75 + 0.09375]


@needs_little_endian
def test_file_damaged_by_qlib_update_mode_is_reported_not_read(tmp_path):
    store = PITStore(tmp_path)
    put(store, base64.b64decode(QLIB_UPDATE_DATA), base64.b64decode(QLIB_UPDATE_INDEX))
    with pytest.raises(PITFormatError, match=r"record 5 \(byte 100\): date 20190426 is before"):
        store.P("SH600000", "roe_q", ["2020-01-02"])


def test_writing_the_same_statements_again_changes_nothing(tmp_path):
    store = PITStore(tmp_path)
    store.write("SH600000", "roe_q", table(BATCH_1))
    before = files(store)
    assert store.write("SH600000", "roe_q", table(BATCH_1)) == 0
    assert store.write("SH600000", "roe_q", pd.concat([table(BATCH_1)] * 2)) == 0
    assert files(store) == before


def test_late_arriving_older_statements_are_merged_in_date_order(tmp_path):
    both = pd.concat([table(BATCH_1), table(BATCH_2)], ignore_index=True)
    at_once, in_reverse = PITStore(tmp_path / "a"), PITStore(tmp_path / "b")
    at_once.write("SH600000", "roe_q", both)
    in_reverse.write("SH600000", "roe_q", table(BATCH_2))
    assert in_reverse.write("SH600000", "roe_q", table(BATCH_1)) == 8
    assert files(in_reverse) == files(at_once)


def test_index_grows_backwards_for_periods_before_its_first_year(tmp_path):
    store = PITStore(tmp_path)
    store.write("SH600000", "roe_q", table(BATCH_2).query("period >= 201900"))
    assert store.load("SH600000", "roe_q").first_year == 2019
    old = pd.DataFrame({"date": ["2020-07-01"], "period": [201703], "value": [1.5]})
    store.write("SH600000", "roe_q", old)
    pit = store.load("SH600000", "roe_q")
    assert pit.first_year == 2017 and len(pit.index) == 4 * 4
    assert pit.index[2] == 4 * 20  # 201703 is record 4
    assert store.PRef("SH600000", "roe_q", 201703, ["2020-06-30", "2020-07-01"]).tolist()[1] == 1.5


def test_equal_dates_keep_the_order_given(tmp_path):
    store = PITStore(tmp_path)
    rows = pd.DataFrame({"date": [20190430] * 3, "period": [201804, 201901, 201804], "value": [1.0, 2.0, 3.0]})
    store.write("SH600000", "roe_q", rows)
    assert store.read("SH600000", "roe_q")["value"].tolist() == [1.0, 2.0, 3.0]
    assert store.PRef("SH600000", "roe_q", 201804, ["2019-04-30"]).iloc[0] == 3.0


def test_repeated_same_day_statements_in_one_batch_are_all_kept(tmp_path):
    # found by hypothesis: dropping the repeated 0.0 would leave NaN as the day's revision
    store = PITStore(tmp_path)
    rows = pd.DataFrame({"date": [20150101] * 3, "period": [2015] * 3, "value": [0.0, np.nan, 0.0]})
    assert store.write("SH600000", "roe_a", rows) == 3
    assert store.P("SH600000", "roe_a", ["2015-01-01"]).iloc[0] == 0.0
    assert store.write("SH600000", "roe_a", rows) == 0


def test_annual_field_has_one_index_entry_per_year(tmp_path):
    store = PITStore(tmp_path)
    rows = pd.DataFrame(
        {
            "date": pd.to_datetime(["2018-03-30", "2019-04-20", "2019-06-01", "2021-04-01"]),
            "period": [2017, 2018, 2017, 2020],
            "value": [1.0, 2.0, 1.25, 4.0],
        }
    )
    store.write("SH600000", "eps_a", rows)
    data, index = files(store, field="eps_a")
    assert index == struct.pack("5I", 2017, 0, 20, 0xFFFFFFFF, 60)
    assert data[:20] == struct.pack("IIdI", 20180330, 2017, 1.0, 40)
    assert store.read("SH600000", "eps_a")["period"].tolist() == [2017, 2018, 2017, 2020]
    assert store.P("SH600000", "eps_a", ["2020-01-01"], window=3, how="mean").iloc[0] == pytest.approx(1.625)


def test_dates_may_be_datetimes_strings_or_integers(tmp_path):
    stores = [PITStore(tmp_path / str(i)) for i in range(3)]
    dates = [pd.to_datetime(["2019-04-26", "2019-08-20"]), ["2019-04-26", "2019-08-20"], [20190426, 20190820]]
    for store, d in zip(stores, dates, strict=True):
        store.write("SH600000", "roe_q", pd.DataFrame({"date": d, "period": [201901, 201902], "value": [1.0, 2.0]}))
    assert files(stores[0]) == files(stores[1]) == files(stores[2])


def test_a_rewrite_is_seen_by_the_same_store(tmp_path):
    store = PITStore(tmp_path)
    store.write("SH600000", "roe_q", table(BATCH_1))
    assert store.P("SH600000", "roe_q", ["2020-12-31"]).iloc[0] == -0.1875
    store.write("SH600000", "roe_q", table(BATCH_2))
    assert store.P("SH600000", "roe_q", ["2020-12-31"]).iloc[0] == 0.09375
    store.write("SH600000", "roe_q", pd.DataFrame({"date": [20210101], "period": [202001], "value": [7.0]}), overwrite=True)
    assert len(store.read("SH600000", "roe_q")) == 1


def test_store_pickles_as_its_folder(stored):
    stored.read("SH600000", "roe_q")
    clone = pickle.loads(pickle.dumps(stored))
    assert clone.root == stored.root and not clone._cache
    assert clone.read("SH600000", "roe_q").equals(stored.read("SH600000", "roe_q"))


def test_instruments_are_lower_case_folders_and_device_names_are_prefixed_as_qlib_reads_them(tmp_path):
    store = PITStore(tmp_path)
    store.write("SH600000", "ROE_Q", table(BATCH_1))
    assert (tmp_path / "financial" / "sh600000" / "roe_q.data").exists()
    assert store.instruments() == ["sh600000"] and store.fields("sh600000") == ["roe_q"]
    assert store.paths("CON", "roe_q")[0].parent.name == "_qlib_con"
    assert store.read("sh600000", "$$roe_q").equals(store.read("SH600000", "roe_q"))


# -- damaged files ---------------------------------------------------------------


@pytest.fixture
def stored(tmp_path) -> PITStore:
    store = PITStore(tmp_path)
    store.write("SH600000", "roe_q", pd.concat([table(BATCH_1), table(BATCH_2)], ignore_index=True))
    return store


def damage(store: PITStore, data: bytes | None = None, index: bytes | None = None) -> None:
    old_data, old_index = files(store)
    put(store, old_data if data is None else data, old_index if index is None else index)


def patch(buf: bytes, offset: int, fmt: str, *values) -> bytes:
    out = bytearray(buf)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def test_truncated_data_file(stored):
    data, _ = files(stored)
    damage(stored, data=data[:-7])
    with pytest.raises(PITFormatError, match=r"roe_q\.data: 253 bytes .*truncated after record 12"):
        stored.read("SH600000", "roe_q")


def test_truncated_index_file(stored):
    _, index = files(stored)
    damage(stored, index=index[:-4])
    with pytest.raises(PITFormatError, match=r"11 index entries is not a whole number of years .*truncated"):
        stored.read("SH600000", "roe_q")
    damage(stored, index=index[:-16])  # one whole year short: 202001 has no slot
    with pytest.raises(PITFormatError, match=r"period 202001 is outside the index .*201801 to 201904"):
        stored.read("SH600000", "roe_q")
    damage(stored, index=index[:2])
    with pytest.raises(PITFormatError, match="not a first year plus whole uint32 entries"):
        stored.read("SH600000", "roe_q")


def test_broken_revision_chain(stored):
    data, _ = files(stored)
    damage(stored, data=patch(data, 3 * 20 + 16, "I", 0xFFFFFFFF))  # 201804's first record loses its link
    expected = r"record 3 \(byte 60\): _next is 0xffffffff, expected 0x50 .*period 201804"
    with pytest.raises(PITFormatError, match=expected):
        stored.P("SH600000", "roe_q", ["2020-01-02"])


def test_index_entry_pointing_elsewhere(stored):
    _, index = files(stored)
    damage(stored, index=patch(index, 4 + 4 * 5, "I", 0))  # 201902 -> byte 0
    with pytest.raises(PITFormatError, match=r"entry of period 201902 \(byte 24\) is 0x0, expected 0x8c"):
        stored.read("SH600000", "roe_q")


def test_unsorted_dates_bad_days_and_bad_periods(stored):
    data, index = files(stored)
    f = parse_field("roe_q")
    unsorted = encode(np.array([20190820, 20190426]), np.array([201902, 201901]), np.array([1.0, 2.0]), f)
    damage(stored, *unsorted)
    with pytest.raises(PITFormatError, match=r"record 1 \(byte 20\): date 20190426 is before .* sorted"):
        stored.read("SH600000", "roe_q")
    damage(stored, data=patch(data, 0, "I", 20191332))
    with pytest.raises(PITFormatError, match="date 20191332 is not a YYYYMMDD day"):
        stored.read("SH600000", "roe_q")
    damage(stored, data=patch(data, 4, "I", 201905), index=index)
    with pytest.raises(PITFormatError, match="period 201905 is not a quarterly period"):
        stored.read("SH600000", "roe_q")
    damage(stored, data=data, index=patch(index, 0, "I", 7))
    with pytest.raises(PITFormatError, match="first year 7 at byte 0 is not a year"):
        stored.read("SH600000", "roe_q")


def test_missing_partner_file_and_repair_by_overwrite(stored):
    _, index_path = stored.paths("SH600000", "roe_q")
    index_path.unlink()
    with pytest.raises(PITFormatError, match=r"roe_q\.index is missing beside .*roe_q\.data"):
        stored.read("SH600000", "roe_q")
    with pytest.raises(PITFormatError):
        stored.write("SH600000", "roe_q", table(BATCH_1))
    stored.write("SH600000", "roe_q", table(BATCH_1), overwrite=True)
    assert len(stored.read("SH600000", "roe_q")) == 8


def test_missing_field_is_a_file_not_found_error(tmp_path):
    store = PITStore(tmp_path)
    with pytest.raises(PITDataNotFoundError, match=r"no PIT data for instrument 'SH600000', field 'roe_q'") as err:
        store.P("SH600000", "roe_q", ["2020-01-02"])
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, QceleryError)


def test_written_files_are_readable_by_others(stored):
    data_path, index_path = stored.paths("SH600000", "roe_q")
    assert data_path.stat().st_mode & 0o644 == 0o644
    assert not [p for p in os.listdir(data_path.parent) if p.endswith(".tmp")]


# -- bad statements ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "rows", "message"),
    [
        ("roe", {"date": [20190426], "period": [201901], "value": [1.0]}, "must end in '_q'"),
        ("roe_x", {"date": [20190426], "period": [201901], "value": [1.0]}, "must end in '_q'"),
        ("../roe_q", {"date": [20190426], "period": [201901], "value": [1.0]}, "may only contain"),
        ("roe_q", {"date": [20190426], "period": [2019], "value": [1.0]}, r"period 2019 \(row 0\) does not exist"),
        ("roe_q", {"date": [20190426], "period": [201905], "value": [1.0]}, "year\\*100\\+quarter"),
        ("roe_a", {"date": [20190426], "period": [201904], "value": [1.0]}, "annual field .* as a year"),
        ("roe_q", {"date": [20190426, 20191340], "period": [201901] * 2, "value": [1.0] * 2}, r"20191340 \(row 1\)"),
        ("roe_q", {"date": ["2019-04-26", None], "period": [201901] * 2, "value": [1.0] * 2}, "row 1 is missing"),
        ("roe_q", {"date": [20190426], "period": [201901.5], "value": [1.0]}, "201901.5 .* does not exist"),
        ("roe_q", {"date": [20190426], "value": [1.0]}, r"lack column\(s\) \['period'\]"),
        ("roe_q", {"date": [20190426], "period": [201901], "value": ["high"]}, "must be numbers"),
    ],
)
def test_bad_statements_are_refused_before_writing(tmp_path, field, rows, message):
    store = PITStore(tmp_path)
    with pytest.raises(PITQueryError, match=message) as err:
        store.write("SH600000", field, pd.DataFrame(rows))
    assert isinstance(err.value, ValueError)
    assert not (tmp_path / "financial").exists()


def test_bad_instrument_and_table_type(tmp_path):
    store = PITStore(tmp_path)
    with pytest.raises(PITQueryError, match="path separator"):
        store.write("../x", "roe_q", table(BATCH_1))
    with pytest.raises(PITQueryError, match="non-empty string"):
        store.P("", "roe_q", ["2020-01-02"])
    with pytest.raises(PITQueryError, match="must be a pandas DataFrame"):
        store.write("SH600000", "roe_q", [(20190426, 201901, 1.0)])
