"""Task pools are known, not guessed (issue 11.1, 12.3): the registry of pools.

Against the session's real MongoDB-wire server; each test has a database of its own.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle

import gridfs
import pytest
from bson import ObjectId

from qcelery import registry
from qcelery.beat import recover, sweep
from qcelery.celery_app import app_for
from qcelery.errors import ForeignCollectionError, TaskDefinitionError, UnknownPoolError, UnsafePickleError
from qcelery.manage import TaskManager
from qcelery.worker import aggregate_batch, execute_task


def _indexes(db, name: str) -> set[str]:
    return set(db[name].index_information()) if name in db.list_collection_names() else set()


def _foreign(db) -> dict[str, set[str]]:
    """A handler cache's GridFS bucket and a user's own collection, as a user has them."""
    gridfs.GridFS(db, collection="handler_cache").put(b"cached handler", filename="h.pkl")
    db["my_prices"].insert_many([{"sym": "A", "px": 1.0}, {"sym": "B", "px": 2.0}])
    return {n: _indexes(db, n) for n in ("handler_cache.files", "handler_cache.chunks", "my_prices")}


def test_list_is_the_pools_qcelery_created_not_every_collection(settings, mongo_db):
    before = _foreign(mongo_db)
    TaskManager("zz_pool", settings).create_task([{"a": 1}])
    TaskManager("aa_pool", settings)  # an empty pool is a pool too

    assert TaskManager.list(settings) == ["aa_pool", "zz_pool"]
    # nothing of the user's was indexed or written
    assert {n: _indexes(mongo_db, n) for n in before} == before
    assert mongo_db["my_prices"].count_documents({}) == 2


def test_a_collection_qcelery_did_not_write_is_refused_not_indexed(settings, mongo_db):
    before = _foreign(mongo_db)
    with pytest.raises(ForeignCollectionError, match=r"'my_prices'.*qcelery adopt my_prices"):
        TaskManager("my_prices", settings)
    assert _indexes(mongo_db, "my_prices") == before["my_prices"]
    assert "my_prices" not in TaskManager.list(settings)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a\x00b",
        ".hidden",
        "a..b",
        "trailing.",
        "handler_cache.files",
        "x.chunks",
        "qcelery_batches",
        "system.users",
        "$cmd",
        "tab\tname",
    ],
)
def test_bad_pool_names_are_refused_before_anything_is_written(settings, mongo_db, name):
    with pytest.raises(TaskDefinitionError, match="invalid task pool name"):
        TaskManager(name, settings)
    assert mongo_db.list_collection_names() == []


def test_open_names_only_known_pools_and_writes_nothing(settings, mongo_db):
    TaskManager("known", settings)
    assert TaskManager.open("known", settings).name == "known"
    with pytest.raises(UnknownPoolError, match=r"no task pool 'nope'.*pools: known"):
        TaskManager.open("nope", settings)
    assert "nope" not in mongo_db.list_collection_names()


def test_messages_for_unknown_pools_or_batches_change_nothing(settings, mongo_db):
    """An execute / aggregate naming a pool, task or batch that does not exist: one
    refusal, no collection, no index, the known pool untouched."""
    _foreign(mongo_db)
    tm = TaskManager("real", settings)
    [tid] = tm.create_task([{"a": 1}])
    app = app_for(settings)
    snapshot = {n: _indexes(mongo_db, n) for n in mongo_db.list_collection_names()}

    calls = [
        ("execute", ("ghost_pool", str(tid), None)),
        ("execute", ("handler_cache.files", str(tid), None)),
        ("execute", ("real", "not-an-id", None)),
        ("execute", ("real", str(ObjectId()), str(ObjectId()))),
        ("aggregate", ("ghost_pool", str(ObjectId()))),
        ("aggregate", ("real", str(ObjectId()))),
        ("aggregate", ("real", "zzz")),
    ]
    for kind, args in calls:
        task = app.tasks["qcelery.execute" if kind == "execute" else "qcelery.aggregate"]
        result = task.run(*args)  # the registered task body, in-process
        assert result["status"] in ("refused", "skipped"), (kind, args, result)
    assert {n: _indexes(mongo_db, n) for n in mongo_db.list_collection_names()} == snapshot
    assert tm.re_query(tid)["status"] == "waiting"
    # the plain functions raise the same errors the task bodies turn into one line
    with pytest.raises(UnknownPoolError):
        execute_task(app, "ghost_pool", str(tid))
    with pytest.raises(UnknownPoolError):
        aggregate_batch(app, "ghost_pool", str(ObjectId()))


def _expired(tm: TaskManager, key: str) -> ObjectId:
    [tid] = tm.create_task([{"key": key}])
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=30)
    tm.task_pool.update_one({"_id": tid}, {"$set": {"status": "running", "attempt": 1, "lease_until": past, "worker": "gone:1"}})
    return tid


def test_beat_jobs_walk_known_pools_and_one_bad_pool_does_not_stop_the_others(settings, mongo_db):
    """The handler cache's bucket sorts between the pools, and pool 'bbb' holds a corrupt
    task that makes its step raise: 'aaa' and 'zzz' are still recovered and swept."""
    _foreign(mongo_db)
    gridfs.GridFS(mongo_db, collection="ccc_cache").put(b"x")
    aaa, bbb, zzz = (TaskManager(n, settings) for n in ("aaa", "bbb", "zzz"))
    ids = {"aaa": _expired(aaa, "a"), "zzz": _expired(zzz, "z")}
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=30)
    bbb.task_pool.insert_one({"filter_hash": "x", "status": "running", "attempt": "abc", "lease_until": past, "batch_ids": []})
    # a pool removed behind qcelery's back still has its registration
    registry.register(mongo_db, "dropped_meanwhile")

    result = recover(app_for(settings))

    assert aaa.re_query(ids["aaa"])["status"] == "waiting"
    assert zzz.re_query(ids["zzz"])["status"] == "waiting"
    assert result["requeued"] == 2
    assert set(result["failed_pools"]) <= {"bbb"}
    assert "qcelery.registry" not in str(result)
    sweep(app_for(settings))  # walks the same pools without raising
    assert "ccc_cache.files" not in TaskManager.list(settings)
    assert "dedup" not in _indexes(mongo_db, "ccc_cache.files")


def _qlib_doc(task_def: dict, status: str = "waiting", **extra) -> dict:
    """A task document as Qlib 0.9.7's ``TaskManager.insert_task_def`` writes it: the
    definition pickled in ``def``, a plain ``filter`` copy, a status, nothing else."""
    return {"def": pickle.dumps(task_def, protocol=4), "filter": task_def, "status": status, **extra}


def test_adopt_makes_a_qlib_pool_a_qcelery_pool_in_place(settings, mongo_db):
    defs = [{"model": {"class": "LGBModel", "kwargs": {"seed": i}}, "i": i} for i in range(4)]
    coll = mongo_db["qlib_pool"]
    coll.insert_many([_qlib_doc(defs[0]), _qlib_doc(defs[1], "done", res=pickle.dumps({"ic": 0.1})), _qlib_doc(defs[2], "running"),
                      _qlib_doc(defs[3], priority=5)])  # fmt: skip
    with pytest.raises(ForeignCollectionError, match="qcelery adopt qlib_pool"):
        TaskManager("qlib_pool", settings)

    tm, n = TaskManager.adopt("qlib_pool", settings)

    assert n == 4 and "qlib_pool" in TaskManager.list(settings)
    assert tm.task_stat() == {"waiting": 2, "done": 1, "running": 1}
    # dedup against the adopted tasks: the same definitions are found, a new one is new
    ids, inserted = tm.create_tasks([*defs, {"new": 1}])
    assert ids[:4] == [d["_id"] for d in coll.find().sort("_id", 1)][:4]
    assert len(inserted) == 1
    # Qlib's own fields are untouched; the running one is leased, so beat recovers it
    done = coll.find_one({"status": "done"})
    assert pickle.loads(done["res"]) == {"ic": 0.1} and done["filter"] == defs[1]
    assert coll.find_one({"priority": 5})["filter"] == defs[3]
    running = coll.find_one({"status": "running"})
    assert running["attempt"] == 1 and running["lease_until"] is not None
    assert TaskManager.adopt("qlib_pool", settings)[1] == 0


def test_adopt_refuses_a_pool_it_cannot_read_and_writes_nothing(settings, mongo_db):
    coll = mongo_db["evil_pool"]
    coll.insert_many([_qlib_doc({"ok": 1}), {"def": pickle.dumps({"run": os.system}), "filter": {}, "status": "waiting"}])
    with pytest.raises(UnsafePickleError, match="evil_pool"):
        TaskManager.adopt("evil_pool", settings)
    assert coll.count_documents({"filter_hash": {"$exists": True}}) == 0
    assert "evil_pool" not in TaskManager.list(settings)
    assert "dedup" not in _indexes(mongo_db, "evil_pool")

    mongo_db["not_tasks"].insert_one({"sym": "A"})
    with pytest.raises(ForeignCollectionError, match="not a Qlib task"):
        TaskManager.adopt("not_tasks", settings)
    with pytest.raises(UnknownPoolError, match="nothing to adopt"):
        TaskManager.adopt("absent", settings)
