"""The MongoDB boundary: one client per process and server, clear errors, GridFS.

pymongo clients must not cross ``fork()``, and Celery's prefork pool forks, so the
cache is keyed by process id as well as URL.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from typing import Any

import gridfs
import pymongo
from bson import ObjectId
from bson.errors import InvalidId
from pymongo.database import Database
from pymongo.errors import ConfigurationError, InvalidURI, PyMongoError

from .errors import ConfigError, StoreUnavailableError, TaskDefinitionError
from .settings import Settings, load_settings, mask_url

_CLIENTS: dict[tuple[int, str, int], pymongo.MongoClient[dict[str, Any]]] = {}
_LOCK = threading.Lock()

#: GridFS bucket holding results above the size threshold
RESULT_BUCKET = "qcelery_res"
#: prefix of the collections qcelery keeps beside the task pools
INTERNAL_PREFIX = "qcelery_"
#: the task field holding the GridFS id of a result kept in :data:`RESULT_BUCKET`. Its name
#: starts with neither ``def`` nor ``res``: Qlib's ``TaskManager`` unpickles every field that
#: does, so a pool qcelery writes stays readable by Qlib (which sees no ``res`` for such a task)
RESULT_FILE = "gridfs_result"
#: the name of that field before (documents committed then are still read, and rewritten
#: under :data:`RESULT_FILE` by their next commit)
LEGACY_RESULT_FILE = "res_file"


def to_object_id(value: Any) -> ObjectId:
    """``ObjectId`` from an ``ObjectId``, its 24-hex string, or a task dict with ``_id``."""
    if isinstance(value, Mapping):
        value = value.get("_id")
    if isinstance(value, ObjectId):
        return value
    if value is None:  # ObjectId(None) would make up a new id
        raise TaskDefinitionError("a task id is required, got None (expected an ObjectId or a 24-character hex string)")
    try:
        return ObjectId(value)
    except (InvalidId, TypeError):
        raise TaskDefinitionError(f"{value!r} is not a task id (expected an ObjectId or a 24-character hex string)") from None


def unreachable(settings: Settings, exc: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"MongoDB at {mask_url(settings.mongo_url)} did not answer within "
        f"{settings.mongo_timeout_ms / 1000:g}s ({type(exc).__name__}). Start it, set QCELERY_MONGO_URL "
        "to a reachable server, or run `qcelery up` to start the embedded SecantusDB."
    )


def _without_password(message: str, url: str) -> str:
    """pymongo's parse error, unless it quotes a piece of the URL's password (an unescaped
    '/' in a password makes it report the rest as a database name)."""
    scheme, _, rest = url.partition("://")
    userinfo = rest[: rest.rfind("@")] if "@" in rest else ""
    password = userinfo.partition(":")[2]
    pieces = [p for p in re.split(r"[/?#@:;]", password) if len(p) >= 2]
    if any(p in message for p in pieces):
        return (
            "the URL does not parse (the parser's message quotes part of the password, so it is withheld); "
            "escape the user name and password with urllib.parse.quote_plus"
        )
    return message


def client(settings: Settings) -> pymongo.MongoClient[dict[str, Any]]:
    """The process' client for ``settings.mongo_url`` (created on first use)."""
    key = (os.getpid(), settings.mongo_url, settings.mongo_timeout_ms)
    c = _CLIENTS.get(key)
    if c is not None:
        return c
    with _LOCK:
        c = _CLIENTS.get(key)
        if c is None:
            try:
                c = pymongo.MongoClient(
                    settings.mongo_url,
                    serverSelectionTimeoutMS=settings.mongo_timeout_ms,
                    connectTimeoutMS=settings.mongo_timeout_ms,
                    tz_aware=True,
                    appname="qcelery",
                )
            except (InvalidURI, ConfigurationError, ValueError) as exc:
                raise ConfigError(
                    f"invalid QCELERY_MONGO_URL {mask_url(settings.mongo_url)}: {_without_password(str(exc), settings.mongo_url)}"
                ) from None
            _CLIENTS[key] = c
    return c


def database(settings: Settings, ping: bool = False) -> Database[dict[str, Any]]:
    """The settings' database; with ``ping`` check that the server answers first."""
    db = client(settings)[settings.mongo_db]
    if ping:
        try:
            db.client.admin.command("ping")
        except PyMongoError as exc:
            raise unreachable(settings, exc) from None
    return db


_SCANS: dict[str, bool] = {}


def scans_find_and_modify(settings: Settings) -> bool:
    """Whether the server is SecantusDB, whose findAndModify scans the collection
    (DESIGN.md: a known limit of the embedded store); real MongoDB uses the index."""
    if settings.mongo_url not in _SCANS:
        info = database(settings).client.admin.command("buildInfo")
        _SCANS[settings.mongo_url] = "secantusVersion" in info
    return _SCANS[settings.mongo_url]


def result_fs(db: Database) -> gridfs.GridFS:
    return gridfs.GridFS(db, collection=RESULT_BUCKET)


def result_file(task: Mapping[str, Any]) -> Any:
    """The GridFS id of a task document's result (under either field name), or ``None``."""
    fid = task.get(RESULT_FILE)
    return fid if fid is not None else task.get(LEGACY_RESULT_FILE)


def close_all() -> None:
    """Close this process' clients (tests and shutdown)."""
    with _LOCK:
        for key in [k for k in _CLIENTS if k[0] == os.getpid()]:
            _CLIENTS.pop(key).close()


def _reset_after_fork() -> None:
    # the parent's sockets are unusable in the child; drop references without closing.
    # A fork while another thread held the lock (creating a client) would leave it held
    # in the child for ever: the child gets a fresh one
    global _LOCK
    _LOCK = threading.Lock()
    _CLIENTS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def get_mongodb(settings: Settings | None = None) -> Database:
    """The task pools' database (Qlib's ``qlib.workflow.task.utils.get_mongodb``): the one
    ``settings`` name (default: read from the environment, where Qlib reads ``C["mongo"]``),
    checked to answer. :class:`~qcelery.errors.StoreUnavailableError` when it does not."""
    return database(settings if settings is not None else load_settings(), ping=True)
