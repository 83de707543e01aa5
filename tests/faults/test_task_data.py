"""Task data is never code, and every task ends with its real reason, on real workers.

A pool and its batches are data anyone with write access to Mongo can edit. Here they
are edited between ``enqueue`` and the workers' start, the way an attacker or a bad
migration would: a batch naming ``os.system`` / ``subprocess.run`` / ``builtins.eval``
as its function (with a definition that would make it create a file), a definition
naming ``os.system`` as its model, corrupt counters and statuses, undecodable
definitions, results that cannot be pickled. Each such task must end ``failed`` at once
(one attempt, no retry, nothing run), with an error that says what is wrong; the other
tasks run once; every batch still aggregates exactly once; nothing loops.
"""

from __future__ import annotations

import pickle

from bson import Binary, ObjectId
from faults_support import (
    POOL,
    assert_aggregated_once,
    counted_aggregation,
    fault_settings,
    probe_defs,
    probe_runs,
    started,
    wait_batch,
    wait_for,
)

from qcelery import batch as batches
from qcelery import status as st
from qcelery.manage import TaskManager
from qcelery.producer import enqueue

SETTING = "QCELERY_ALLOWED_MODULES"
USER_FUNC = "tests.faults.task_data_support.run"


def task_doc(tm: TaskManager, key: str) -> dict:
    return tm.task_pool.find_one({"filter.key": key})


def edit_task(tm: TaskManager, key: str, **fields) -> None:
    assert tm.task_pool.update_one({"filter.key": key}, {"$set": fields}).modified_count == 1


def snapshot(tm: TaskManager) -> dict:
    """What a loop would change: statuses, attempts, publish and update times."""
    fields = {"status": 1, "attempt": 1, "published_at": 1, "updated_at": 1}
    return {d["_id"]: tuple(d.get(f) for f in fields) for d in tm.task_pool.find({}, fields)}


def edit_batch(tm: TaskManager, batch_id: str, **fields) -> None:
    assert tm.db[batches.COLLECTION].update_one({"_id": ObjectId(batch_id)}, {"$set": fields}).modified_count == 1


