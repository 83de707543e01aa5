"""kill -9 of the Mongo server mid-batch, within milliseconds of a task's commit (the
writes a crash can lose are the latest ones), then a restart on the same port and data
directory: every commit acknowledged before the kill is still there, no task runs twice
to completion (counted in a file, outside the killed server), and the batch finishes.
"""

from __future__ import annotations

import time

import pytest
from faults_support import DOWNTIME, POOL, assert_aggregated_once, counted_aggregation, fault_settings, started, wait_batch, wait_for
from side_effects import FILE_COUNTED, file_runs

from qcelery.manage import TaskManager
from qcelery.producer import enqueue

N_TASKS = 16


def test_mongo_killed_right_after_commits_keeps_them_and_runs_each_task_once(settings, own_mongo):
    """Injects SIGKILL of SecantusDB a few ms after the first commits; proves acknowledged
    claims and commits survive the crash, so nothing is handed out or run again."""
    fs = fault_settings(settings, mongo_url=own_mongo.url, lease_seconds=10.0, **FILE_COUNTED)
    tm = TaskManager(POOL, fs)
    with started(fs) as cluster:
        bid = enqueue([{"key": f"t{i}", "sleep": 0.3} for i in range(N_TASKS)], POOL, settings=fs, aggregate=counted_aggregation())

        def commits() -> dict | None:
            done = {d["_id"]: d["attempt"] for d in tm.task_pool.find({"status": "done"}, {"attempt": 1})}
            return done if len(done) >= 3 else None

        committed = wait_for(commits, timeout=60, poll=0.002, what="3 tasks committed")
        own_mongo.kill()
        time.sleep(DOWNTIME)
        own_mongo.start()

        batch = wait_batch(tm, bid, timeout=120)

        after = {d["_id"]: d for d in tm.task_pool.find({}, {"status": 1, "attempt": 1, "res": 1})}
        assert {i: after[i]["attempt"] for i in committed} == committed  # still done at the same attempt, not redone
        assert len(after) == N_TASKS and {d["status"] for d in after.values()} == {"done"}
        runs = file_runs(fs)
        keys = {f"t{i}" for i in range(N_TASKS)}
        assert {k: runs["done"][k] for k in keys} == dict.fromkeys(keys, 1)
        assert {tm.re_query(i)["res"]["key"] for i in after} == keys
        assert batch["summary"]["counts"] == {"done": N_TASKS}
        assert_aggregated_once(fs, batch)
        assert all(p.alive() for p in cluster.procs)


@pytest.mark.parametrize("claim_strategy", ["find_one_and_update", "two_step"])
def test_acknowledged_claims_commits_and_fails_survive_a_kill(settings, own_mongo, claim_strategy):
    """Injects SIGKILL of SecantusDB right after a run of acknowledged lease writes (no
    worker, no delay); proves each claim, commit and fail is on disk once acknowledged."""
    fs = fault_settings(settings, mongo_url=own_mongo.url, max_attempts=1, claim_strategy=claim_strategy)
    tm = TaskManager(POOL, fs)
    ids = tm.create_task([{"key": f"t{i}"} for i in range(12)])
    time.sleep(1.0)  # the inserts are not under test: let the server flush them
    for i in ids[:10]:
        assert tm.commit(tm.claim(i), {"i": str(i)})
    assert tm.fail(tm.claim(ids[10]), "Traceback: boom") == "failed"
    held = tm.fetch_task()
    assert held["_id"] == ids[11]
    own_mongo.kill()
    own_mongo.start()

    after = {d["_id"]: (d["status"], d["attempt"]) for d in tm.task_pool.find({}, {"status": 1, "attempt": 1})}
    assert after == {**{i: ("done", 1) for i in ids[:10]}, ids[10]: ("failed", 1), ids[11]: ("running", 1)}
    assert [tm.re_query(i)["res"] for i in ids[:10]] == [{"i": str(i)} for i in ids[:10]]
