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

Two workers that miss the cache at the same moment both build and both store: the
copies are identical and either is used. Change :data:`DATA_VERSION` when the data a
handler produces changes, so old entries are no longer found.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..canonical import filter_hash, normalize
from ..errors import ConfigError, TaskTypeError
from ..instance import get_callable_kwargs, init_instance_by_config
from ..serial import dumps, restricted_loads

log = logging.getLogger(__name__)

__all__ = ["HandlerCache", "handler_key", "replace_task_handler_with_cache", "DATA_VERSION", "BUCKET"]

#: GridFS bucket of the cached handlers
BUCKET = "handler_cache"
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
    ``memory`` / ``dir`` / ``store`` hits and ``built`` handlers.
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
        t0 = time.monotonic()
        handler = init_instance_by_config(copy.deepcopy(dict(config)))
        log.info("built handler %s in %.2fs", key, time.monotonic() - t0)
        self.stats["built"] += 1
        self._store_file(key, handler)
        if self.settings is not None:
            self._store(key, handler)
        _remember(key, handler)
        return handler

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
