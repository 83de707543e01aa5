"""The task pool: Qlib's ``TaskManager`` on MongoDB, with leases and fencing.

A task document::

    {_id, def: <pickle>, filter: <normalised def>, filter_hash: <sha256>, status,
     res: <pickle> | gridfs_result: <GridFS id> (absent until committed), priority, attempt, attempt_base,
     max_attempts, lease_until, worker, claimed_from, error, batch_ids: [...],
     created_at, updated_at, started_at, finished_at, published_at}

What differs from Qlib:

* ``create_task`` deduplicates on a unique hash of the canonical filter and inserts in
  bulk, so concurrent producers end with one document per task;
* every claim (``fetch_task`` for the pull loop, ``claim`` for Celery) sets a lease and
  increments ``attempt``; ``heartbeat`` extends the lease, and ``commit``/``fail`` are
  fenced on ``attempt`` so a worker whose lease was recovered cannot write any more
  (these live in :mod:`qcelery.lease`);
* ``recover_expired`` returns crashed workers' tasks to ``waiting`` (or ``failed`` once
  ``max_attempts`` is used up), which Qlib leaves ``running`` forever;
* ``def``/``res`` are decoded through an allow-listing unpickler and big results live
  in GridFS; ``task_stat`` is one aggregation and ``wait`` polls counts, not documents;
* the pool stays readable by Qlib's own ``TaskManager``, which unpickles every field whose
  name starts with ``def`` or ``res``: ``res`` is absent until a result is committed (not
  ``None``), and a result kept in GridFS is named by ``gridfs_result`` (``res_file`` before,
  still read).
"""

from __future__ import annotations

import builtins  # TaskManager.list (Qlib's name) hides the builtin in the class body
import collections
import concurrent.futures
import contextlib
import datetime as _dt
import logging
import pprint
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, overload

import bson
import pymongo
from bson import Binary, ObjectId
from bson.errors import InvalidDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure, PyMongoError

from . import counts, registry
from . import status as st
from .canonical import canonical_json, filter_hash, hash_text, normalize
from .errors import (
    DecodeError,
    ForeignCollectionError,
    PermanentTaskError,
    QceleryError,
    ResultEncodeError,
    TaskDefinitionError,
    TaskNotFoundError,
    TaskTypeError,
    UnknownPoolError,
    UnsafePickleError,
)
from .instance import check_task_names
from .lease import RESEND, Heartbeat, Leases, claims_in_two_steps, utcnow, worker_name
from .serial import dumps, restricted_loads
from .settings import Settings, load_settings
from .store import LEGACY_RESULT_FILE, RESULT_BUCKET, RESULT_FILE, database, result_file, result_fs, scans_find_and_modify, to_object_id

logger = logging.getLogger(__name__)

_INSERT_CHUNK = 1000
_MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
_BSON_PER_JSON_CHAR = 8
_INDEXES = [
    pymongo.IndexModel("filter_hash", unique=True, name="dedup"),
    pymongo.IndexModel([("status", 1), ("priority", -1)], name="fetch"),
    pymongo.IndexModel([("status", 1), ("lease_until", 1)], name="recover"),
    pymongo.IndexModel([("status", 1), ("published_at", 1)], name="sweep"),
    # a batch's tasks by status, and its window (dispatched = published_at set): qcelery.dispatch
    pymongo.IndexModel([("batch_ids", 1), ("status", 1), ("published_at", 1)], name="batch_window"),
]
#: the tasks whose result is a GridFS file (under either field name)
_REFERS_TO_FILE = {"$or": [{RESULT_FILE: {"$ne": None}}, {LEGACY_RESULT_FILE: {"$ne": None}}]}
# SecantusDB answers a large $in in quadratic time; small chunks keep lookups linear
_LOOKUP_CHUNK = 100
# server codes meaning "this query is malformed": BadValue, FailedToParse, TypeMismatch,
# invalid regex, $where without a script engine
_QUERY_ERROR_CODES = frozenset({2, 9, 14, 51091, 6108304})


