"""The handler cache: a handler built once per configuration, for every worker.

Qlib's ``replace_task_handler_with_cache`` pickles a built handler to a local
directory and points the task at the file; that only helps workers sharing that
disk. Here a built handler is stored in GridFS (bucket ``handler_cache`` of the
settings' Mongo database), keyed by a hash of its class and configuration, so any
worker of the cluster loads it instead of building it again; each process also keeps
the last few handlers in memory. Handlers are decoded through
:func:`qcelery.serial.restricted_loads` (plus ``settings.allowed_modules``).

With ``cache_dir`` (Qlib's argument) a directory is a cache layer too, between this
process' memory and GridFS: handlers are pickled there as ``<key>.pkl`` (and decoded
through the same restricted unpickler), useful without a Mongo server or on a shared disk.

One build per configuration for the whole cluster: a worker that misses the cache takes a
build lease on the key (a document in ``qcelery_handler_builds``, kept alive while it
builds) and the others that miss meanwhile wait for its copy in GridFS instead of building
the same handler again; if the builder dies, its lease runs out (``settings.lease_seconds``)
and a waiting worker takes it over. If its build raises, the lease is released and the next
worker builds. Change :data:`DATA_VERSION` when the data a handler produces changes, so old
entries are no longer found.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import datetime as _dt
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from pymongo.errors import PyMongoError

from ..canonical import filter_hash, normalize
from ..errors import ConfigError, TaskTypeError
from ..instance import get_callable_kwargs, init_instance_by_config
from ..serial import dumps, restricted_loads

log = logging.getLogger(__name__)

__all__ = ["HandlerCache", "handler_key", "replace_task_handler_with_cache", "DATA_VERSION", "BUCKET"]

#: GridFS bucket of the cached handlers
BUCKET = "handler_cache"
#: the builds under way: ``{_id: <handler key>, owner: "host:pid", until: <lease end>}``
BUILDS = "qcelery_handler_builds"
#: how often a worker waiting for another's build looks for its copy
_WAIT_POLL = 0.5
#: part of every key: bump when handlers built from the same config produce other data
DATA_VERSION = 1
_LRU_SIZE = 4

_lru: collections.OrderedDict[str, Any] = collections.OrderedDict()
_lru_lock = threading.Lock()


def _canonical_kwargs(kwargs: Mapping[str, Any]) -> dict:
    out = {}
    for key, value in kwargs.items():
        if isinstance(key, str) and key.endswith("_time") and value is not None:
            # "2020-01-02", date(2020, 1, 2) and Timestamp("2020-01-02") are one config
            with contextlib.suppress(TypeError, ValueError):
                value = pd.Timestamp(value).isoformat()
        elif hasattr(value, "dates") and hasattr(value, "future_dates"):  # a TradingCalendar
            value = {"dates": [d.isoformat() for d in value.future_dates]}
        out[key] = value
    return out


def handler_key(config: Mapping[str, Any]) -> str:
    """``<class>.<hash>`` of a handler config: same class, module and kwargs, same key."""
    klass, kwargs = get_callable_kwargs(config)
    ident = {
        "class": f"{klass.__module__}.{klass.__qualname__}",
        "kwargs": _canonical_kwargs(kwargs),
        "version": DATA_VERSION,
    }
    return f"{klass.__qualname__}.{filter_hash(normalize(ident))[:20]}"


def _remember(key: str, handler: Any) -> None:
    with _lru_lock:
        _lru[key] = handler
        _lru.move_to_end(key)
        while len(_lru) > _LRU_SIZE:
            _lru.popitem(last=False)


def _recall(key: str) -> Any:
    with _lru_lock:
        handler = _lru.get(key)
        if handler is not None:
            _lru.move_to_end(key)
        return handler


def clear_memory() -> None:
    """Forget the handlers kept in this process (the GridFS copies stay)."""
    with _lru_lock:
        _lru.clear()


class HandlerCache:
    """Handlers by configuration: this process' memory, then ``cache_dir``, then GridFS,
    else built and stored.

    ``settings`` names the Mongo database (and ``allowed_modules``); without it GridFS is
    not used. ``cache_dir`` adds a directory of pickled handlers. ``stats`` counts
    ``memory`` / ``dir`` / ``store`` hits and ``built`` handlers (``waited``: store hits
    that waited for another worker's build).
    """

    def __init__(self, settings: Any = None, cache_dir: str | os.PathLike[str] | None = None):
        self.settings = settings
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.stats: collections.Counter[str] = collections.Counter()

    def _fs(self) -> Any:
        import gridfs

        from ..store import database

        return gridfs.GridFS(database(self.settings), collection=BUCKET)

    def get(self, config: Mapping[str, Any]) -> Any:
        """The handler ``config`` describes (``class`` / ``module_path`` / ``kwargs``)."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"a handler config must be a mapping with 'class', got {type(config).__name__}")
        key = handler_key(config)
        handler = _recall(key)
        if handler is not None:
            self.stats["memory"] += 1
            return handler
        for layer, load in (("dir", self._load_file), ("store", self._load)):
            handler = load(key)
            if handler is not None:
                self.stats[layer] += 1
                _remember(key, handler)
                if layer == "store":
                    self._store_file(key, handler)
                return handler
        handler = self._build(key, config) if self.settings is None else self._build_once(key, config)
        self._store_file(key, handler)
        _remember(key, handler)
        return handler

    def _build(self, key: str, config: Mapping[str, Any]) -> Any:
        t0 = time.monotonic()
        handler = init_instance_by_config(copy.deepcopy(dict(config)))
        log.info("built handler %s in %.2fs", key, time.monotonic() - t0)
        self.stats["built"] += 1
        return handler

    def _build_once(self, key: str, config: Mapping[str, Any]) -> Any:
        """Build and store the handler under a build lease on ``key``, or, while another
        worker holds that lease, wait for the copy it stores.

        The builder stores its copy before it releases the lease, and a worker that gets the
        lease looks in the store once more before building, so a handler is built again only
        when a builder failed or its lease ran out (it died, or stopped renewing)."""
        builds = self._builds()
        lease = float(getattr(self.settings, "lease_seconds", 60.0))
        waited = False
        while True:
            if self._claim_build(builds, key, lease):
                try:
                    handler = self._load(key)  # stored between our last look and the claim
                    if handler is not None:
                        self.stats["store"] += 1
                        return handler
                    with self._build_lease_kept(builds, key, lease):
                        handler = self._build(key, config)
                        self._store(key, handler)
                    return handler
                finally:
                    # the store away now: the lease runs out by itself, and the build's own outcome is what counts
                    with contextlib.suppress(PyMongoError):
                        builds.delete_one({"_id": key, "owner": _owner()})
            if not waited:
                log.info("handler %s is being built by %s; waiting for its copy", key, (builds.find_one({"_id": key}) or {}).get("owner"))
                waited = True
            time.sleep(_WAIT_POLL)
            handler = self._load(key)
            if handler is not None:
                self.stats["store"] += 1
                self.stats["waited"] += 1
                return handler

    def _builds(self) -> Any:
        from ..store import database

        return database(self.settings)[BUILDS]

    @staticmethod
    def _claim_build(builds: Any, key: str, lease: float) -> bool:
        """Take the build lease on ``key``: free, or run out (its holder stopped renewing it)."""
        from pymongo.errors import DuplicateKeyError

        now = _utcnow()
        until = now + _dt.timedelta(seconds=lease)
        try:
            builds.insert_one({"_id": key, "owner": _owner(), "until": until})
            return True
        except DuplicateKeyError:
            taken = builds.update_one({"_id": key, "until": {"$lt": now}}, {"$set": {"owner": _owner(), "until": until}})
            return bool(taken.modified_count == 1)

    @staticmethod
    @contextlib.contextmanager
    def _build_lease_kept(builds: Any, key: str, lease: float) -> Iterator[None]:
        """Renew the build lease every third of it while the block runs (a build may take longer)."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(lease / 3):
                with contextlib.suppress(Exception):  # the store away for a moment: the next renewal may pass
                    builds.update_one({"_id": key, "owner": _owner()}, {"$set": {"until": _utcnow() + _dt.timedelta(seconds=lease)}})

        thread = threading.Thread(target=renew, name=f"handler-build-lease-{key}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _decode(self, data: bytes, where: str) -> Any:
        return restricted_loads(data, getattr(self.settings, "allowed_modules", None) or (), context=f"handler cache entry {where}")

    def _load(self, key: str) -> Any:
        if self.settings is None:
            return None
        fs = self._fs()
        found = fs.find_one({"filename": key})
        if found is None:
            return None
        return self._decode(found.read(), repr(key))

    def _load_file(self, key: str) -> Any:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.pkl"
        if not path.is_file():
            return None
        return self._decode(path.read_bytes(), str(path))

    def _store_file(self, key: str, handler: Any) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.cache_dir / f"{key}.pkl"
        # written aside, then renamed: a reader never sees half a handler
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_pickled(handler))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("stored handler %s in %s", key, path)

    def _store(self, key: str, handler: Any) -> None:
        fs = self._fs()
        if fs.exists({"filename": key}):
            return
        data = _pickled(handler)
        fs.put(data, filename=key, handler_class=type(handler).__qualname__, data_version=DATA_VERSION)
        log.info("stored handler %s in GridFS bucket %r (%.1f MB)", key, BUCKET, len(data) / 1e6)

    def remove(self, config: Mapping[str, Any] | None = None) -> int:
        """Delete the stored copies of ``config``'s handler (all handlers when ``None``)."""
        if self.settings is None:
            return 0
        fs = self._fs()
        query = {} if config is None else {"filename": handler_key(config)}
        ids = [f._id for f in fs.find(query)]
        for fid in ids:
            fs.delete(fid)
        clear_memory()
        return len(ids)


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pickled(handler: Any) -> bytes:
    configure = getattr(handler, "config", None)
    if callable(configure):  # a Serializable: keep its data in this pickle
        configure(dump_all=True)
    try:
        return dumps(handler)
    finally:
        if callable(configure):
            configure(dump_all=False)


def replace_task_handler_with_cache(
    task: Mapping[str, Any], cache: HandlerCache | Any = None, *, cache_dir: str | os.PathLike[str] | None = None
) -> dict:
    """A copy of ``task`` whose ``dataset.kwargs.handler`` config is replaced by the
    built handler, taken from ``cache`` (a :class:`HandlerCache`, or settings to make
    one; ``None``: this process' memory only).

    Qlib's call ``replace_task_handler_with_cache(task, cache_dir)`` (also as a
    keyword) works: the handler is pickled in that directory and reused from there.
    Unlike Qlib, the handler is not replaced by a local file path but by the object
    (so no worker unpickles a path taken from task data); a task whose handler is not a
    config is returned unchanged (copied).
    """
    if isinstance(cache, (str, os.PathLike)):  # Qlib's positional cache_dir
        if cache_dir is not None:
            raise TaskTypeError("give the cache directory once: replace_task_handler_with_cache(task, cache_dir=...)")
        cache, cache_dir = None, cache
    if not isinstance(cache, HandlerCache):
        cache = HandlerCache(cache, cache_dir=cache_dir)
    elif cache_dir is not None:
        raise TaskTypeError("give either a HandlerCache or cache_dir (make the HandlerCache with cache_dir=...)")
    new = dict(task)
    dataset = task.get("dataset")
    if not isinstance(dataset, Mapping) or not isinstance(dataset.get("kwargs"), Mapping):
        return new
    handler = dataset["kwargs"].get("handler")
    if not isinstance(handler, Mapping):
        return new
    new["dataset"] = {**dataset, "kwargs": {**dataset["kwargs"], "handler": cache.get(handler)}}
    return new
