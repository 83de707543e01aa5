"""The synthetic market as a Qlib provider directory (issue 13.7), read by real pyqlib:
Qlib's ``D`` returns the simulated prices, and Qlib's own ``Alpha158`` handler builds on
it, so Qlib's examples run without a download."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from qcelery.cli.main import app
from qcelery.data import SyntheticAlphaHandler
from qcelery.data.qlib_provider import FIELDS, write_qlib_provider
from qcelery.errors import ConfigError
from qcelery.qlib_bridge import ensure_qlib_init, provider_calendar

SPAN = {"instruments": 6, "start_time": "2023-01-03", "end_time": "2023-04-28", "seed": 3}


def test_qlib_reads_the_synthetic_market(tmp_path):
    root = write_qlib_provider(tmp_path / "synthetic", **SPAN)
    market = SyntheticAlphaHandler(**SPAN).market("XSHG")
    assert sorted(p.name for p in (root / "features" / "syn0000").iterdir()) == sorted(f"{f}.day.bin" for f in FIELDS)

    qlib_init = {"provider_uri": str(root), "region": "cn"}
    ensure_qlib_init(qlib_init, [])
    from qlib.data import D

    assert list(D.calendar()) == list(market["close"].index) == list(provider_calendar(qlib_init).dates)
    assert D.list_instruments(D.instruments("all"), as_list=True) == list(market["close"].columns)
    got = D.features(D.instruments("all"), ["$close", "$volume", "$factor"])
    close = got["$close"].unstack("instrument")
    np.testing.assert_allclose(close.to_numpy(), market["close"].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["$volume"].unstack("instrument").to_numpy(), market["volume"].to_numpy(), rtol=1e-6)
    assert (got["$factor"] == 1.0).all()

    # Qlib's own Alpha158 handler builds on it: 158 features, none missing once warmed up
    from qlib.contrib.data.handler import Alpha158

    handler = Alpha158(
        instruments="all", start_time="2023-01-03", end_time="2023-04-28", fit_start_time="2023-01-03", fit_end_time="2023-03-31"
    )
    features = handler.fetch(col_set="feature")
    assert features.shape == (6 * len(D.calendar(start_time="2023-01-03", end_time="2023-04-28")), 158)
    assert not features.isna().any().any()


def test_provider_target_must_be_empty(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"busy.*not empty.*--overwrite"):
        write_qlib_provider(tmp_path / "busy", **SPAN)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]


def test_cli_writes_the_provider(tmp_path):
    target = tmp_path / "cli_provider"
    result = CliRunner().invoke(app, ["qlib-data", str(target), "--instruments", "4", "--start", "2023-01-03", "--end", "2023-03-31"])
    assert result.exit_code == 0, result.output
    assert "provider_uri" in result.output and str(target) in result.output
    assert len((target / "instruments" / "all.txt").read_text().splitlines()) == 4
    again = CliRunner().invoke(app, ["qlib-data", str(target), "--instruments", "4"])
    assert isinstance(again.exception, ConfigError) and "not empty" in str(again.exception)
