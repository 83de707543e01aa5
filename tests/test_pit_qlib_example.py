"""The example of Qlib's PIT documentation (docs/advanced/PIT.rst), written and queried.

The table below is the documented content of ``roewa_q.data`` for sh600519 (Kweichow
Moutai, 2007Q1 to 2019Q3, with revisions of 200704, 201104 and 201902); the expected
``_next`` links, index offsets and operator values are the ones the documentation and
Qlib's own ``tests/test_pit.py`` state for that data.
"""

from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import pytest

from qcelery.pit import NO_RECORD, PITStore

NA = 0xFFFFFFFF
# (date, period, value, documented _next)
DOC_RECORDS = [
    (20070428, 200701, 0.090219, NA),
    (20070817, 200702, 0.13933, NA),
    (20071023, 200703, 0.24586301, NA),
    (20080301, 200704, 0.3479, 80),
    (20080313, 200704, 0.395989, NA),
    (20080422, 200801, 0.100724, NA),
    (20080828, 200802, 0.24996801, NA),
    (20081027, 200803, 0.33412001, NA),
    (20090325, 200804, 0.39011699, NA),
    (20090421, 200901, 0.102675, NA),
    (20090807, 200902, 0.230712, NA),
    (20091024, 200903, 0.30072999, NA),
    (20100402, 200904, 0.33546099, NA),
    (20100426, 201001, 0.083825, NA),
    (20100812, 201002, 0.200545, NA),
    (20101029, 201003, 0.260986, NA),
    (20110321, 201004, 0.30739301, NA),
    (20110423, 201101, 0.097411, NA),
    (20110831, 201102, 0.24825101, NA),
    (20111018, 201103, 0.318919, NA),
    (20120323, 201104, 0.4039, 420),
    (20120411, 201104, 0.403925, NA),
    (20120426, 201201, 0.112148, NA),
    (20120810, 201202, 0.26484701, NA),
    (20121026, 201203, 0.370487, NA),
    (20130329, 201204, 0.45004699, NA),
    (20130418, 201301, 0.099958, NA),
    (20130831, 201302, 0.21044201, NA),
    (20131016, 201303, 0.30454299, NA),
    (20140325, 201304, 0.394328, NA),
    (20140425, 201401, 0.083217, NA),
    (20140829, 201402, 0.16450299, NA),
    (20141030, 201403, 0.23408499, NA),
    (20150421, 201404, 0.319612, NA),
    (20150421, 201501, 0.078494, NA),
    (20150828, 201502, 0.137504, NA),
    (20151023, 201503, 0.201709, NA),
    (20160324, 201504, 0.26420501, NA),
    (20160421, 201601, 0.073664, NA),
    (20160827, 201602, 0.136576, NA),
    (20161029, 201603, 0.188062, NA),
    (20170415, 201604, 0.244385, NA),
    (20170425, 201701, 0.080614, NA),
    (20170728, 201702, 0.15151, NA),
    (20171026, 201703, 0.25416601, NA),
    (20180328, 201704, 0.32954201, NA),
    (20180428, 201801, 0.088887, NA),
    (20180802, 201802, 0.170563, NA),
    (20181029, 201803, 0.25522, NA),
    (20190329, 201804, 0.34464401, NA),
    (20190425, 201901, 0.094737, NA),
    (20190713, 201902, 0.0, 1040),
    (20190718, 201902, 0.175322, NA),
    (20191016, 201903, 0.25581899, NA),
]
DOC_FIRST_YEAR = 2007
DOC_INDEX = [
    0,
    20,
    40,
    60,
    100,
    120,
    140,
    160,
    180,
    200,
    220,
    240,
    260,
    280,
    300,
    320,
    340,
    360,
    380,
    400,
    440,
    460,
    480,
    500,
    520,
    540,
    560,
    580,
    600,
    620,
    640,
    660,
    680,
    700,
    720,
    740,
    760,
    780,
    800,
    820,
    840,
    860,
    880,
    900,
    920,
    940,
    960,
    980,
    1000,
    1020,
    1060,
    NA,
]


@pytest.fixture
def moutai(tmp_path) -> PITStore:
    store = PITStore(tmp_path)
    frame = pd.DataFrame([r[:3] for r in DOC_RECORDS], columns=["date", "period", "value"])
    assert store.write("SH600519", "roewa_q", frame) == len(DOC_RECORDS)
    return store


def test_doc_table_gets_documented_next_links_and_index_offsets(moutai):
    pit = moutai.load("SH600519", "roewa_q")
    assert pit.first_year == DOC_FIRST_YEAR
    assert pit.index.tolist() == DOC_INDEX
    assert pit.records["_next"].tolist() == [r[3] for r in DOC_RECORDS]
    assert NO_RECORD == NA


