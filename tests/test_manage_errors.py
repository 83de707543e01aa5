"""Bad input to the task pool: a clear error, and nothing written.

Also the two ways a stored document can be hostile or broken (a pickle that would
run code, bytes that are no pickle) and an unreachable server.
"""

from __future__ import annotations

import os
import pickle
import socket

import pytest
from bson import Binary, ObjectId

from qcelery.errors import (
    DecodeError,
    StoreUnavailableError,
    TaskDefinitionError,
    TaskTypeError,
    UnknownStatusError,
    UnsafePickleError,
)
from qcelery.manage import TaskManager, run_task
from qcelery.settings import Settings


def task_def(i: int) -> dict:
    return {"model": {"class": "LinearModel", "kwargs": {"alpha": i}}, "i": i}


@pytest.fixture
def tm(settings, mongo_db) -> TaskManager:
    return TaskManager("pool", settings)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------- task definitions
@pytest.mark.parametrize("bad", ["a string", 42, None, ["a", "list"], ("k", "v")])
def test_non_dict_definition_in_the_middle_of_a_list_writes_nothing(tm, bad):
    defs = [task_def(0), task_def(1), bad, task_def(3)]
    with pytest.raises(TaskTypeError, match=r"task definition #2 must be a dict") as err:
        tm.create_task(defs)
    assert isinstance(err.value, TypeError)
    assert tm.task_pool.count_documents({}) == 0


@pytest.mark.parametrize("bad", [task_def(0), "tasks", None, 3])
def test_create_task_needs_a_list(tm, bad):
    with pytest.raises(TaskTypeError, match="task_def_l must be a list"):
        tm.create_task(bad)
    assert tm.task_pool.count_documents({}) == 0


def test_unpicklable_definition_names_its_position(tm):
    with pytest.raises(TaskDefinitionError, match=r"#1 cannot be pickled"):
        tm.create_task([task_def(0), {"fn": lambda x: x}])
    assert tm.task_pool.count_documents({}) == 0


def test_definition_above_max_def_bytes_is_refused(settings, mongo_db):
    tm = TaskManager("pool", settings.model_copy(update={"max_def_bytes": 2_000}))
    defs = [task_def(0), {"data": "x" * 5_000}, task_def(2)]
    with pytest.raises(TaskDefinitionError, match=r"#1 is [\d,]+ bytes pickled, above the limit of 2,000") as err:
        tm.create_task(defs)
    assert "keep data out of the definition" in str(err.value)
    assert tm.task_pool.count_documents({}) == 0
    with pytest.raises(TaskDefinitionError, match="above the limit"):
        tm.insert_task_def({"data": "x" * 5_000})
    assert tm.task_pool.count_documents({}) == 0


def test_definition_larger_than_a_mongo_document_is_refused(tm):
    huge = {"data": b"\0" * (17 * 1024 * 1024)}  # more than the 16 MB a document holds
    with pytest.raises(TaskDefinitionError, match="16 MB"):
        tm.create_task([task_def(0), huge])
    assert tm.task_pool.count_documents({}) == 0


def test_document_too_large_through_its_filter_is_refused_before_any_write(settings, mongo_db):
    # the pickle is under the (raised) limit, but the stored filter doubles it past 16 MB
    tm = TaskManager("pool", settings.model_copy(update={"max_def_bytes": 100_000_000}))
    big = {"text": "y" * (9 * 1024 * 1024)}
    with pytest.raises(TaskDefinitionError, match=r"#1 .*16 MB"):
        tm.create_task([task_def(0), big])
    assert tm.task_pool.count_documents({}) == 0


# ----------------------------------------------------------------------- statuses
def test_unknown_statuses_are_refused(tm):
    _id = tm.create_task([task_def(0)])[0]
    with pytest.raises(UnknownStatusError, match="'finished'.*waiting, running, part_done, done, failed"):
        tm.fetch_task(status="finished")
    with pytest.raises(UnknownStatusError):
        tm.task_stat({"status": "finished"})
    with pytest.raises(UnknownStatusError):
        tm.reset_status({}, "finished")
    with pytest.raises(UnknownStatusError):
        tm.commit_task_res(tm.re_query(_id), 1, status="finished")
    with pytest.raises(UnknownStatusError):
        tm.return_task(tm.re_query(_id), status="finished")
    with pytest.raises(UnknownStatusError):
        run_task(lambda d: d, tm, after_status="finished")
    with pytest.raises(UnknownStatusError):
        run_task(lambda d: d, tm, before_status="finished")
    assert issubclass(UnknownStatusError, ValueError)
    t = tm.re_query(_id)
    assert t["status"] == "waiting" and t["res"] is None


def test_statuses_a_loop_cannot_fetch_or_commit(tm):
    tm.create_task([task_def(0)])
    with pytest.raises(TaskDefinitionError, match="not 'done'"):
        tm.fetch_task(status="done")
    with pytest.raises(TaskDefinitionError, match="not 'running'"):
        run_task(lambda d: d, tm, before_status="running")
    with pytest.raises(TaskDefinitionError, match="not 'failed'"):
        run_task(lambda d: d, tm, after_status="failed")
    with pytest.raises(TaskDefinitionError):
        tm.claim(ObjectId(), before_status="done")
    assert tm.task_stat() == {"waiting": 1}