class TaskManager(Leases):
    """A pool of tasks in one MongoDB collection (Qlib's ``TaskManager``).

    ``task_pool`` names the collection; ``settings`` says which server and database
    (default: built from the environment once, here). ``self.task_pool`` is the
    pymongo collection, as in Qlib.
    """

    STATUS_WAITING = st.WAITING
    STATUS_RUNNING = st.RUNNING
    STATUS_PART_DONE = st.PART_DONE
    STATUS_DONE = st.DONE
    STATUS_FAILED = st.FAILED

    ENCODE_FIELDS_PREFIX = ["def", "res"]

    def __init__(self, task_pool: str, settings: Settings | None = None, *, create: bool = True):
        registry.check_name(task_pool)
        self.settings = settings or load_settings()
        self.name = task_pool
        self.db = database(self.settings, ping=True)
        self.task_pool: pymongo.collection.Collection[dict[str, Any]] = self.db[task_pool]
        self._claim_in_two_steps = claims_in_two_steps(self.settings)
        # SecantusDB answers a large $in in quadratic time; MongoDB takes big ones at once
        self._lookup_chunk = _LOOKUP_CHUNK if scans_find_and_modify(self.settings) else _INSERT_CHUNK
        self._fetch_cache: tuple[dict, float, collections.deque] | None = None
        if create:
            self._create_or_check()
        elif not registry.is_known(self.db, task_pool):
            raise UnknownPoolError(
                f"no task pool {task_pool!r} in database {self.settings.mongo_db!r} (pools: {', '.join(registry.known(self.db)) or 'none'})"
            )

    @classmethod
    def open(cls, task_pool: str, settings: Settings | None = None) -> TaskManager:
        """The existing pool ``task_pool``; :class:`UnknownPoolError` when qcelery never
        created or adopted it. Writes nothing (no collection, no index): what workers, beat
        and the admin commands use, so a message or a typo naming another collection cannot
        create or alter it."""
        return cls(task_pool, settings, create=False)

    def _create_or_check(self) -> None:
        """Qlib's ``TaskManager(name)``: make ``name`` a pool (indexes, registry) unless the
        collection holds documents qcelery did not write, which are refused, not indexed."""
        if not registry.is_known(self.db, self.name):
            indexes = self.task_pool.index_information()
            if "dedup" in indexes:  # a pool of a qcelery release before the registry
                origin = registry.FOUND
            elif self.task_pool.find_one({}, {"_id": 1}) is None:
                origin = registry.CREATED
            else:
                raise ForeignCollectionError(
                    f"collection {self.name!r} in database {self.settings.mongo_db!r} holds documents qcelery did not write, "
                    f"so it is not taken for a task pool; if Qlib's TaskManager filled it, adopt it with `qcelery adopt {self.name}` "
                    "(TaskManager.adopt), else choose another pool name"
                )
            self._ensure_indexes()
            registry.register(self.db, self.name, origin)
            return
        self._ensure_indexes()

    def _ensure_indexes(self) -> None:
        # one round trip, on every construction: a pool dropped and re-created in the
        # same process must get its unique index back, or producers could race in twins
        self.task_pool.create_indexes(_INDEXES)

    @classmethod
    def adopt(cls, task_pool: str, settings: Settings | None = None) -> tuple[TaskManager, int]:
        """Make a pool that Qlib's ``TaskManager`` filled a qcelery pool, in place; returns
        the manager and how many tasks were adopted (0 when it is a pool already).

        Every task gets the fields qcelery keeps (the hash of its definition, so new tasks
        are deduplicated against it, an attempt budget, no batch); Qlib's own fields
        (``def``, ``filter``, ``status``, ``res``, ``priority``) are left as they are, so
        Qlib can go on reading the pool. A ``running`` task is taken as claimed now: if no
        one commits it within one lease, beat returns it to ``waiting``. Every document is
        checked (it decodes through the allow-list, its status is Qlib's) before the first
        write; an adoption cut off half-way is completed by running it again."""
        registry.check_name(task_pool)
        settings = settings or load_settings()
        db = database(settings, ping=True)
        if registry.is_known(db, task_pool):
            return cls.open(task_pool, settings), 0
        coll = db[task_pool]
        if coll.find_one({}, {"_id": 1}) is None:
            raise UnknownPoolError(f"collection {task_pool!r} in database {settings.mongo_db!r} is empty or absent: nothing to adopt")
        where = f"collection {task_pool!r} in database {settings.mongo_db!r}"
        seen = {d["filter_hash"]: d["_id"] for d in coll.find({"filter_hash": {"$exists": True}}, {"filter_hash": 1})}
        plans: list[tuple[ObjectId, dict]] = []
        now = utcnow()
        for d in coll.find({"filter_hash": {"$exists": False}}, {"res": 0}):
            if not isinstance(d.get("def"), (bytes, Binary)) or d.get("status") not in st.ALL:
                raise ForeignCollectionError(
                    f"{where}: document {d['_id']} is not a Qlib task (no pickled 'def', or a status outside "
                    f"{', '.join(st.ALL)}); nothing adopted"
                )
            try:
                task_def = restricted_loads(bytes(d["def"]), settings.allowed_modules, context=f"task {d['_id']} of {where}")
            except UnsafePickleError:
                raise
            except Exception as exc:  # any decoding failure: say which task, write nothing
                raise DecodeError(f"{where}: task {d['_id']} could not be decoded ({type(exc).__name__}: {exc}); nothing adopted") from exc
            fhash = filter_hash(normalize(task_def))
            if fhash in seen:  # Qlib allowed twins; the unique index cannot, so the later one keeps its own hash
                logger.warning("%s: task %s duplicates task %s; kept, never matched by create_task", where, d["_id"], seen[fhash])
                fhash = f"duplicate:{d['_id']}"
            seen[fhash] = d["_id"]
            fields: dict[str, Any] = {
                "filter_hash": fhash, "priority": d.get("priority", 0), "attempt": 0, "attempt_base": 0,
                "max_attempts": settings.max_attempts, "lease_until": None, "worker": None, "claimed_from": None, "error": None,
                "batch_ids": [], "created_at": now, "updated_at": now, "started_at": None, "finished_at": None, "published_at": None,
            }  # fmt: skip
            if d["status"] == st.RUNNING:
                fields.update(attempt=1, claimed_from=st.WAITING, started_at=now,
                              lease_until=now + _dt.timedelta(seconds=settings.lease_seconds))  # fmt: skip
            plans.append((d["_id"], {k: v for k, v in fields.items() if k not in d or k == "filter_hash"}))
        for oid, fields in plans:
            coll.update_one({"_id": oid, "filter_hash": {"$exists": False}}, {"$set": fields})
        coll.create_indexes(_INDEXES)
        registry.register(db, task_pool, registry.ADOPTED)
        # Qlib's tasks belong to no batch; a collection that held batch tasks before (a pool
        # forgotten, then adopted) has batches whose counters did not follow: recount them
        counts.mark_dirty(db, [d["_id"] for d in db[counts.COLLECTION].find({"pool": task_pool}, {"_id": 1})])
        logger.info("%s: adopted as a task pool (%d tasks)", where, len(plans))
        return cls.open(task_pool, settings), len(plans)

    def __str__(self) -> str:
        return f"TaskManager({self.settings.mongo_db}.{self.name})"

    __repr__ = __str__

    # ------------------------------------------------------------------ listing
    @staticmethod
    def list(settings: Settings | None = None) -> list[str]:
        """Names of the task pools qcelery created or adopted in the database (not every
        collection, as Qlib lists: GridFS buckets and a user's collections are no pools)."""
        return registry.known(database(settings or load_settings(), ping=True))

    # ---------------------------------------------------------------- encoding
    def _encode_def(self, task_def: Any, index: int | None = None) -> Binary:
        where = "task definition" if index is None else f"task definition #{index}"
        if not isinstance(task_def, dict):
            raise TaskTypeError(f"{where} must be a dict (Qlib's model/dataset/record config), got {type(task_def).__name__}")
        # task data is never code: a definition naming a module outside the allow-list is
        # refused here, before anything is written (judged by name; nothing is imported)
        check_task_names(task_def, self.settings.allowed_modules, where=f"{where} for pool {self.name!r}")
        try:
            data = dumps(task_def)
        except Exception as exc:  # pickling runs user __reduce__ code; report which task
            raise TaskDefinitionError(f"{where} cannot be pickled: {exc}") from exc
        if len(data) > self.settings.max_def_bytes:
            raise TaskDefinitionError(
                f"{where} is {len(data):,} bytes pickled, above the limit of {self.settings.max_def_bytes:,} "
                "(a MongoDB document holds at most 16 MB): keep data out of the definition and load it in the task"
            )
        return Binary(data)  # type: ignore[no-any-return]  # bson types Binary() with typing.Self, absent from the 3.10 target

    def _decode_field(self, task: dict, field: str) -> Any:
        raw = task.get(field)
        if raw is None:
            return None
        context = f"task {task.get('_id')} in pool {self.name!r}, field {field!r}"
        try:
            return restricted_loads(bytes(raw), self.settings.allowed_modules, context=context)
        except UnsafePickleError:
            raise
        except Exception as exc:
            raise DecodeError(f"{context} could not be decoded: {type(exc).__name__}: {exc}") from exc

    @overload
    def _decode_task(self, task: dict) -> dict: ...
    @overload
    def _decode_task(self, task: None) -> None: ...
    def _decode_task(self, task: dict | None) -> dict | None:
        if task is None:
            return None
        task = dict(task)
        task["def"] = self._decode_field(task, "def")
        fid = result_file(task)
        if fid is not None:
            try:
                raw = result_fs(self.db).get(fid).read()
            except Exception as exc:
                raise DecodeError(f"task {task['_id']} in pool {self.name!r}: result file {fid} unreadable: {exc}") from exc
            task["res"] = raw
        task["res"] = self._decode_field(task, "res")
        return task

    def _encode_res(self, res: Any, task_id: ObjectId) -> tuple[dict, ObjectId | None]:
        """The update (``$set`` and ``$unset``) storing a result, and the GridFS file written
        (to undo on a lost race). The field not used is unset, never ``None`` (Qlib would
        unpickle a ``res: None``). A result that cannot be pickled raises
        :class:`ResultEncodeError` before anything is written."""
        try:
            data = dumps(res)
        except Exception as exc:  # pickling runs the result's own code (__reduce__, __getstate__)
            raise ResultEncodeError(
                f"task {task_id} in pool {self.name!r}: its result, a {type(res).__module__}.{type(res).__qualname__}, "
                f"cannot be pickled ({type(exc).__name__}: {exc}); return plain data, arrays, frames or picklable objects"
            ) from exc
        if len(data) > self.settings.gridfs_threshold:
            fid = result_fs(self.db).put(data, task_id=task_id, pool=self.name)
            return {"$set": {RESULT_FILE: fid}, "$unset": {"res": "", LEGACY_RESULT_FILE: ""}}, fid
        return {"$set": {"res": Binary(data)}, "$unset": {RESULT_FILE: "", LEGACY_RESULT_FILE: ""}}, None

    def _drop_res_file(self, fid: Any) -> None:
        if fid is not None:
            with contextlib.suppress(PyMongoError):
                result_fs(self.db).delete(fid)

    def drop_orphan_result_files(self, older_than: float) -> int:
        """Delete this pool's GridFS result files that no task refers to and that were
        written more than ``older_than`` seconds ago; returns how many.

        A commit writes its result file before the fenced update that points the task at
        it. A worker killed between the two, or a commit whose update was lost with its
        connection and then retried (writing a second file), leaves a file behind. Files
        younger than ``older_than`` are kept: their commit may still be under way."""
        cutoff = utcnow() - _dt.timedelta(seconds=older_than)
        old = [f["_id"] for f in self.db[f"{RESULT_BUCKET}.files"].find({"pool": self.name, "uploadDate": {"$lt": cutoff}}, {"_id": 1})]
        if not old:
            return 0
        # one pass over the pool's references (read after the files: a file referenced
        # meanwhile is kept), not one query per chunk of files
        used = {result_file(d) for d in self.task_pool.find(_REFERS_TO_FILE, {RESULT_FILE: 1, LEGACY_RESULT_FILE: 1})}
        fs = result_fs(self.db)
        dropped = 0
        for fid in old:
            if fid not in used:
                fs.delete(fid)
                dropped += 1
        if dropped:
            logger.info("pool %s: deleted %d result files no task refers to", self.name, dropped)
        return dropped

    # ------------------------------------------------------------------ queries
    def _decode_query(self, query: Any) -> dict:
        """The query as sent to the server: ids as ``ObjectId``, ``filter...`` operands
        normalised like stored filters, statuses and operators checked here (so every
        server, and every method, refuses a malformed query the same way)."""
        if query is None:
            return {}
        if not isinstance(query, Mapping):
            raise TaskTypeError(f"query must be a dict, got {type(query).__name__}: {query!r}")
        try:
            return _decode_query_doc(query)
        except _MalformedQuery as exc:
            raise TaskDefinitionError(f"malformed query {query!r} on pool {self.name!r}: {exc}") from None

    def _find(self, query: dict, **kwargs: Any) -> pymongo.cursor.Cursor:
        return self.task_pool.find(query, **kwargs)

    @contextlib.contextmanager
    def _server_checks(self, query: Any) -> Iterator[None]:
        """Turn the server's refusal of a query (``{"$foo": 1}``) into a clear error."""
        try:
            yield
        except OperationFailure as exc:
            if exc.code in _QUERY_ERROR_CODES:
                raise TaskDefinitionError(
                    f"malformed query {query!r} on pool {self.name!r}: {exc.details.get('errmsg', exc) if exc.details else exc}"
                ) from None
            raise

    def query(self, query: dict | None = None, decode: bool = True) -> Iterator[dict]:
        """Iterate over the tasks matching ``query`` (decoded unless ``decode=False``).
        Unlike Qlib, a malformed query raises here, not at the first ``next()``."""
        q = self._decode_query(query)
        with self._server_checks(query):
            cursor = self._find(q)
            first = next(cursor, None)
        return self._iter_query(query, cursor, first, decode)

    def _iter_query(self, query: Any, cursor: pymongo.cursor.Cursor, first: dict | None, decode: bool) -> Iterator[dict]:
        if first is None:
            return
        yield self._decode_task(first) if decode else first
        with self._server_checks(query):
            for t in cursor:
                yield self._decode_task(t) if decode else t

    def re_query(self, _id: Any) -> dict:
        """The task with id ``_id`` (decoded); :class:`TaskNotFoundError` if none."""
        t = self.task_pool.find_one({"_id": to_object_id(_id)})
        if t is None:
            raise TaskNotFoundError(f"no task {_id} in pool {self.name!r}")
        return self._decode_task(t)

    def get_raw(self, _id: Any, projection: Iterable[str] | None = None) -> dict | None:
        """The stored document (undecoded), or ``None``."""
        return self.task_pool.find_one({"_id": to_object_id(_id)}, projection=list(projection) if projection else None)

    # ------------------------------------------------------------------ inserts
    def _new_doc(self, task_def: dict, encoded: Binary, filt: Any, fhash: str, now: _dt.datetime) -> dict:
        return {
            "def": encoded,
            "filter": filt,
            "filter_hash": fhash,
            "status": st.WAITING,
            "priority": 0,
            "attempt": 0,
            "attempt_base": 0,
            "max_attempts": self.settings.max_attempts,
            "lease_until": None,
            "worker": None,
            "claimed_from": None,
            "error": None,
            "batch_ids": [],
            "created_at": now,
            "updated_at": now,
            "started_at": None,
            "finished_at": None,
            "published_at": None,
        }

    def insert_task(self, task: dict) -> pymongo.results.InsertOneResult:
        """Insert an already encoded task document (Qlib's low-level insert).

        Unlike Qlib, its ``filter`` is normalised and hashed (so ``create_task`` finds it
        and an identical task is refused); a document without ``filter`` gets a hash of
        its own. As with pymongo, ``task`` receives the new ``_id``."""
        if not isinstance(task, dict):
            raise TaskTypeError(f"task must be a dict, got {type(task).__name__}")
        doc = dict(task)
        if "filter_hash" not in doc:
            if "filter" in doc:
                doc["filter"] = normalize(doc["filter"])
                doc["filter_hash"] = filter_hash(doc["filter"])
            else:  # nothing to deduplicate on; a null hash would collide in the unique index
                doc["filter_hash"] = f"unfiltered:{ObjectId()}"
        try:
            result = self.task_pool.insert_one(doc)
        except InvalidDocument as exc:
            raise TaskDefinitionError(f"task document is not valid BSON: {exc}") from None
        except DuplicateKeyError:
            raise TaskDefinitionError(f"a task with the same filter already exists in pool {self.name!r}") from None
        task["_id"] = result.inserted_id
        for bid in doc.get("batch_ids") or ():  # a raw document may name batches: count it in theirs
            counts.add(self.db, bid, {str(doc.get("status")): 1})
        return result

    def insert_task_def(self, task_def: dict) -> pymongo.results.InsertOneResult:
        """Insert one task definition as a new ``waiting`` task (no dedup check, as in Qlib,
        but the unique filter hash still refuses an exact duplicate)."""
        encoded = self._encode_def(task_def)
        filt = normalize(task_def)
        text = canonical_json(filt)
        doc = self._new_doc(task_def, encoded, filt, hash_text(text), utcnow())
        self._check_doc_size(doc, text, None)
        try:
            return self.task_pool.insert_one(doc)
        except DuplicateKeyError:
            raise TaskDefinitionError(f"an identical task already exists in pool {self.name!r}; use create_task to reuse it") from None

    @staticmethod
    def _check_doc_size(doc: dict, filter_text: str, index: int | None) -> None:
        """Refuse, before any write, a task whose document would exceed MongoDB's limit:
        ``def`` is stored pickled *and* normalised as ``filter``."""
        # a BSON filter takes at most ~6.5 bytes per character of its JSON text (one-digit
        # list items); below that bound the exact (costly) encoding is not needed
        if len(doc["def"]) + _BSON_PER_JSON_CHAR * len(filter_text) + 4096 <= _MAX_DOCUMENT_BYTES:
            return
        size = len(bson.encode(doc))
        if size > _MAX_DOCUMENT_BYTES:
            where = "task definition" if index is None else f"task definition #{index}"
            raise TaskDefinitionError(
                f"{where} makes a task document of {size:,} bytes, above the 16 MB a MongoDB document holds "
                f"(it is stored twice: pickled as 'def' and normalised as 'filter', {len(doc['def']):,} bytes "
                "pickled): keep data out of the definition and load it in the task"
            )

    def create_task(self, task_def_l: builtins.list[dict], dry_run: bool = False, print_nt: bool = False) -> builtins.list[ObjectId]:
        """Insert the new tasks of ``task_def_l`` and return every task's id, in input order.

        As in Qlib, a task whose filter already exists is not inserted again and its
        existing id is returned; with ``dry_run`` nothing is written and ``[]`` is returned
        (use :meth:`plan` to see what is new). Every definition is type-checked, and every
        new one encoded and size-checked, before the first write, so bad input leaves the
        pool untouched (a duplicate is not pickled again: the pool has it). Work is a few
        round trips per thousand tasks (Qlib: two per task, one of them a collection scan),
        and concurrent producers of the same tasks end with one document each.
        """
        return self.create_tasks(task_def_l, dry_run=dry_run, print_nt=print_nt)[0]

    def check_defs(self, task_def_l: Iterable[Any], index_base: int = 0) -> int:
        """Check definitions as ``create_task`` would before writing (type, allow-list,
        pickling, document size), writing nothing; the count checked. The first bad one
        raises, named by its position counted from ``index_base``."""
        n = 0
        for n, t in enumerate(task_def_l, start=1):
            i = index_base + n - 1
            encoded = self._encode_def(t, i)
            f = normalize(t)
            self._check_doc_size(self._new_doc(t, encoded, f, "", utcnow()), canonical_json(f), i)
        return n

    def create_tasks(
        self,
        task_def_l: builtins.list[dict],
        dry_run: bool = False,
        print_nt: bool = False,
        batch_id: ObjectId | None = None,
        index_base: int = 0,
        look_up: bool = True,
    ) -> tuple[builtins.list[ObjectId], set[ObjectId]]:
        """``create_task`` that also returns the set of ids it inserted; new tasks are born
        tagged with ``batch_id``, with no message yet (the batch's queue sends them).
        ``index_base``: the position of the first definition in a longer input, for errors.
        ``look_up=False`` skips asking which exist first (a producer streaming into a pool
        that was empty when it began): the unique index still catches any that do."""
        if isinstance(task_def_l, dict) or not isinstance(task_def_l, (list, tuple)):
            raise TaskTypeError(f"task_def_l must be a list of task definitions, got {type(task_def_l).__name__}")
        for i, t in enumerate(task_def_l):
            if not isinstance(t, dict):
                self._encode_def(t, index_base + i)  # raises the type error naming the position
        filters = [normalize(t) for t in task_def_l]
        texts = [canonical_json(f) for f in filters]
        hashes = [hash_text(x) for x in texts]
        first: dict[str, int] = {}
        for i, h in enumerate(hashes):
            first.setdefault(h, i)

        # which exist already; an empty pool needs no look-up (a concurrent producer's
        # inserts are caught by the unique index below either way)
        ids = self._ids_by_hash(first) if look_up and self.task_pool.find_one({}, {"_id": 1}) is not None else {}
        new_idx = {h: i for h, i in first.items() if h not in ids}
        logger.info("pool %s: %d tasks, %d new", self.name, len(task_def_l), len(new_idx))
        now = utcnow()
        docs = []
        for h, i in new_idx.items():  # validate every new task before the first write
            doc = self._new_doc(task_def_l[i], self._encode_def(task_def_l[i], index_base + i), filters[i], h, now)
            self._check_doc_size(doc, texts[i], index_base + i)
            docs.append(doc)
        if print_nt:
            for i in new_idx.values():
                sys.stdout.write(pprint.pformat(task_def_l[i]) + "\n")
        if dry_run:
            return [], set()

        if batch_id is not None:  # queued in the batch (published_at None): qcelery.dispatch sends them
            for d in docs:
                d["batch_ids"] = [batch_id]
        self._fetch_cache = None
        lost: set[str] = set()
        for start in range(0, len(docs), _INSERT_CHUNK):
            chunk = docs[start : start + _INSERT_CHUNK]
            try:
                self.task_pool.insert_many(chunk, ordered=False)
            except BulkWriteError as exc:
                # another producer inserted some of these meanwhile: take its documents
                errors = exc.details.get("writeErrors", [])
                other = [e for e in errors if e.get("code") != 11000]
                if other:
                    raise TaskDefinitionError(f"insert into pool {self.name!r} failed: {other[0].get('errmsg')}") from None
                lost.update(chunk[e["index"]]["filter_hash"] for e in errors)
            except InvalidDocument as exc:
                raise TaskDefinitionError(f"task document is not valid BSON: {exc}") from None
        inserted = set()
        for d in docs:
            if d["filter_hash"] not in lost:
                ids[d["filter_hash"]] = d["_id"]
                inserted.add(d["_id"])
        if lost:
            ids.update(self._ids_by_hash(lost))
        return [ids[h] for h in hashes], inserted

    def plan(self, task_def_l: builtins.list[dict]) -> tuple[builtins.list[dict], builtins.list[dict]]:
        """Split ``task_def_l`` into (new, existing) definitions without writing anything;
        duplicates inside the list count once."""
        filters = [normalize(t) for t in task_def_l]
        hashes = [filter_hash(f) for f in filters]
        existing = self._ids_by_hash(set(hashes))
        seen: set[str] = set()
        new: builtins.list[dict] = []
        old: builtins.list[dict] = []
        for t, h in zip(task_def_l, hashes, strict=True):
            if h in seen:
                continue
            seen.add(h)
            (old if h in existing else new).append(t)
        return new, old

    def _ids_by_hash(self, hashes: Iterable[str]) -> dict[str, ObjectId]:
        out: dict[str, ObjectId] = {}
        hl = list(hashes)
        for start in range(0, len(hl), self._lookup_chunk):
            part = hl[start : start + self._lookup_chunk]
            for d in self.task_pool.find({"filter_hash": {"$in": part}}, {"filter_hash": 1}):
                out[d["filter_hash"]] = d["_id"]
        return out

    def replace_task(self, task: dict, new_task: dict) -> None:
        """Replace the task ``task`` by the task document ``new_task`` (``def``/``res``
        encoded here, as in Qlib). The filter (``new_task["filter"]``, else its ``def``)
        is normalised and re-hashed; a replacement whose filter another task already
        has is refused, since the pool holds one task per filter."""
        oid = to_object_id(task)
        new_task = dict(new_task)
        new_task.pop("_id", None)
        task_def = new_task.get("def")
        if "def" in new_task and not isinstance(task_def, (bytes, Binary)):
            new_task["def"] = self._encode_def(task_def)
        if "filter" in new_task or isinstance(task_def, dict):
            filt = normalize(new_task.get("filter", task_def))
            new_task["filter"], new_task["filter_hash"] = filt, filter_hash(filt)
        else:  # keep the task's hash: a missing one would collide in the unique index
            old = self.task_pool.find_one({"_id": oid}, {"filter_hash": 1}) or {}
            new_task["filter_hash"] = old.get("filter_hash") or f"unfiltered:{oid}"
        if "res" in new_task and new_task["res"] is None:
            del new_task["res"]  # absent, not None: Qlib's TaskManager unpickles every res* field
        if new_task.get("res") is not None and not isinstance(new_task["res"], (bytes, Binary)):
            new_task["res"] = Binary(dumps(new_task["res"]))
        new_task["updated_at"] = utcnow()
        before = self.task_pool.find_one({"_id": oid}, {"batch_ids": 1}) or {}
        try:
            self.task_pool.replace_one({"_id": oid}, new_task)
        except InvalidDocument as exc:
            raise TaskDefinitionError(f"replacement for task {oid} is not valid BSON: {exc}") from None
        except DuplicateKeyError:
            raise TaskDefinitionError(f"cannot replace task {oid} in pool {self.name!r}: another task already has that filter") from None
        # a whole new document: its status and batches may be anything, so its batches recount
        counts.mark_dirty(self.db, [*(before.get("batch_ids") or ()), *(new_task.get("batch_ids") or ())])

    # ------------------------------------------------------------------- admin
    def remove(self, query: dict | None = None) -> int:
        """Delete the tasks matching ``query`` (and their GridFS results); returns how many.
        Their batches recount their progress counters when next read."""
        q = self._decode_query(query)
        with self._server_checks(query):
            fids = [result_file(d) for d in self.task_pool.find({"$and": [q, _REFERS_TO_FILE]}, {RESULT_FILE: 1, LEGACY_RESULT_FILE: 1})]
            touched = counts.batches_of(self, q)
            n = self.task_pool.delete_many(q).deleted_count
        counts.mark_dirty(self.db, touched)
        for fid in fids:
            self._drop_res_file(fid)
        return n

    def task_stat(self, query: dict | None = None) -> dict[str, int]:
        """Number of tasks per status, in one aggregation."""
        q = self._decode_query(query)
        with self._server_checks(query):
            rows = self.task_pool.aggregate([{"$match": q}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}])
            return {r["_id"]: r["n"] for r in rows}

    def reset_waiting(self, query: dict | None = None) -> int:
        """Put ``running`` tasks (or those matching ``query``) back to ``waiting``, as Qlib
        does after workers died. Prefer :meth:`recover_expired`, which only takes expired leases."""
        q = dict(query or {})
        q.setdefault("status", st.RUNNING)
        return self.reset_status(q, st.WAITING)

    def reset_status(self, query: dict | None, status: str) -> int:
        """Set ``status`` on every task matching ``query`` (an admin override); returns the count.
        The batches of the tasks it moved recount their progress counters when next read."""
        st.check(status)
        q = self._decode_query(query)
        upd: dict[str, Any] = {"status": status, "updated_at": utcnow()}
        if status != st.RUNNING:
            upd.update(lease_until=None, worker=None)
        if status in st.CLAIMABLE:
            upd["published_at"] = RESEND  # the sweep sends their messages
        with self._server_checks(query):
            touched = counts.batches_of(self, {"$and": [q, {"status": {"$ne": status}}]})
            n = self.task_pool.update_many(q, {"$set": upd}).modified_count
        counts.mark_dirty(self.db, touched)
        logger.info("pool %s: %d tasks set to %s", self.name, n, status)
        return n

    def retry_failed(self, query: dict | None = None) -> builtins.list[ObjectId]:
        """``failed`` tasks get a fresh attempt budget and go back to the status their last
        run was claimed from: ``waiting``, or ``part_done`` for a task that failed in its
        second phase (its first-phase result is kept). Returns their ids."""
        q = self._decode_query(query)
        q["status"] = st.FAILED
        ids = []
        with self._server_checks(query):
            found = list(self.task_pool.find(q, {"attempt": 1, "claimed_from": 1, "batch_ids": 1}))
        for d in found:
            back = d.get("claimed_from") or st.WAITING
            r = self.task_pool.update_one(
                {"_id": d["_id"], "status": st.FAILED},
                {
                    "$set": {
                        "status": back,
                        "attempt_base": d.get("attempt", 0),
                        "error": None,
                        "finished_at": None,
                        "published_at": RESEND,
                        "updated_at": utcnow(),
                    }
                },
            )
            if r.modified_count:
                self._count_move(d.get("batch_ids"), st.FAILED, back)
                ids.append(d["_id"])
        return ids

    def prioritize(self, task: Any, priority: int) -> None:
        """Set the priority of ``task`` (a task dict or id); higher runs first."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TaskTypeError(f"priority must be an int, got {priority!r}")
        self._fetch_cache = None
        oid = to_object_id(task)
        r = self.task_pool.update_one({"_id": oid}, {"$set": {"priority": priority}})
        if r.matched_count == 0:
            raise TaskNotFoundError(f"no task {oid} in pool {self.name!r}")
        # a task of a batch waits in the batch's queue in Mongo or has a message at its old
        # priority: either way beat's sweep sends it (again) at the new one, ahead of the queue
        self.task_pool.update_one({"_id": oid, "status": {"$in": list(st.CLAIMABLE)}}, {"$set": {"published_at": RESEND}})

    # -------------------------------------------------------------------- wait
    @staticmethod
    def _undone(stat: Mapping[str, int]) -> int:
        return sum(stat.get(s, 0) for s in st.UNDONE)

    def wait(self, query: dict | None = None, poll: float = 1.0, timeout: float | None = None, progress: bool = True) -> dict[str, int]:
        """Block until no task matching ``query`` is waiting, running or part_done, with a
        progress bar; returns the final ``task_stat``. ``TimeoutError`` after ``timeout`` s."""
        from tqdm.auto import tqdm

        stat = self.task_stat(query)
        total, undone = sum(stat.values()), self._undone(stat)
        if undone == 0:
            return stat
        deadline = None if timeout is None else time.monotonic() + timeout
        with tqdm(total=total, initial=total - undone, disable=not progress, desc=self.name, unit="task") as bar:
            while undone:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"pool {self.name!r}: {undone} tasks still undone after {timeout}s: {stat}")
                time.sleep(poll)
                stat = self.task_stat(query)
                now_undone = self._undone(stat)
                bar.total = sum(stat.values())
                bar.update(undone - now_undone)
                undone = now_undone
        return stat


class _MalformedQuery(Exception):
    pass


# MongoDB's query operators: top level, and on a field
_TOP_OPERATORS = frozenset({"$and", "$or", "$nor", "$expr", "$text", "$where", "$comment", "$jsonSchema"})
_FIELD_OPERATORS = frozenset(
    {
        "$eq",
        "$ne",
        "$gt",
        "$gte",
        "$lt",
        "$lte",
        "$in",
        "$nin",
        "$not",
        "$exists",
        "$type",
        "$mod",
        "$regex",
        "$options",
        "$all",
        "$elemMatch",
        "$size",
        "$bitsAllSet",
        "$bitsAnySet",
        "$bitsAllClear",
        "$bitsAnyClear",
        "$geoWithin",
        "$geoIntersects",
        "$near",
        "$nearSphere",
        "$maxDistance",
        "$minDistance",
        "$comment",
    }
)
_ID_OPERATORS = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$all"})


def _decode_query_doc(query: Mapping) -> dict:
    out: dict = {}
    for key, value in query.items():
        if not isinstance(key, str):
            raise _MalformedQuery(f"key {key!r} must be a string")
        if key.startswith("$"):
            if key not in _TOP_OPERATORS:
                raise _MalformedQuery(f"unknown top-level operator {key!r}; expected one of {', '.join(sorted(_TOP_OPERATORS))}")
            if key in ("$and", "$or", "$nor"):
                if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, Mapping) for v in value):
                    raise _MalformedQuery(f"{key} takes a non-empty list of queries, got {value!r}")
                value = [_decode_query_doc(v) for v in value]
            out[key] = value
            continue
        _check_field_operators(key, value)
        if key == "_id":
            value = _decode_id_value(value)
        elif key == "status":
            _check_statuses(value)
        elif key == "filter" or key.startswith("filter."):
            value = _normalize_query_value(value)
        out[key] = value
    return out


def _check_field_operators(key: str, value: Any) -> None:
    if not isinstance(value, Mapping) or not any(isinstance(k, str) and k.startswith("$") for k in value):
        return  # an equality match
    for op, operand in value.items():
        if op not in _FIELD_OPERATORS:
            raise _MalformedQuery(f"unknown operator {op!r} on {key!r}")
        if op in ("$in", "$nin", "$all") and not isinstance(operand, (list, tuple)):
            raise _MalformedQuery(f"{op} on {key!r} takes a list, got {operand!r}")
        if op == "$not":
            _check_field_operators(key, operand)
        if op == "$elemMatch":
            if not isinstance(operand, Mapping):
                raise _MalformedQuery(f"$elemMatch on {key!r} takes a query, got {operand!r}")
            if any(isinstance(k, str) and k.startswith("$") for k in operand):
                _check_field_operators(key, operand)
            else:
                _decode_query_doc(operand)


def _decode_id_value(value: Any) -> Any:
    if isinstance(value, Mapping) and any(isinstance(k, str) and k.startswith("$") for k in value):
        out = {}
        for op, v in value.items():
            if op in ("$in", "$nin", "$all"):
                v = [to_object_id(i) for i in v]
            elif op in _ID_OPERATORS:
                v = to_object_id(v)
            out[op] = v
        return out
    return to_object_id(value)


def _check_statuses(value: Any) -> None:
    if isinstance(value, str):
        st.check(value)
    elif isinstance(value, Mapping):
        for op, v in value.items():
            for s in v if op in ("$in", "$nin") and isinstance(v, (list, tuple)) else [v] if op in ("$eq", "$ne") else []:
                if isinstance(s, str):
                    st.check(s)


def _normalize_query_value(value: Any) -> Any:
    """Normalise the operands of a ``filter...`` query as stored filters are normalised."""
    if isinstance(value, Mapping):
        return {k: (_normalize_query_value(v) if k.startswith("$") else normalize(v)) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        return [_normalize_query_value(v) for v in value]
    return normalize(value)


def run_task(
    task_func: Callable,
    task_pool: str | TaskManager,
    query: dict | None = None,
    force_release: bool = False,
    before_status: str = st.WAITING,
    after_status: str = st.DONE,
    **kwargs: Any,
) -> bool:
    """Qlib's pull loop: while tasks in ``before_status`` match ``query``, fetch one, run
    ``task_func(param, **kwargs)`` and commit its result with ``after_status``.

    ``param`` is the task's ``def`` when fetched from ``waiting`` and its ``res`` when
    fetched from ``part_done`` (two-phase training). ``task_pool`` is a pool name or a
    :class:`TaskManager`. Unlike Qlib, the task is leased and kept alive by a heartbeat,
    so a killed worker's task is recovered, and a commit after a lost lease is dropped;
    when ``before_status == after_status`` each task runs once per call (Qlib loops forever).
    On an exception the task is returned to ``before_status`` and the error propagates.
    Returns whether any task ran.
    """
    if before_status not in st.CLAIMABLE:
        st.check(before_status, "before_status")
        raise TaskDefinitionError(f"run_task fetches tasks in {' or '.join(st.CLAIMABLE)}, not {before_status!r}")
    st.check(after_status, "after_status")
    if after_status not in (st.WAITING, st.PART_DONE, st.DONE):
        raise TaskDefinitionError(f"run_task commits tasks as waiting, part_done or done, not {after_status!r}")
    tm = task_pool if isinstance(task_pool, TaskManager) else TaskManager(task_pool)
    return pull_tasks(task_func, tm, query, before_status, after_status, force_release=force_release, task_kwargs=lambda task: kwargs) > 0


def pull_tasks(
    task_func: Callable,
    tm: TaskManager,
    query: dict | None = None,
    before_status: str = st.WAITING,
    after_status: str = st.DONE,
    *,
    force_release: bool = False,
    record_failures: bool = False,
    task_kwargs: Callable[[dict], Mapping[str, Any]] = lambda task: {},
) -> int:
    """The pull loop under :func:`run_task` and the ``TrainerRM`` workers; returns how
    many tasks it fetched.

    Each task matching ``query`` in ``before_status`` is leased, kept alive by a
    heartbeat while ``task_func(param, **task_kwargs(task))`` runs (in a child process
    with ``force_release``) and committed with ``after_status`` unless its lease was
    lost. When ``task_func`` raises, the task goes back to ``before_status`` and the
    error propagates; with ``record_failures`` the failure is recorded with
    :meth:`TaskManager.fail` instead (retried while attempts remain, else ``failed``
    with its traceback) and the loop goes on.
    """
    # with before == after (e.g. part_done -> part_done) a committed task matches again:
    # run each task once per call, where Qlib's loop would never end
    ran: list[ObjectId] = []
    decoded = tm._decode_query(query)
    while True:
        q = decoded
        if before_status == after_status and ran:
            q = {"$and": [decoded, {"_id": {"$nin": ran}}]}
        with tm.safe_fetch_task(query=q, status=before_status, heartbeat=False) as task:  # its lease: the Heartbeat below
            if task is None:
                break
            ran.append(task["_id"])
            param = task["def"] if before_status == st.WAITING else task["res"]
            kwargs = task_kwargs(task)
            try:
                with Heartbeat(tm, task) as hb:
                    if force_release:
                        with concurrent.futures.ProcessPoolExecutor(max_workers=1) as executor:
                            res = executor.submit(task_func, param, **kwargs).result()
                    else:
                        res = task_func(param, **kwargs)
                committed = not hb.lost.is_set() and tm.commit(task, res, after_status)
            except Exception as exc:
                if not record_failures:
                    raise
                # a refused name, an undecodable document, a result that cannot be pickled: no retry
                new = tm.fail(task, format_exception(exc), permanent=isinstance(exc, PermanentTaskError))
                logger.warning("task %s of pool %s raised %s: %s (now %s)", task["_id"], tm.name, type(exc).__name__, exc, new)
                continue
            if not committed:
                logger.warning("task %s of pool %s: lease lost while running; result dropped", task["_id"], tm.name)
    return len(ran)


def format_exception(exc: BaseException) -> str:
    """The traceback text stored in a failed task's ``error``."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


__all__ = ["TaskManager", "run_task", "pull_tasks", "Heartbeat", "format_exception", "to_object_id", "worker_name", "QceleryError"]