def test_doc_table_files_are_the_documented_bytes(moutai):
    data_path, index_path = moutai.paths("SH600519", "roewa_q")
    assert data_path == moutai.root / "financial" / "sh600519" / "roewa_q.data"
    expected_data = b"".join(struct.pack("IIdI", *r) for r in DOC_RECORDS)
    expected_index = struct.pack("I", DOC_FIRST_YEAR) + struct.pack(f"{len(DOC_INDEX)}I", *DOC_INDEX)
    assert data_path.read_bytes() == expected_data
    assert index_path.read_bytes() == expected_index


def test_doc_table_reads_back_in_file_order(moutai):
    back = moutai.read("SH600519", "roewa_q")
    assert list(back.columns) == ["date", "period", "value"]
    assert back["date"].dt.strftime("%Y%m%d").astype(int).tolist() == [r[0] for r in DOC_RECORDS]
    assert back["period"].tolist() == [r[1] for r in DOC_RECORDS]
    assert back["value"].tolist() == [r[2] for r in DOC_RECORDS]


# Qlib's tests/test_pit.py::test_unlimit: the days P($$roewa_q) changes, and its value from then on.
QLIB_P_CHANGES = [
    ("2007-04-30", 0.090219),
    ("2007-08-17", 0.139330),
    ("2008-03-03", 0.347900),
    ("2008-03-13", 0.395989),
    ("2008-04-22", 0.100724),
    ("2012-03-23", 0.403900),
    ("2012-04-11", 0.403925),
    ("2013-09-02", 0.210442),
    ("2015-04-21", 0.078494),
    ("2019-04-25", 0.094737),
    ("2019-07-15", 0.0),
    ("2019-07-18", 0.175322),
    ("2019-10-16", 0.255819),
]


def test_p_matches_qlib_on_the_doc_table(moutai):
    days = pd.bdate_range("2005-01-04", "2020-01-01")
    p = moutai.P("SH600519", "roewa_q", days)
    assert p.name == "P($$roewa_q)"
    assert p.index.equals(days.rename("datetime"))
    assert p[:"2007-04-27"].isna().all()
    for day, value in QLIB_P_CHANGES:
        assert p[day] == pytest.approx(value, abs=1e-6), day
    # 2015-04-21 published 201404 and 201501 the same day: the latest period wins
    assert p["2015-04-20"] == pytest.approx(0.23408499)  # 201403 until then


def test_windowed_p_and_pref_match_qlib_on_the_doc_table(moutai):
    days = pd.bdate_range("2018-04-28", "2019-07-19")
    mean2 = moutai.P("SH600519", "roewa_q", days, window=2, how="mean")
    ref1 = moutai.P("SH600519", "roewa_q", days, offset=1)
    # Qlib's tests/test_pit.py::test_expr
    assert mean2["2019-07-12"] == pytest.approx(0.219691, abs=1e-6)
    assert ref1["2019-07-12"] == pytest.approx(0.344644, abs=1e-6)
    assert mean2["2019-07-15"] == pytest.approx(0.047369, abs=1e-6)  # 201902 first published as 0
    assert ref1["2019-07-15"] == pytest.approx(0.094737, abs=1e-6)
    assert mean2["2019-07-18"] == pytest.approx(0.135029, abs=1e-6)  # its revision, from its day on
    # Qlib's tests/test_pit.py::test_pref_operator
    pref = moutai.PRef("SH600519", "roewa_q", 201902, days)
    assert pref.name == "PRef($$roewa_q, 201902)"
    assert pref[:"2019-07-12"].isna().all()
    assert pref["2019-07-15"] == 0.0 and pref["2019-07-18"] == pytest.approx(0.175322)
    p = moutai.P("SH600519", "roewa_q", days)
    ratio = p / moutai.PRef("SH600519", "roewa_q", 201801, days)
    assert ratio["2018-05-02"] == pytest.approx(1.0)
    assert ratio["2019-07-18"] == pytest.approx(1.972414, abs=1e-6)


def test_sum_of_four_quarters_uses_each_quarter_as_known_then(moutai):
    days = pd.DatetimeIndex(["2012-03-22", "2012-03-23", "2012-04-11"])
    s = moutai.P("SH600519", "roewa_q", days, window=4, how="sum")
    assert s.iloc[0] == pytest.approx(0.30739301 + 0.097411 + 0.24825101 + 0.318919)  # 201004..201103
    assert s.iloc[1] == pytest.approx(0.097411 + 0.24825101 + 0.318919 + 0.4039)  # 201101..201104
    assert s.iloc[2] == pytest.approx(0.097411 + 0.24825101 + 0.318919 + 0.403925)  # 201104 revised
    assert np.isnan(moutai.P("SH600519", "roewa_q", ["2007-01-05"], window=4, how="sum").iloc[0])
