"""The task pools qcelery knows: the ones it created or adopted, never guessed.

A database holds more than task pools: qcelery's own collections, GridFS buckets (the
handler cache's ``handler_cache.files`` / ``.chunks``), a user's collections. Guessing
pools from collection names took a GridFS bucket for a pool, built a unique index over
it and stopped beat's recovery. So every pool is written down here when qcelery creates
it (``TaskManager(name)`` on a new or empty collection, ``qcelery enqueue``) or adopts it
(``qcelery adopt NAME`` for a pool Qlib filled), and everything that walks "all pools"
(beat's jobs, ``status``, ``pools``, ``TaskManager.list()``) reads this list only.

One document per pool in ``qcelery_pools``::

    {_id: <collection name>, origin: "created" | "adopted" | "found", registered_at}

``register`` is an upsert keyed on the name, so two producers creating the same pool at
once write one document; ``forget`` removes it with the pool.
"""

from __future__ import annotations

import datetime as _dt

from pymongo.database import Database

from .errors import TaskDefinitionError
from .store import INTERNAL_PREFIX

COLLECTION = "qcelery_pools"

#: origins of a registration: created by qcelery, adopted from Qlib, or an older qcelery
#: pool recognised by its unique ``dedup`` index
CREATED, ADOPTED, FOUND = "created", "adopted", "found"

#: collections GridFS keeps beside a bucket: never a task pool
_GRIDFS_SUFFIXES = (".files", ".chunks")
#: prefixes MongoDB and qcelery keep for themselves
_RESERVED_PREFIXES = ("system.", INTERNAL_PREFIX)
_MAX_NAME_BYTES = 120


def check_name(name: object) -> str:
    """``name`` if it can be a task pool, else :class:`TaskDefinitionError` saying why."""
    if not isinstance(name, str) or not name:
        raise TaskDefinitionError(f"invalid task pool name {name!r}: a pool name is a non-empty string")
    why = None
    if "\x00" in name or "$" in name:
        why = "it contains '$' or a NUL character"
    elif name.startswith(".") or name.endswith(".") or ".." in name:
        why = "it starts or ends with '.' or contains '..'"
    elif name.startswith(_RESERVED_PREFIXES):
        why = f"names starting with {' or '.join(repr(p) for p in _RESERVED_PREFIXES)} are reserved"
    elif name.endswith(_GRIDFS_SUFFIXES):
        why = "names ending in '.files' or '.chunks' belong to GridFS buckets"
    elif len(name.encode()) > _MAX_NAME_BYTES:
        why = f"it is longer than {_MAX_NAME_BYTES} bytes"
    elif not name.isprintable():
        why = "it contains a control character"
    if why:
        raise TaskDefinitionError(f"invalid task pool name {name!r}: {why}; use letters, digits, '_', '-' or '.'")
    return name


def register(db: Database, name: str, origin: str = CREATED) -> None:
    """Write ``name`` down as a task pool (idempotent: the first origin is kept)."""
    db[COLLECTION].update_one(
        {"_id": name},
        {"$setOnInsert": {"origin": origin, "registered_at": _dt.datetime.now(_dt.timezone.utc)}},
        upsert=True,
    )


def is_known(db: Database, name: str) -> bool:
    return db[COLLECTION].count_documents({"_id": name}, limit=1) == 1


def known(db: Database) -> list[str]:
    """The registered pools, sorted by name."""
    return sorted(d["_id"] for d in db[COLLECTION].find({}, {"_id": 1}))


def forget(db: Database, name: str) -> None:
    db[COLLECTION].delete_one({"_id": name})
