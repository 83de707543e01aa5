"""Ask each server for an answer before doing anything, within a few seconds.

A command that needs MongoDB, the broker or MLflow checks them first, so an
unreachable server is one clear line (naming the URL, password masked, and the fix)
rather than a retry loop or a traceback. Nothing here is written to the servers.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import BrokerUnavailableError, ConfigError, TrackingUnavailableError
from ..settings import Settings, mask_url

#: seconds each check may take (the whole preflight stays under five seconds per server)
TIMEOUT = 2.5


def check_mongo(settings: Settings) -> None:
    """Ping MongoDB with a short-lived client (``StoreUnavailableError`` after at most
    :data:`TIMEOUT` seconds, or ``mongo_timeout_ms`` when that is shorter)."""
    import pymongo
    from pymongo.errors import ConfigurationError, InvalidURI, PyMongoError

    from ..store import unreachable

    timeout_ms = int(min(settings.mongo_timeout_ms, TIMEOUT * 1000))
    try:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            settings.mongo_url, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms, appname="qcelery-check"
        )
    except (InvalidURI, ConfigurationError, ValueError) as exc:
        raise ConfigError(f"invalid QCELERY_MONGO_URL {mask_url(settings.mongo_url)}: {exc}") from None
    try:
        client.admin.command("ping")
    except PyMongoError as exc:
        raise unreachable(settings.model_copy(update={"mongo_timeout_ms": timeout_ms}), exc) from None
    finally:
        client.close()


def _check_redis(url: str, what: str) -> None:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT, socket_timeout=TIMEOUT)
    except ValueError as exc:
        raise ConfigError(f"invalid {what} URL {mask_url(url)}: {exc}") from None
    try:
        client.ping()
    except redis.exceptions.AuthenticationError as exc:
        raise BrokerUnavailableError(f"{what} at {mask_url(url)} refused the credentials ({exc}); check the password in the URL") from None
    except (redis.exceptions.RedisError, OSError) as exc:
        raise BrokerUnavailableError(
            f"{what} at {mask_url(url)} did not answer within {TIMEOUT:g}s ({type(exc).__name__}). Start it, "
            f"set QCELERY_{'BROKER_URL' if what == 'broker' else 'RESULT_BACKEND'} to a reachable server, "
            "or run `qcelery up` to start the embedded redis-server."
        ) from None
    finally:
        client.close()


def check_broker(settings: Settings) -> None:
    """Connect to the broker (Redis or RabbitMQ) and to the result backend."""
    url = settings.broker_url
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        _check_redis(url, "broker")
    else:
        from kombu import Connection
        from kombu.exceptions import OperationalError

        try:
            with Connection(url, connect_timeout=TIMEOUT) as conn:
                # celery-types says int, as kombu's docstring does; kombu compares it as seconds, so 2.5 works
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=TIMEOUT)  # type: ignore[arg-type]
        except (TimeoutError, OperationalError, OSError) as exc:
            raise BrokerUnavailableError(
                f"broker at {mask_url(url)} did not answer within {TIMEOUT:g}s ({exc}). Start it or set "
                "QCELERY_BROKER_URL to a reachable server."
            ) from None
    backend = settings.effective_result_backend
    if backend != url and urlsplit(backend).scheme in ("redis", "rediss", "unix"):
        _check_redis(backend, "result backend")


def check_tracking(settings: Settings) -> None:
    """An MLflow server answers ``/health``; a local store's directory can be created."""
    uri = settings.effective_tracking_uri
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        # /health needs no login, and urllib would take a URL's user:password@ for the host
        health = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=TIMEOUT) as resp:
                resp.read(64)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                return  # it answered; credentials are MLflow's business (MLFLOW_TRACKING_USERNAME ...)
            raise TrackingUnavailableError(f"MLflow at {mask_url(uri)} answered {exc.code} on /health; is it an MLflow server?") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailableError(
                f"MLflow at {mask_url(uri)} did not answer within {TIMEOUT:g}s ({reason}). Start `mlflow server`, "
                "or set MLFLOW_TRACKING_URI to a reachable server (unset: a local store under the run directory)."
            ) from None
    elif parts.scheme == "file":
        path = Path(urllib.request.url2pathname(parts.path))
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailableError(f"MLflow store {uri} cannot be created: {exc}") from None


def check_all(settings: Settings, *, mongo: bool = True, broker: bool = True, tracking: bool = True) -> None:
    if mongo:
        check_mongo(settings)
    if broker:
        check_broker(settings)
    if tracking:
        check_tracking(settings)