class Shell:
    """Pickles as a call of ``os.system``: what a hostile ``def`` would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_an_edited_pool_naming_os_system_subprocess_or_eval_runs_nothing(settings, tmp_path):
    fs = fault_settings(settings)
    tm = TaskManager(POOL, fs)
    made = {name: tmp_path / f"made-by-{name}" for name in ("system", "run", "eval", "model", "aggregate")}

    # enqueued while no worker runs, then edited in Mongo before any worker starts
    counted = counted_aggregation()
    by_system = enqueue(probe_defs(2, "s"), POOL, settings=fs, aggregate=counted)
    edit_batch(tm, by_system, task_func="os.system")
    edit_task(tm, "s0", **{"def": Binary(pickle.dumps(f"touch {made['system']}"))})

    by_run = enqueue(probe_defs(1, "r"), POOL, settings=fs, aggregate=counted)
    edit_batch(tm, by_run, task_func="subprocess.run")
    edit_task(tm, "r0", **{"def": Binary(pickle.dumps(["touch", str(made["run"])]))})

    by_eval = enqueue(probe_defs(1, "e"), POOL, settings=fs, aggregate=counted)
    edit_batch(tm, by_eval, task_func="builtins.eval")
    edit_task(tm, "e0", **{"def": Binary(pickle.dumps(f"__import__('pathlib').Path({str(made['eval'])!r}).touch()"))})

    # the trainer would build this model: os.system(command="touch ...")
    by_model = enqueue(
        probe_defs(1, "m"),
        POOL,
        settings=fs,
        aggregate=counted,
        task_func="qcelery.trainer.task_train",
        task_kwargs={"experiment_name": "edited"},
    )
    model = {"class": "system", "module_path": "os", "kwargs": {"command": f"touch {made['model']}"}}
    edited_def = {"model": model, "dataset": {"class": "DatasetH", "module_path": "qcelery.data", "kwargs": {"segments": {}}}}
    edit_task(tm, "m0", **{"def": Binary(pickle.dumps(edited_def))})

    by_aggregate = enqueue(probe_defs(2, "g"), POOL, settings=fs, aggregate=None)
    edit_batch(tm, by_aggregate, aggregate={"func": "subprocess.run", "kwargs": {"args": ["touch", str(made["aggregate"])]}})

    with started(fs):
        done = {bid: wait_batch(tm, bid, timeout=120) for bid in (by_system, by_run, by_eval, by_model, by_aggregate)}

    assert [p for p in made.values() if p.exists()] == []
    for key, module in (("s0", "os"), ("s1", "os"), ("r0", "subprocess"), ("e0", "builtins"), ("m0", "os")):
        doc = task_doc(tm, key)
        assert (doc["status"], doc["attempt"]) == (st.FAILED, 1), key  # at once: no retry of a refusal
        assert "ModuleNotAllowedError" in doc["error"] and f"{module}." in doc["error"] and SETTING in doc["error"], doc["error"]
    # the batch with a refused collector: its tasks ran once, the refusal is in its summary
    assert [task_doc(tm, k)["status"] for k in ("g0", "g1")] == [st.DONE, st.DONE]
    summary = done[by_aggregate]["summary"]
    assert "aggregate function 'subprocess.run'" in summary["aggregate_error"] and SETTING in summary["aggregate_error"]
    for bid in (by_system, by_run, by_eval, by_model):
        assert_aggregated_once(fs, done[bid])
    assert done[by_aggregate]["aggregate_runs"] == 1
    assert probe_runs(fs)["start"] == {"g0": 1, "g1": 1}  # no refused task ran its probe either


def test_every_task_ends_with_its_real_reason_at_once_and_the_batch_aggregates_once(settings):
    fs = fault_settings(settings, task_func=USER_FUNC, allowed_modules=["tests.faults.task_data_support"])
    tm = TaskManager(POOL, fs)
    defs = [
        {"key": "ok0"},
        {"key": "ok1"},
        {"key": "lock", "result": "lock"},
        {"key": "raises", "result": "raises"},
        {"key": "abc"},
        {"key": "bogus"},
        {"key": "garbage"},
        {"key": "shell"},
        {"key": "corrupt_max", "fail": True},
    ]
    bid = enqueue(defs, POOL, settings=fs, aggregate=counted_aggregation())
    edit_task(tm, "abc", attempt="abc")
    edit_task(tm, "bogus", status="bogus")
    edit_task(tm, "garbage", **{"def": Binary(b"\x80\x05 this is no pickle")})
    edit_task(tm, "shell", **{"def": Binary(pickle.dumps({"key": "shell", "x": Shell("touch /nonexistent-qcelery")}))})
    edit_task(tm, "corrupt_max", max_attempts="three")

    with started(fs):
        batch = wait_batch(tm, bid, timeout=120)
        # then beat sweeps and recovers a few more times: nothing is published again, nothing changes
        stamp = snapshot(tm)
        sweeps = tm.db["qcelery_beat_log"].count_documents({"job": "sweep"})
        wait_for(lambda: tm.db["qcelery_beat_log"].count_documents({"job": "sweep"}) >= sweeps + 3, timeout=60, what="3 more sweeps")
    doc = {k: task_doc(tm, k) for k in (d["key"] for d in defs)}

    assert_aggregated_once(fs, batch)
    failed_ids = {str(d["_id"]) for d in tm.task_pool.find({"batch_ids": batch["_id"], "status": st.FAILED}, {"_id": 1})}
    assert {f["task_id"] for f in batch["summary"]["failures"]} == failed_ids and len(failed_ids) == 7
    assert {k: d["status"] for k, d in doc.items()} == {
        "ok0": st.DONE,
        "ok1": st.DONE,
        "lock": st.FAILED,
        "raises": st.FAILED,
        "abc": st.FAILED,
        "bogus": st.FAILED,
        "garbage": st.FAILED,
        "shell": st.FAILED,
        "corrupt_max": st.FAILED,
    }
    # unpicklable results: trained once, failed at once with the cause, not "lease expired"
    runs = probe_runs(fs)
    assert runs["start"] == {"ok0": 1, "ok1": 1, "lock": 1, "raises": 1, "corrupt_max": 1}
    for key, cause in (("lock", "cannot pickle '_thread.lock'"), ("raises", "this result refuses to be pickled")):
        assert doc[key]["attempt"] == 1 and "ResultEncodeError" in doc[key]["error"] and cause in doc[key]["error"], doc[key]["error"]
        assert "cannot be pickled" in doc[key]["error"]
    assert "its attempt is 'abc', not a number" in doc["abc"]["error"]
    assert "its status 'bogus' is not one of" in doc["bogus"]["error"]
    assert doc["garbage"]["attempt"] == 1 and "could not be decoded" in doc["garbage"]["error"]
    assert doc["shell"]["attempt"] == 1 and "refusing to load global posix.system" in doc["shell"]["error"]
    assert doc["corrupt_max"]["attempt"] == 1 and "max_attempts 'three' is not a number" in doc["corrupt_max"]["error"]
    assert snapshot(tm) == stamp
