"""The task pool: Qlib's ``TaskManager`` on MongoDB, with leases and fencing.

A task document::

    {_id, def: <pickle>, filter: <normalised def>, filter_hash: <sha256>, status,
     res: <pickle> | None, res_file: <GridFS id> | None, priority, attempt, attempt_base,
     max_attempts, lease_until, worker, claimed_from, error, batch_ids: [...],
     created_at, updated_at, started_at, finished_at, published_at}

What differs from Qlib:

* ``create_task`` deduplicates on a unique hash of the canonical filter and inserts in
  bulk, so concurrent producers end with one document per task;
* every claim (``fetch_task`` for the pull loop, ``claim`` for Celery) sets a lease and
  increments ``attempt``; ``heartbeat`` extends the lease, and ``commit``/``fail`` are
  fenced on ``attempt`` so a worker whose lease was recovered cannot write any more;
* ``recover_expired`` returns crashed workers' tasks to ``waiting`` (or ``failed`` once
  ``max_attempts`` is used up), which Qlib leaves ``running`` forever;
* ``def``/``res`` are decoded through an allow-listing unpickler and big results live
  in GridFS; ``task_stat`` is one aggregation and ``wait`` polls counts, not documents.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as _dt
import logging
import os
import pprint
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, Mapping

import pymongo
from bson import Binary, ObjectId
from bson.errors import InvalidDocument, InvalidId
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure, PyMongoError

from . import status as st
from .canonical import filter_hash, normalize
from .errors import (
    DecodeError,
    LeaseLostError,
    QceleryError,
    TaskDefinitionError,
    TaskNotFoundError,
    TaskTypeError,
    UnsafePickleError,
)
from .serial import dumps, restricted_loads
from .settings import Settings, load_settings
from .store import INTERNAL_PREFIX, database, result_fs, scans_find_and_modify

logger = logging.getLogger(__name__)

_INSERT_CHUNK = 1000
# SecantusDB answers a large $in in quadratic time; small chunks keep lookups linear
_LOOKUP_CHUNK = 100


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def worker_name() -> str:
    """``host:pid`` of this process, stored in ``worker`` while it holds a lease."""
    return f"{socket.gethostname()}:{os.getpid()}"


def to_object_id(value: Any) -> ObjectId:
    """``ObjectId`` from an ``ObjectId``, its 24-hex string, or a task dict with ``_id``."""
    if isinstance(value, Mapping):
        value = value.get("_id")
    if isinstance(value, ObjectId):
        return value
    try:
        return ObjectId(value)
    except (InvalidId, TypeError):
        raise TaskDefinitionError(f"{value!r} is not a task id (expected an ObjectId or a 24-character hex string)") from None


class TaskManager:
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

    _indexed: set[tuple[str, str, str]] = set()

    def __init__(self, task_pool: str, settings: Settings | None = None):
        if not isinstance(task_pool, str) or not task_pool or task_pool.startswith(("system.", INTERNAL_PREFIX)) or "$" in task_pool:
            raise TaskDefinitionError(f"invalid task pool name {task_pool!r}: use a non-empty collection name without '$'")
        self.settings = settings or load_settings()
        self.name = task_pool
        self.db = database(self.settings, ping=True)
        self.task_pool: pymongo.collection.Collection = self.db[task_pool]
        self._claim_in_two_steps = scans_find_and_modify(self.settings)
        self._ensure_indexes()

    def _ensure_indexes(self) -> None:
        key = (self.settings.mongo_url, self.settings.mongo_db, self.name)
        if key in TaskManager._indexed:
            return
        c = self.task_pool
        c.create_index("filter_hash", unique=True, name="dedup")
        c.create_index([("status", 1), ("priority", -1)], name="fetch")
        c.create_index([("status", 1), ("lease_until", 1)], name="recover")
        c.create_index([("status", 1), ("published_at", 1)], name="sweep")
        c.create_index([("batch_ids", 1), ("status", 1)], name="batch_status")
        TaskManager._indexed.add(key)

    def __str__(self) -> str:
        return f"TaskManager({self.settings.mongo_db}.{self.name})"

    __repr__ = __str__

    # ------------------------------------------------------------------ listing
    @staticmethod
    def list(settings: Settings | None = None) -> list[str]:
        """Names of the task pools in the database (qcelery's own collections left out)."""
        db = database(settings or load_settings(), ping=True)
        return sorted(
            n for n in db.list_collection_names() if not n.startswith((INTERNAL_PREFIX, "system."))
        )

    # ---------------------------------------------------------------- encoding
    def _encode_def(self, task_def: Any, index: int | None = None) -> Binary:
        where = "task definition" if index is None else f"task definition #{index}"
        if not isinstance(task_def, dict):
            raise TaskTypeError(f"{where} must be a dict (Qlib's model/dataset/record config), got {type(task_def).__name__}")
        try:
            data = dumps(task_def)
        except Exception as exc:  # pickling runs user __reduce__ code; report which task
            raise TaskDefinitionError(f"{where} cannot be pickled: {exc}") from exc
        if len(data) > self.settings.max_def_bytes:
            raise TaskDefinitionError(
                f"{where} is {len(data):,} bytes pickled, above the limit of {self.settings.max_def_bytes:,} "
                "(a MongoDB document holds at most 16 MB): keep data out of the definition and load it in the task"
            )
        return Binary(data)

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

    def _decode_task(self, task: dict | None) -> dict | None:
        if task is None:
            return None
        task = dict(task)
        task["def"] = self._decode_field(task, "def")
        if task.get("res_file") is not None:
            try:
                raw = result_fs(self.db).get(task["res_file"]).read()
            except Exception as exc:
                raise DecodeError(f"task {task['_id']} in pool {self.name!r}: result file {task['res_file']} unreadable: {exc}") from exc
            task["res"] = raw
        task["res"] = self._decode_field(task, "res")
        return task

    def _encode_res(self, res: Any, task_id: ObjectId) -> tuple[dict, ObjectId | None]:
        """The ``$set`` part for a result, and the GridFS file written (to undo on a lost race)."""
        data = dumps(res)
        if len(data) > self.settings.gridfs_threshold:
            fid = result_fs(self.db).put(data, task_id=task_id, pool=self.name)
            return {"res": None, "res_file": fid}, fid
        return {"res": Binary(data), "res_file": None}, None

    def _drop_res_file(self, fid: Any) -> None:
        if fid is not None:
            with contextlib.suppress(PyMongoError):
                result_fs(self.db).delete(fid)

    # ------------------------------------------------------------------ queries
    def _decode_query(self, query: Any) -> dict:
        if query is None:
            return {}
        if not isinstance(query, Mapping):
            raise TaskTypeError(f"query must be a dict, got {type(query).__name__}: {query!r}")
        out: dict = {}
        for key, value in query.items():
            if not isinstance(key, str):
                raise TaskDefinitionError(f"query key {key!r} must be a string")
            if key == "_id":
                if isinstance(value, Mapping):
                    value = {op: ([to_object_id(i) for i in v] if isinstance(v, (list, tuple, set)) else to_object_id(v)) for op, v in value.items()}
                else:
                    value = to_object_id(value)
            elif key == "status" and isinstance(value, str):
                st.check(value)
            elif key.startswith("filter"):
                value = _normalize_query_value(value)
            out[key] = value
        return out

    def _find(self, query: dict, **kwargs: Any) -> pymongo.cursor.Cursor:
        return self.task_pool.find(query, **kwargs)

    def query(self, query: dict | None = None, decode: bool = True) -> Iterator[dict]:
        """Yield the tasks matching ``query`` (decoded unless ``decode=False``)."""
        q = self._decode_query(query)
        cursor = self._find(q)
        try:
            for t in cursor:
                yield self._decode_task(t) if decode else t
        except OperationFailure as exc:
            raise TaskDefinitionError(f"malformed query {query!r} on pool {self.name!r}: {exc}") from None

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
            "def": encoded, "filter": filt, "filter_hash": fhash, "status": st.WAITING,
            "res": None, "res_file": None, "priority": 0, "attempt": 0, "attempt_base": 0,
            "max_attempts": self.settings.max_attempts, "lease_until": None, "worker": None,
            "claimed_from": None, "error": None, "batch_ids": [], "created_at": now, "updated_at": now,
            "started_at": None, "finished_at": None, "published_at": None,
        }

    def insert_task(self, task: dict) -> pymongo.results.InsertOneResult:
        """Insert an already encoded task document as it is (Qlib's low-level insert)."""
        if not isinstance(task, dict):
            raise TaskTypeError(f"task must be a dict, got {type(task).__name__}")
        try:
            return self.task_pool.insert_one(task)
        except InvalidDocument as exc:
            raise TaskDefinitionError(f"task document is not valid BSON: {exc}") from None

    def insert_task_def(self, task_def: dict) -> pymongo.results.InsertOneResult:
        """Insert one task definition as a new ``waiting`` task (no dedup check, as in Qlib,
        but the unique filter hash still refuses an exact duplicate)."""
        encoded = self._encode_def(task_def)
        filt = normalize(task_def)
        try:
            return self.task_pool.insert_one(self._new_doc(task_def, encoded, filt, filter_hash(filt), utcnow()))
        except DuplicateKeyError:
            raise TaskDefinitionError(f"an identical task already exists in pool {self.name!r}; use create_task to reuse it") from None

    def create_task(self, task_def_l: list[dict], dry_run: bool = False, print_nt: bool = False) -> list[ObjectId]:
        """Insert the new tasks of ``task_def_l`` and return every task's id, in input order.

        As in Qlib, a task whose filter already exists is not inserted again and its
        existing id is returned; with ``dry_run`` nothing is written and ``[]`` is returned
        (use :meth:`plan` to see what is new). Every definition is validated before the
        first write, so bad input leaves the pool untouched. Work is a few round trips per
        thousand tasks, and concurrent producers of the same tasks end with one document each.
        """
        return self.create_tasks(task_def_l, dry_run=dry_run, print_nt=print_nt)[0]

    def create_tasks(self, task_def_l: list[dict], dry_run: bool = False, print_nt: bool = False,
                     batch_id: ObjectId | None = None) -> tuple[list[ObjectId], set[ObjectId]]:
        """``create_task`` that also returns the set of ids it inserted; new tasks are born
        tagged with ``batch_id`` and marked published (the producer publishes them next)."""
        if isinstance(task_def_l, dict) or not isinstance(task_def_l, (list, tuple)):
            raise TaskTypeError(f"task_def_l must be a list of task definitions, got {type(task_def_l).__name__}")
        encoded = [self._encode_def(t, i) for i, t in enumerate(task_def_l)]
        filters = [normalize(t) for t in task_def_l]
        hashes = [filter_hash(f) for f in filters]

        ids = self._ids_by_hash(set(hashes))
        new_idx: dict[str, int] = {}
        for i, h in enumerate(hashes):
            if h not in ids and h not in new_idx:
                new_idx[h] = i
        logger.info("pool %s: %d tasks, %d new", self.name, len(task_def_l), len(new_idx))
        if print_nt:
            for i in new_idx.values():
                sys.stdout.write(pprint.pformat(task_def_l[i]) + "\n")
        if dry_run:
            return [], set()

        now = utcnow()
        docs = [self._new_doc(task_def_l[i], encoded[i], filters[i], h, now) for h, i in new_idx.items()]
        if batch_id is not None:
            for d in docs:
                d["batch_ids"], d["published_at"] = [batch_id], now
        lost: list[str] = []
        for start in range(0, len(docs), _INSERT_CHUNK):
            chunk = docs[start:start + _INSERT_CHUNK]
            try:
                self.task_pool.insert_many(chunk, ordered=False)
            except BulkWriteError as exc:
                # another producer inserted some of these meanwhile: take its documents
                errors = exc.details.get("writeErrors", [])
                other = [e for e in errors if e.get("code") != 11000]
                if other:
                    raise TaskDefinitionError(f"insert into pool {self.name!r} failed: {other[0].get('errmsg')}") from None
                lost.extend(chunk[e["index"]]["filter_hash"] for e in errors)
            except InvalidDocument as exc:
                raise TaskDefinitionError(f"task document is not valid BSON: {exc}") from None
            for d in chunk:
                if "_id" in d and d["filter_hash"] not in lost:
                    ids[d["filter_hash"]] = d["_id"]
        inserted = {d["_id"] for d in docs if "_id" in d and d["filter_hash"] not in lost}
        if lost:
            ids.update(self._ids_by_hash(set(lost)))
        return [ids[h] for h in hashes], inserted

    def plan(self, task_def_l: list[dict]) -> tuple[list[dict], list[dict]]:
        """Split ``task_def_l`` into (new, existing) definitions without writing anything;
        duplicates inside the list count once."""
        filters = [normalize(t) for t in task_def_l]
        hashes = [filter_hash(f) for f in filters]
        existing = self._ids_by_hash(set(hashes))
        seen: set[str] = set()
        new, old = [], []
        for t, h in zip(task_def_l, hashes):
            if h in seen:
                continue
            seen.add(h)
            (old if h in existing else new).append(t)
        return new, old

    def _ids_by_hash(self, hashes: set[str]) -> dict[str, ObjectId]:
        out: dict[str, ObjectId] = {}
        hl = list(hashes)
        for start in range(0, len(hl), _LOOKUP_CHUNK):
            part = hl[start:start + _LOOKUP_CHUNK]
            for d in self.task_pool.find({"filter_hash": {"$in": part}}, {"filter_hash": 1}):
                out[d["filter_hash"]] = d["_id"]
        return out

    def replace_task(self, task: dict, new_task: dict) -> None:
        """Replace the task ``task`` by the task document ``new_task`` (``def``/``res`` encoded here)."""
        new_task = dict(new_task)
        new_task.pop("_id", None)
        if "def" in new_task:
            new_task["def"] = self._encode_def(new_task["def"])
            filt = normalize(new_task.get("filter", self._decode_field({"def": new_task["def"]}, "def")))
            new_task["filter"], new_task["filter_hash"] = filt, filter_hash(filt)
        if "res" in new_task and new_task["res"] is not None and not isinstance(new_task["res"], (bytes, Binary)):
            new_task["res"] = Binary(dumps(new_task["res"]))
        new_task["updated_at"] = utcnow()
        try:
            self.task_pool.replace_one({"_id": to_object_id(task)}, new_task)
        except InvalidDocument as exc:
            raise TaskDefinitionError(f"replacement for task {task.get('_id')} is not valid BSON: {exc}") from None

    # ------------------------------------------------------------------- claims
    def _claim_update(self, worker: str, lease_seconds: float | None, before_status: str) -> dict:
        now = utcnow()
        lease = lease_seconds if lease_seconds is not None else self.settings.lease_seconds
        return {
            "$set": {
                "status": st.RUNNING, "worker": worker, "claimed_from": before_status,
                "lease_until": now + _dt.timedelta(seconds=lease), "started_at": now, "updated_at": now,
            },
            "$inc": {"attempt": 1},
        }

    def claim(self, task_id: Any, worker: str | None = None, before_status: str = st.WAITING,
              lease_seconds: float | None = None, decode: bool = True) -> dict | None:
        """Atomically take task ``task_id`` if it is in ``before_status``: it becomes
        ``running`` under a lease held by ``worker``, with ``attempt`` incremented.
        ``None`` when the task is not claimable (done, running elsewhere, removed)."""
        if before_status not in st.CLAIMABLE:
            raise TaskDefinitionError(f"cannot claim from status {before_status!r}; expected one of {st.CLAIMABLE}")
        flt = {"_id": to_object_id(task_id), "status": before_status}
        update = self._claim_update(worker or worker_name(), lease_seconds, before_status)
        if self._claim_in_two_steps:
            doc = self._claim_two_steps(flt, update)
        else:
            doc = self.task_pool.find_one_and_update(flt, update, return_document=ReturnDocument.AFTER)
        return self._decode_task(doc) if decode else doc

    def _claim_two_steps(self, flt: dict, update: dict) -> dict | None:
        """The claim as a conditional ``update_one`` stamped with a fresh token, then a read
        of the document carrying that token. Used where the server scans the collection
        for findAndModify (SecantusDB) but answers ``update_one`` by ``_id`` from the index;
        equally atomic: only the update that matched ``flt`` wrote the token."""
        token = ObjectId()
        update = {**update, "$set": {**update["$set"], "claim_token": token}}
        if self.task_pool.update_one(flt, update).modified_count != 1:
            return None
        return self.task_pool.find_one({"_id": flt["_id"], "claim_token": token})

    def fetch_task(self, query: dict | None = None, status: str = st.WAITING) -> dict | None:
        """Take the highest-priority task in ``status`` matching ``query`` (Qlib's pull-loop
        fetch), now with a lease: a worker that dies leaves it to ``recover_expired``."""
        if status not in st.CLAIMABLE:
            st.check(status)
            raise TaskDefinitionError(f"fetch_task takes tasks in {st.CLAIMABLE}, not {status!r}")
        q = self._decode_query(query)
        q["status"] = status
        try:
            if not self._claim_in_two_steps:
                doc = self.task_pool.find_one_and_update(
                    q, self._claim_update(worker_name(), None, status),
                    sort=[("priority", pymongo.DESCENDING)], return_document=ReturnDocument.AFTER,
                )
                return self._decode_task(doc)
            while True:  # pick the best candidate, claim it by id; another worker may win it
                cand = self.task_pool.find_one(q, {"_id": 1}, sort=[("priority", pymongo.DESCENDING)])
                if cand is None:
                    return None
                doc = self.claim(cand["_id"], before_status=status)
                if doc is not None:
                    return doc
        except OperationFailure as exc:
            raise TaskDefinitionError(f"malformed query {query!r} on pool {self.name!r}: {exc}") from None

    @contextlib.contextmanager
    def safe_fetch_task(self, query: dict | None = None, status: str = st.WAITING) -> Iterator[dict | None]:
        """``fetch_task`` as a context manager: if the body raises (or is interrupted),
        the task goes back to ``status`` and the error propagates, as in Qlib."""
        task = self.fetch_task(query=query, status=status)
        try:
            yield task
        except BaseException:
            if task is not None:
                logger.info("returning task %s to %s before raising", task["_id"], status)
                self.return_task(task, status=status)
            raise

    def task_fetcher_iter(self, query: dict | None = None) -> Iterator[dict]:
        while True:
            with self.safe_fetch_task(query=query) as task:
                if task is None:
                    break
                yield task

    def heartbeat(self, task_id: Any, attempt: int, lease_seconds: float | None = None) -> bool:
        """Extend the lease of a running task held at ``attempt``; ``False`` if it was lost."""
        lease = lease_seconds if lease_seconds is not None else self.settings.lease_seconds
        r = self.task_pool.update_one(
            {"_id": to_object_id(task_id), "status": st.RUNNING, "attempt": attempt},
            {"$set": {"lease_until": utcnow() + _dt.timedelta(seconds=lease)}},
        )
        return r.matched_count == 1

    def commit(self, task: dict, res: Any, status: str = st.DONE) -> bool:
        """Store ``res`` and move the claimed ``task`` to ``status`` (``done`` or
        ``part_done``), only if it is still ``running`` at the same ``attempt``.
        ``False`` (nothing written) when the lease was lost to another worker."""
        if status not in (st.DONE, st.PART_DONE, st.WAITING):
            st.check(status)
            raise TaskDefinitionError(f"commit moves a task to done, part_done or waiting, not {status!r}")
        oid = to_object_id(task)
        old = self.task_pool.find_one({"_id": oid}, {"res_file": 1})
        res_set, fid = self._encode_res(res, oid)
        now = utcnow()
        upd: dict[str, Any] = {**res_set, "status": status, "lease_until": None, "worker": None,
                               "updated_at": now, "finished_at": now, "error": None}
        if status != st.DONE:  # a next phase gets its own attempt budget
            upd["attempt_base"] = task["attempt"]
        r = self.task_pool.update_one({"_id": oid, "status": st.RUNNING, "attempt": task["attempt"]}, {"$set": upd})
        if r.matched_count != 1:
            self._drop_res_file(fid)
            logger.warning("task %s: commit of attempt %s refused, its lease was taken over", oid, task["attempt"])
            return False
        if old and old.get("res_file") is not None and old.get("res_file") != fid:
            self._drop_res_file(old["res_file"])
        return True

    def fail(self, task: dict, error: str) -> str | None:
        """Record a failed run of the claimed ``task``: back to the status it was claimed
        from while attempts remain, else ``failed``; ``error`` (a traceback) is kept.
        Returns the new status, or ``None`` if the lease was lost (nothing written)."""
        used = task["attempt"] - task.get("attempt_base", 0)
        new = st.FAILED if used >= task.get("max_attempts", self.settings.max_attempts) else (task.get("claimed_from") or st.WAITING)
        now = utcnow()
        r = self.task_pool.update_one(
            {"_id": to_object_id(task), "status": st.RUNNING, "attempt": task["attempt"]},
            {"$set": {"status": new, "error": error, "lease_until": None, "worker": None, "updated_at": now,
                      "finished_at": now if new == st.FAILED else None, "published_at": None}},
        )
        return new if r.matched_count == 1 else None

    def commit_task_res(self, task: dict, res: Any, status: str = st.DONE) -> None:
        """Qlib's commit. For a task this pool leased (it has ``attempt``) the write is
        fenced and raises :class:`LeaseLostError` when the lease was taken over."""
        status = st.DONE if status is None else st.check(status)
        if task.get("attempt") and task.get("status") == st.RUNNING:
            if not self.commit(task, res, status):
                raise LeaseLostError(f"task {task['_id']} in pool {self.name!r}: lease of attempt {task['attempt']} was lost; result not committed")
            return
        oid = to_object_id(task)
        res_set, _ = self._encode_res(res, oid)
        self.task_pool.update_one({"_id": oid}, {"$set": {**res_set, "status": status, "lease_until": None, "worker": None, "updated_at": utcnow()}})

    def return_task(self, task: dict, status: str = st.WAITING) -> None:
        """Put a fetched task back to ``status`` (default ``waiting``), releasing its lease."""
        status = st.WAITING if status is None else st.check(status)
        q: dict[str, Any] = {"_id": to_object_id(task)}
        if task.get("attempt") and task.get("status") == st.RUNNING:
            q.update(status=st.RUNNING, attempt=task["attempt"])
        self.task_pool.update_one(q, {"$set": {"status": status, "lease_until": None, "worker": None, "updated_at": utcnow(), "published_at": None}})

    # ------------------------------------------------------------------ recovery
    def recover_expired(self, now: _dt.datetime | None = None) -> list[ObjectId]:
        """Tasks ``running`` past their lease go back to the status they were claimed from
        (or ``failed`` when ``max_attempts`` is used up). Returns the ids put back, to be
        re-published. Each move is conditioned on the attempt seen, so it is safe to run
        from several processes."""
        now = now or utcnow()
        requeued: list[ObjectId] = []
        cursor = self.task_pool.find(
            {"status": st.RUNNING, "lease_until": {"$lt": now}},
            {"attempt": 1, "attempt_base": 1, "max_attempts": 1, "claimed_from": 1, "worker": 1, "lease_until": 1},
        )
        for d in cursor:
            used = d.get("attempt", 0) - d.get("attempt_base", 0)
            exhausted = used >= d.get("max_attempts", self.settings.max_attempts)
            new = st.FAILED if exhausted else (d.get("claimed_from") or st.WAITING)
            upd: dict[str, Any] = {"status": new, "lease_until": None, "worker": None, "updated_at": now, "published_at": None}
            if exhausted:
                upd.update(finished_at=now, error=f"lease expired {max(used, 1)} time(s) (last worker {d.get('worker')}); attempts exhausted")
            r = self.task_pool.update_one({"_id": d["_id"], "status": st.RUNNING, "attempt": d["attempt"], "lease_until": {"$lt": now}}, {"$set": upd})
            if r.modified_count == 1:
                logger.warning("task %s: lease of %s expired, now %s", d["_id"], d.get("worker"), new)
                if not exhausted:
                    requeued.append(d["_id"])
        return requeued

    def mark_published(self, ids: Iterable[Any], when: _dt.datetime | None = None) -> None:
        """Remember when messages for ``ids`` were last published (the sweep reads it)."""
        ids = [to_object_id(i) for i in ids]
        when = when or utcnow()
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            self.task_pool.update_many({"_id": {"$in": ids[start:start + _LOOKUP_CHUNK]}}, {"$set": {"published_at": when}})

    def stale_waiting(self, older_than: float, limit: int = 10_000) -> list[ObjectId]:
        """Claimable tasks of some batch whose last publish is older than ``older_than``
        seconds, or that were never re-published after a reset."""
        cutoff = utcnow() - _dt.timedelta(seconds=older_than)
        q = {"status": {"$in": list(st.CLAIMABLE)}, "batch_ids.0": {"$exists": True},
             "$or": [{"published_at": {"$lt": cutoff}}, {"published_at": None}]}
        return [d["_id"] for d in self.task_pool.find(q, {"_id": 1}).limit(limit)]

    # ------------------------------------------------------------------- admin
    def remove(self, query: dict | None = None) -> int:
        """Delete the tasks matching ``query`` (and their GridFS results); returns how many."""
        q = self._decode_query(query)
        fids = [d["res_file"] for d in self.task_pool.find({**q, "res_file": {"$ne": None}}, {"res_file": 1})]
        n = self.task_pool.delete_many(q).deleted_count
        for fid in fids:
            self._drop_res_file(fid)
        return n

    def task_stat(self, query: dict | None = None) -> dict[str, int]:
        """Number of tasks per status, in one aggregation."""
        q = self._decode_query(query)
        try:
            rows = self.task_pool.aggregate([{"$match": q}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}])
            return {r["_id"]: r["n"] for r in rows}
        except OperationFailure as exc:
            raise TaskDefinitionError(f"malformed query {query!r} on pool {self.name!r}: {exc}") from None

    def reset_waiting(self, query: dict | None = None) -> int:
        """Put ``running`` tasks (or those matching ``query``) back to ``waiting``, as Qlib
        does after workers died. Prefer :meth:`recover_expired`, which only takes expired leases."""
        q = dict(query or {})
        q.setdefault("status", st.RUNNING)
        return self.reset_status(q, st.WAITING)

    def reset_status(self, query: dict | None, status: str) -> int:
        """Set ``status`` on every task matching ``query`` (an admin override); returns the count."""
        st.check(status)
        q = self._decode_query(query)
        upd: dict[str, Any] = {"status": status, "updated_at": utcnow()}
        if status != st.RUNNING:
            upd.update(lease_until=None, worker=None)
        if status in st.CLAIMABLE:
            upd["published_at"] = None
        n = self.task_pool.update_many(q, {"$set": upd}).modified_count
        logger.info("pool %s: %d tasks set to %s", self.name, n, status)
        return n

    def retry_failed(self, query: dict | None = None) -> list[ObjectId]:
        """``failed`` tasks go back to ``waiting`` with a fresh attempt budget; returns their ids."""
        q = self._decode_query(query)
        q["status"] = st.FAILED
        ids = []
        for d in self.task_pool.find(q, {"attempt": 1}):
            r = self.task_pool.update_one(
                {"_id": d["_id"], "status": st.FAILED},
                {"$set": {"status": st.WAITING, "attempt_base": d.get("attempt", 0), "error": None,
                          "finished_at": None, "published_at": None, "updated_at": utcnow()}},
            )
            if r.modified_count:
                ids.append(d["_id"])
        return ids

    def prioritize(self, task: Any, priority: int) -> None:
        """Set the priority of ``task`` (a task dict or id); higher runs first."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TaskTypeError(f"priority must be an int, got {priority!r}")
        r = self.task_pool.update_one({"_id": to_object_id(task)}, {"$set": {"priority": priority}})
        if r.matched_count == 0:
            raise TaskNotFoundError(f"no task {to_object_id(task)} in pool {self.name!r}")

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


def _normalize_query_value(value: Any) -> Any:
    """Normalise the operands of a ``filter...`` query as stored filters are normalised."""
    if isinstance(value, Mapping):
        return {k: (_normalize_query_value(v) if k.startswith("$") else normalize(v)) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        return [_normalize_query_value(v) for v in value]
    return normalize(value)


class Heartbeat:
    """Keeps the lease of a claimed task alive from a daemon thread.

    ``lost`` is set when an extension finds the task no longer held at this attempt
    (recovered and re-claimed elsewhere): the holder must not commit then.
    """

    def __init__(self, manager: TaskManager, task: dict, interval: float | None = None):
        self.manager, self.task_id, self.attempt = manager, task["_id"], task["attempt"]
        self.interval = interval or manager.settings.heartbeat_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.task_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.manager.heartbeat(self.task_id, self.attempt):
                    self.lost.set()
                    return
            except PyMongoError as exc:  # the store is briefly away: the lease has slack, try again
                logger.warning("heartbeat for task %s failed: %s", self.task_id, exc)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


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
    so a killed worker's task is recovered, and a commit after a lost lease is dropped.
    On an exception the task is returned to ``before_status`` and the error propagates.
    Returns whether any task ran.
    """
    if before_status not in st.CLAIMABLE:
        raise ValueError(f"run_task fetches tasks in {st.CLAIMABLE}, not {before_status!r}")
    st.check(after_status)
    tm = task_pool if isinstance(task_pool, TaskManager) else TaskManager(task_pool)
    ever_run = False
    while True:
        with tm.safe_fetch_task(query=query, status=before_status) as task:
            if task is None:
                break
            param = task["def"] if before_status == st.WAITING else task["res"]
            with Heartbeat(tm, task) as hb:
                if force_release:
                    with concurrent.futures.ProcessPoolExecutor(max_workers=1) as executor:
                        res = executor.submit(task_func, param, **kwargs).result()
                else:
                    res = task_func(param, **kwargs)
            if hb.lost.is_set() or not tm.commit(task, res, after_status):
                logger.warning("task %s: lease lost while running; result dropped", task["_id"])
            ever_run = True
    return ever_run


def format_exception(exc: BaseException) -> str:
    """The traceback text stored in a failed task's ``error``."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


__all__ = ["TaskManager", "run_task", "Heartbeat", "format_exception", "to_object_id", "worker_name", "QceleryError"]
