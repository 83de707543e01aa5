"""Session fixtures: real servers, started once; each test gets its own database.

MongoDB: the server named by ``QCELERY_MONGO_URL``, else an embedded SecantusDB.
Redis:   the server named by ``QCELERY_BROKER_URL``, else an embedded redis-server.
Each test gets a fresh Mongo database (dropped afterwards) and a settings object
pointing at it; nothing here is a mock.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass

import pymongo
import pytest

from qcelery.embedded import EmbeddedMongo, EmbeddedRedis
from qcelery.settings import Settings


@dataclass
class Servers:
    mongo_url: str
    broker_url: str
    mongo: EmbeddedMongo | None
    redis: EmbeddedRedis | None


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("servers")
    mongo = redis = None
    mongo_url = os.environ.get("QCELERY_MONGO_URL")
    broker_url = os.environ.get("QCELERY_BROKER_URL")
    try:
        if not mongo_url:
            mongo = EmbeddedMongo(run_dir).start()
            mongo_url = mongo.url
        if not broker_url:
            redis = EmbeddedRedis(run_dir).start()
            broker_url = redis.url
        yield Servers(mongo_url, broker_url, mongo, redis)
    finally:
        for server in (mongo, redis):
            if server is not None:
                server.stop()


def _db_name(request) -> str:
    base = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
    return f"t_{base}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings(servers, tmp_path, request) -> Settings:
    """Settings for one test: its own Mongo database and run directory, short leases."""
    return Settings(
        mongo_url=servers.mongo_url,
        mongo_db=_db_name(request),
        broker_url=servers.broker_url,
        run_dir=tmp_path / "run",
        mlflow_tracking_uri=(tmp_path / "mlruns").as_uri(),
        lease_seconds=6.0,
        heartbeat_seconds=1.0,
        recover_interval=1.0,
        sweep_interval=2.0,
        sweep_after=4.0,
        aggregate_countdown=0.5,
    )


@pytest.fixture
def mongo_client(servers):
    client = pymongo.MongoClient(servers.mongo_url, serverSelectionTimeoutMS=5000)
    yield client
    client.close()


@pytest.fixture
def mongo_db(settings, mongo_client):
    db = mongo_client[settings.mongo_db]
    yield db
    mongo_client.drop_database(settings.mongo_db)
