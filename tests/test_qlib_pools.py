"""Existing Qlib task pools, both directions, with real pyqlib (issue 13.6).

* A pool written by Qlib 0.9.7's own ``TaskManager`` (pointed at the test's database through
  ``qlib.config.C["mongo"]``, as Qlib reads it) is adopted by qcelery in one call
  (``TaskManager.adopt``, the API of ``qcelery adopt``); real Celery workers serve its tasks,
  and enqueueing the same definitions again adds no task.
* A pool qcelery writes (tasks waiting, done with a result, failed, with a result in GridFS)
  is readable by Qlib's ``TaskManager.query`` / ``re_query`` / ``task_stat``: Qlib unpickles
  every field whose name starts with ``def`` or ``res``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from qlib_support import qlib_pool_task

from qcelery import status as st
from qcelery.celery_app import app_for
from qcelery.cluster import Cluster
from qcelery.errors import ForeignCollectionError
from qcelery.manage import TaskManager
from qcelery.producer import enqueue
from qcelery.trainer_celery import wait_batch

TESTS = Path(__file__).resolve().parent


@contextlib.contextmanager
def qlib_mongo(servers, settings) -> Iterator[None]:
    """Qlib's TaskManager on the test's database: ``C["mongo"]`` is what Qlib's ``get_mongodb`` reads."""
    from qlib.config import C

    before = C["mongo"]
    C["mongo"] = {"task_url": servers.mongo_url, "task_db_name": settings.mongo_db}
    try:
        yield
    finally:
        C["mongo"] = before


@pytest.fixture
def pool_settings(settings):
    return settings.model_copy(update={"allowed_modules": ["qlib_support"], "default_queue": f"pools-{uuid.uuid4().hex[:8]}"})


def test_a_pool_qlib_filled_is_adopted_served_by_workers_and_deduplicated(servers, pool_settings, mongo_db):
    from qlib.workflow.task.manage import TaskManager as QlibTaskManager

    defs = [qlib_pool_task(seed) for seed in range(4)]
    with qlib_mongo(servers, pool_settings):
        qlib_tm = QlibTaskManager("qlib_filled")
        qlib_ids = qlib_tm.create_task(defs[:3])
        # one task Qlib's own pull loop already finished, with Qlib's result
        fetched = qlib_tm.fetch_task(query={"_id": qlib_ids[0]})
        qlib_tm.commit_task_res(fetched, {"trained_by": "qlib"})

    with pytest.raises(ForeignCollectionError, match="qcelery adopt qlib_filled"):
        TaskManager("qlib_filled", pool_settings)
    tm, adopted = TaskManager.adopt("qlib_filled", pool_settings)
    assert adopted == 3 and tm.task_stat() == {"done": 1, "waiting": 2}

    cluster = Cluster(pool_settings, extra_env={"PYTHONPATH": str(TESTS)})
    try:
        cluster.start_worker(pool_settings.default_queue, concurrency=1)
        cluster.wait_ready(app_for(pool_settings), timeout=120)
        # the same three definitions and a new one, as a qcelery producer sends them
        batch_id = enqueue(defs, "qlib_filled", settings=pool_settings, task_func="qlib_support.seed_task")
        batch = wait_batch(tm, batch_id, timeout=120)
    finally:
        cluster.stop()

    in_order = tm.create_task(defs)  # the definitions' ids, in order (every one exists: nothing written)
    assert [str(i) for i in in_order[:3]] == [str(i) for i in qlib_ids]
    assert all(batch["_id"] in tm.get_raw(i, ["batch_ids"])["batch_ids"] for i in in_order)  # all four are the batch's
    assert tm.task_pool.count_documents({}) == 4  # deduplicated against the adopted tasks: one new task
    assert tm.task_stat() == {"done": 4}
    results = {str(t["_id"]): t["res"] for t in tm.query()}
    assert results[str(qlib_ids[0])] == {"trained_by": "qlib"}  # a finished task is not run again
    assert sorted(r["seed"] for r in results.values() if "seed" in r) == [1, 2, 3]

    # and Qlib still reads the pool qcelery served
    with qlib_mongo(servers, pool_settings):
        qlib_tm = QlibTaskManager("qlib_filled")
        assert qlib_tm.task_stat() == {"done": 4}
        assert sorted(t["res"].get("seed", -1) for t in qlib_tm.query()) == [-1, 1, 2, 3]
        # Qlib finds every task by its filter, the new one qcelery inserted too: nothing added
        assert [str(i) for i in qlib_tm.create_task(defs)] == [str(i) for i in in_order]
        assert qlib_tm.task_pool.count_documents({}) == 4


def test_a_pool_qcelery_wrote_is_readable_by_qlibs_task_manager(servers, settings, mongo_db):
    from qlib.workflow.task.manage import TaskManager as QlibTaskManager

    tm = TaskManager("ours", settings.model_copy(update={"gridfs_threshold": 10_000}))
    waiting, done, failed, big, phase = tm.create_task([qlib_pool_task(seed) for seed in range(5)])
    assert tm.commit(tm.claim(done), {"score": 0.5})
    assert tm.fail(tm.claim(failed), "Traceback ...\nValueError: bad data", permanent=True) == st.FAILED
    assert tm.commit(tm.claim(big), np.arange(5_000.0))  # kept in GridFS
    assert tm.commit(tm.claim(phase), {"phase": 1}, st.PART_DONE)

    with qlib_mongo(servers, settings):
        qlib_tm = QlibTaskManager("ours")
        tasks = {t["_id"]: t for t in qlib_tm.query()}  # decodes every task, as Qlib's scripts do
        assert qlib_tm.task_stat() == {"waiting": 1, "done": 2, "failed": 1, "part_done": 1}
        assert [qlib_tm.re_query(str(i))["def"] for i in (waiting, done, failed, big, phase)] == [qlib_pool_task(s) for s in range(5)]
        # Qlib's own pull loop takes the waiting task and commits it; qcelery reads that back
        fetched = qlib_tm.fetch_task()
        assert fetched["_id"] == waiting and fetched["def"] == qlib_pool_task(0)
        qlib_tm.commit_task_res(fetched, {"score": 0.25})

    assert tasks[done]["res"] == {"score": 0.5} and tasks[phase]["res"] == {"phase": 1}
    # no result yet, or a result Qlib cannot see (in GridFS): no res field, never res: None
    assert "res" not in tasks[waiting] and "res" not in tasks[failed] and "res" not in tasks[big]
    assert tasks[failed]["error"].endswith("ValueError: bad data")
    assert tm.re_query(waiting)["res"] == {"score": 0.25} and tm.re_query(waiting)["status"] == st.DONE
    np.testing.assert_array_equal(tm.re_query(big)["res"], np.arange(5_000.0))