# ------------------------------------------------------------------------ queries
@pytest.mark.parametrize("query", ["status", 5, ["status", "waiting"]])
def test_non_dict_query_is_a_type_error(tm, query):
    tm.create_task([task_def(0)])
    for call in (
        lambda: tm.query(query),
        lambda: tm.task_stat(query),
        lambda: tm.fetch_task(query),
        lambda: tm.remove(query),
        lambda: tm.reset_status(query, "done"),
    ):
        with pytest.raises(TaskTypeError, match="query must be a dict"):
            call()
    assert tm.task_stat() == {"waiting": 1}


@pytest.mark.parametrize("bad_id", ["not-an-id", "123", 17, None, {"$in": ["zz"]}])
def test_bad_id_in_query_is_a_value_error(tm, bad_id):
    tm.create_task([task_def(0)])
    with pytest.raises(TaskDefinitionError, match="is not a task id|task id is required"):
        tm.query({"_id": bad_id})
    with pytest.raises(TaskDefinitionError):
        tm.remove({"_id": bad_id})
    assert tm.task_stat() == {"waiting": 1}


def test_bad_id_to_re_query_and_claim(tm):
    with pytest.raises(TaskDefinitionError, match="'xyz' is not a task id"):
        tm.re_query("xyz")
    with pytest.raises(TaskDefinitionError):
        tm.re_query(None)
    with pytest.raises(TaskDefinitionError):
        tm.claim("xyz")


@pytest.mark.parametrize("query", [{"$foo": 1}, {"filter.i": {"$bar": 1}}, {"$and": 1}])
def test_invalid_operator_is_a_value_error_and_changes_nothing(tm, query):
    tm.create_task([task_def(0)])
    calls = {
        "query": lambda: tm.query(query),
        "task_stat": lambda: tm.task_stat(query),
        "fetch_task": lambda: tm.fetch_task(query),
        "remove": lambda: tm.remove(query),
        "reset_status": lambda: tm.reset_status(query, "done"),
        "reset_waiting": lambda: tm.reset_waiting(query),
        "retry_failed": lambda: tm.retry_failed(query),
    }
    for name, call in calls.items():
        with pytest.raises(TaskDefinitionError, match="malformed query") as err:
            call()
        assert "$" in str(err.value), name
    t = next(tm.query())
    assert t["status"] == "waiting" and t["attempt"] == 0


def test_bad_priority(tm):
    _id = tm.create_task([task_def(0)])[0]
    for bad in ("high", 1.5, True):
        with pytest.raises(TaskTypeError, match="priority must be an int"):
            tm.prioritize(_id, bad)
    assert tm.get_raw(_id)["priority"] == 0


@pytest.mark.parametrize("name", ["", "a$b", "system.x", "qcelery_batches", 7])
def test_bad_pool_name(settings, mongo_db, name):
    with pytest.raises(TaskDefinitionError, match="invalid task pool name"):
        TaskManager(name, settings)


# -------------------------------------------------------------- hostile documents
class _Shell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_res_is_refused_and_nothing_runs(tm, tmp_path):
    _id = tm.create_task([task_def(0)])[0]
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model": _Shell(f"touch {marker}")})
    tm.task_pool.update_one({"_id": _id}, {"$set": {"res": Binary(payload)}})
    with pytest.raises(UnsafePickleError) as err:
        tm.re_query(_id)
    msg = str(err.value)
    assert str(_id) in msg and f"{os.system.__module__}.system" in msg and "'res'" in msg
    with pytest.raises(UnsafePickleError, match=str(_id)):
        list(tm.query())
    assert not marker.exists()
    # the raw document is still readable for inspection
    assert next(tm.query(decode=False))["res"] == payload


def test_malicious_def_is_refused_at_fetch(tm, tmp_path):
    _id = tm.create_task([task_def(0)])[0]
    marker = tmp_path / "pwned"
    tm.task_pool.update_one({"_id": _id}, {"$set": {"def": Binary(pickle.dumps(_Shell(f"touch {marker}")))}})
    with pytest.raises(UnsafePickleError, match=f"{_id}.*'def'"):
        tm.fetch_task()
    assert not marker.exists()


def test_corrupt_res_names_the_task(tm):
    _id = tm.create_task([task_def(0)])[0]
    tm.task_pool.update_one({"_id": _id}, {"$set": {"res": Binary(b"this is not a pickle")}})
    with pytest.raises(DecodeError, match=f"task {_id} in pool 'pool', field 'res' could not be decoded"):
        tm.re_query(_id)


# ---------------------------------------------------------------- unreachable store
@pytest.mark.timeout(60)
def test_unreachable_mongo_fails_fast_naming_the_url_without_password():
    port = closed_port()
    s = Settings(mongo_url=f"mongodb://user:secret@127.0.0.1:{port}/", mongo_timeout_ms=2000)
    with pytest.raises(StoreUnavailableError) as err:
        TaskManager("pool", s)
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "user:***@" in msg
    assert "secret" not in msg and "secret" not in repr(err.value)
    assert "qcelery up" in msg and "SecantusDB" in msg
    assert isinstance(err.value, ConnectionError)
    with pytest.raises(StoreUnavailableError):
        TaskManager.list(s)


def test_invalid_mongo_url_is_a_config_error_without_password():
    s = Settings(mongo_url="mongodb://user:secret@127.0.0.1:99999999/")
    with pytest.raises(ValueError) as err:
        TaskManager("pool", s)
    assert "secret" not in str(err.value) and "user:***@" in str(err.value)
