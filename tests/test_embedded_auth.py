"""The embedded SecantusDB with passwords (``qcelery up --listen``): SCRAM users that
survive a restart of the run directory, and no access without the password."""

from __future__ import annotations

import stat

import pymongo
import pytest
from pymongo.errors import OperationFailure

from qcelery.embedded import AUTH_USER, MONGO_PASSWORD_FILE, EmbeddedMongo


def test_an_authenticated_store_refuses_anonymous_clients_and_keeps_its_user_and_data_across_restarts(tmp_path):
    run_dir = tmp_path / "run"
    with EmbeddedMongo(run_dir, auth=True) as first:
        url = first.url
        assert f"{AUTH_USER}:{first.password}@" in url
        with pymongo.MongoClient(url, serverSelectionTimeoutMS=10000) as c:
            c.q.results.insert_one({"_id": 1, "committed": True})
        with pymongo.MongoClient("127.0.0.1", first.port, directConnection=True, serverSelectionTimeoutMS=10000) as anon:
            with pytest.raises(OperationFailure):
                anon.q.results.find_one()
            with pytest.raises(OperationFailure):
                anon.q.results.insert_one({"_id": 2})
        assert "--auth" in first.command() and "--sync-on-commit" in first.command()
    password = (run_dir / MONGO_PASSWORD_FILE).read_text().strip()
    assert stat.S_IMODE((run_dir / MONGO_PASSWORD_FILE).stat().st_mode) == 0o600
    # a second start in the same run directory: same password, the user and data are there
    with EmbeddedMongo(run_dir, auth=True) as again:
        assert again.password == password
        with pymongo.MongoClient(again.url, serverSelectionTimeoutMS=10000) as c:
            assert c.q.results.find_one({"_id": 1}) == {"_id": 1, "committed": True}
        bad_url = again.url.replace(password, "wrong-password")
        with pymongo.MongoClient(bad_url, serverSelectionTimeoutMS=10000) as bad, pytest.raises(OperationFailure):
            bad.q.results.find_one()
