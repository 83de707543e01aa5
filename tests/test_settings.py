"""Settings: environment, TOML file, precedence, MLflow's variable, URL masking."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from qcelery.errors import ConfigError
from qcelery.settings import Settings, load_settings, mask_url
from qcelery.store import client


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No QCELERY_* / MLFLOW_* variable from the outside, and a cwd without qcelery.toml."""
    import os

    for key in list(os.environ):
        if key.startswith(("QCELERY_", "MLFLOW_")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------- sources
def test_defaults_serve_the_embedded_servers():
    s = Settings()
    assert s.mongo_url.startswith("mongodb://127.0.0.1") and s.broker_url.startswith("redis://127.0.0.1")
    assert s.mongo_db == "qcelery" and s.result_backend is None
    assert s.effective_result_backend == s.broker_url
    # MLflow's SQLite store under the run directory (its file store is deprecated)
    assert s.effective_tracking_uri == f"sqlite:///{Path('.qcelery').resolve() / 'mlflow.db'}"
    assert s.heartbeat_seconds < s.lease_seconds


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("QCELERY_MONGO_URL", "mongodb://db.example:27017/")
    monkeypatch.setenv("QCELERY_MONGO_DB", "research")
    monkeypatch.setenv("QCELERY_BROKER_URL", "amqp://guest:guest@mq:5672//")
    monkeypatch.setenv("QCELERY_RESULT_BACKEND", "redis://cache:6379/1")
    monkeypatch.setenv("QCELERY_LEASE_SECONDS", "120")
    monkeypatch.setenv("QCELERY_ALLOWED_MODULES", '["mypkg", "other:Thing"]')
    s = load_settings()
    assert s.mongo_url == "mongodb://db.example:27017/" and s.mongo_db == "research"
    assert s.broker_url == "amqp://guest:guest@mq:5672//"
    assert s.effective_result_backend == "redis://cache:6379/1"
    assert s.lease_seconds == 120.0 and s.allowed_modules == ["mypkg", "other:Thing"]


def test_mlflow_tracking_uri_is_honoured(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert Settings().effective_tracking_uri == "http://mlflow:5000"
    assert Settings(mlflow_tracking_uri="file:///x").mlflow_tracking_uri == "file:///x"


def test_toml_file_named_by_qcelery_config(monkeypatch, tmp_path):
    (tmp_path / "conf").mkdir()
    cfg = write_toml(
        tmp_path / "conf" / "q.toml",
        ('mongo_url = "mongodb://from-toml:27017/"\nmongo_db = "toml_db"\nmax_attempts = 5\nallowed_modules = ["tomlpkg"]\n'),
    )
    monkeypatch.setenv("QCELERY_CONFIG", str(cfg))
    s = Settings()
    assert s.mongo_url == "mongodb://from-toml:27017/" and s.mongo_db == "toml_db"
    assert s.max_attempts == 5 and s.allowed_modules == ["tomlpkg"]


def test_qcelery_toml_in_the_working_directory_is_read(tmp_path):
    write_toml(tmp_path / "qcelery.toml", 'mongo_db = "cwd_db"\n')
    assert Settings().mongo_db == "cwd_db"


def test_precedence_arguments_over_environment_over_toml(monkeypatch, tmp_path):
    cfg = write_toml(tmp_path / "q.toml", 'mongo_db = "toml"\nbroker_url = "redis://toml:1/0"\nmax_attempts = 7\n')
    monkeypatch.setenv("QCELERY_CONFIG", str(cfg))
    monkeypatch.setenv("QCELERY_MONGO_DB", "env")
    monkeypatch.setenv("QCELERY_BROKER_URL", "redis://env:1/0")
    s = load_settings(mongo_db="arg")
    assert s.mongo_db == "arg"  # argument beats environment
    assert s.broker_url == "redis://env:1/0"  # environment beats the file
    assert s.max_attempts == 7  # the file beats the default


def test_missing_config_file_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("QCELERY_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="nope.toml"):
        Settings()


def test_unknown_key_in_toml_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("QCELERY_CONFIG", str(write_toml(tmp_path / "q.toml", 'mongo_uri = "mongodb://u:secret@h/"\n')))
    with pytest.raises(ValidationError, match="mongo_uri") as err:
        Settings()
    assert "secret" not in str(err.value)


def test_bad_value_from_environment_names_the_setting(monkeypatch):
    monkeypatch.setenv("QCELERY_LEASE_SECONDS", "soon")
    with pytest.raises(ValidationError, match="lease_seconds"):
        Settings()
    monkeypatch.setenv("QCELERY_LEASE_SECONDS", "-1")
    with pytest.raises(ValidationError, match="lease_seconds"):
        Settings()


# ------------------------------------------------------------------- validation
def test_heartbeat_must_be_shorter_than_the_lease(monkeypatch):
    with pytest.raises(ValidationError, match=r"heartbeat_seconds \(30.0\) must be smaller than lease_seconds \(20.0\)"):
        Settings(lease_seconds=20, heartbeat_seconds=30)
    with pytest.raises(ValidationError, match="heartbeat_seconds"):
        Settings(lease_seconds=10, heartbeat_seconds=10)
    monkeypatch.setenv("QCELERY_LEASE_SECONDS", "5")  # the default heartbeat (10 s) no longer fits
    with pytest.raises(ValidationError, match="heartbeat_seconds"):
        Settings()
    assert Settings(heartbeat_seconds=1).lease_seconds == 5


def test_result_backend_is_required_for_a_non_redis_broker():
    s = Settings(broker_url="amqp://guest:secret@mq:5672//")
    with pytest.raises(ConfigError, match="QCELERY_RESULT_BACKEND") as err:
        _ = s.effective_result_backend
    assert "secret" not in str(err.value) and "guest:***@mq" in str(err.value)


def test_result_backend_must_be_redis():
    s = Settings(broker_url="amqp://guest@mq:5672//", result_backend="db+postgresql://u:pw@pg/celery")
    with pytest.raises(ConfigError, match="is not a Redis URL") as err:
        _ = s.effective_result_backend
    assert "pw" not in str(err.value) and "u:***@pg" in str(err.value)
    assert Settings(broker_url="amqp://mq//", result_backend="rediss://r:6380/1").effective_result_backend == "rediss://r:6380/1"


# ---------------------------------------------------------------------- secrets
@pytest.mark.parametrize(
    "url, masked",
    [
        ("mongodb://user:secret@h1:27017,h2:27017/db?authSource=admin", "mongodb://user:***@h1:27017,h2:27017/db?authSource=admin"),
        ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("amqp://guest:secret@mq:5672//;amqp://guest:secret@mq2:5672//", "amqp://guest:***@mq:5672//;amqp://guest:***@mq2:5672//"),
        ("mongodb+srv://user:secret@cluster.example.net/", "mongodb+srv://user:***@cluster.example.net/"),
        ("http://admin:secret@mlflow:5000", "http://admin:***@mlflow:5000"),
        ("mongodb://user:p@ss/wo;rd?#secret@host/", "mongodb://user:***@host/"),  # unescaped specials
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("mongodb://user@host/", "mongodb://user@host/"),
        ("file:///tmp/mlruns", "file:///tmp/mlruns"),
        ("", ""),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_repr_and_str_of_settings_hide_passwords():
    s = Settings(
        mongo_url="mongodb://u:secret1@h/",
        broker_url="redis://:secret2@h:6379/0",
        result_backend="redis://:secret3@h:6379/1",
        mlflow_tracking_uri="http://a:secret4@m:5000",
    )
    for text in (repr(s), str(s), str(s.masked())):
        assert "secret" not in text, text
        assert "u:***@h" in text
    assert s.mongo_url == "mongodb://u:secret1@h/"  # the value itself is intact
    assert s.to_env()["QCELERY_MONGO_URL"] == "mongodb://u:secret1@h/"


def test_settings_round_trip_through_the_environment(monkeypatch):
    s = Settings(mongo_url="mongodb://x:1/", allowed_modules=["a", "b"], lease_seconds=30, heartbeat_seconds=3)
    for key, value in s.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == s


def test_invalid_mongo_url_error_hides_the_password(caplog):
    caplog.set_level(logging.DEBUG)
    for url in ("mongodb://user:se/cret@127.0.0.1/", "mongodb://user:secret@127.0.0.1:99999999/"):
        with pytest.raises(ConfigError) as err:
            client(Settings(mongo_url=url))
        assert "cret" not in str(err.value) and "user:***@127.0.0.1" in str(err.value)
    assert "cret" not in caplog.text
