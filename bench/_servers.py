"""The servers a benchmark runs against: the ones named on its command line, else embedded
SecantusDB and redis-server started here for the run and stopped after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Servers:
    mongo_url: str
    broker_url: str
    mongo: Any = None  #: the embedded SecantusDB, when one was started
    redis: Any = None  #: the embedded redis-server, when one was started


@contextlib.contextmanager
def servers(run_dir: str | Path, mongo_url: str | None = None, broker_url: str | None = None) -> Iterator[Servers]:
    from qcelery.embedded import EmbeddedMongo, EmbeddedRedis

    started = []
    try:
        out = Servers(mongo_url or "", broker_url or "")
        if not mongo_url:
            out.mongo = EmbeddedMongo(run_dir).start(timeout=60)
            started.append(out.mongo)
            out.mongo_url = out.mongo.url
        if not broker_url:
            out.redis = EmbeddedRedis(run_dir).start()
            started.append(out.redis)
            out.broker_url = out.redis.url
        yield out
    finally:
        for server in reversed(started):
            server.stop()
