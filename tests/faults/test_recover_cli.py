"""``qcelery recover`` with real work to recover: a worker killed (-9) in the middle of
two tasks of a priority batch leaves them ``running`` under leases that expire; with no
beat running, the command puts them back to ``waiting`` and re-publishes them at their
batch's priority, ahead of a backlog that arrived meanwhile; each then completes once."""

from __future__ import annotations

import signal

from cli_support import cli_env, qcelery
from faults_support import POOL, fault_settings, running, wait_batch, wait_for
from side_effects import TASK_FUNC, file_runs, start_order

from qcelery.celery_app import app_for
from qcelery.manage import TaskManager, utcnow
from qcelery.producer import enqueue

URGENT = ["u0", "u1"]
BACKLOG = [f"b{i}" for i in range(6)]


def test_recover_command_requeues_expired_leases_at_their_priority_and_they_run_once(settings, tmp_path):
    """Injects SIGKILL of a worker mid-task and lets its leases expire; proves ``qcelery
    recover`` returns exactly those tasks to waiting and re-publishes them at the batch's
    priority, after which each task completes once and both batches aggregate."""
    fs = fault_settings(settings, task_func=TASK_FUNC, lease_seconds=4.0)
    tm = TaskManager(POOL, fs)
    env = cli_env(fs)
    with running(fs) as cluster:
        first = cluster.start_worker(fs.default_queue, concurrency=2)
        cluster.wait_ready(app_for(fs))
        urgent = enqueue([{"key": k, "first_sleep": 60, "sleep": 0.05} for k in URGENT], POOL, settings=fs, priority=7)
        wait_for(lambda: set(file_runs(fs)["start"]) == set(URGENT), timeout=60, what="both urgent tasks running")
        first.stop(sig=signal.SIGKILL)  # the worker and its pool processes die mid-task
        cluster.procs.remove(first)
        backlog = enqueue([{"key": k, "sleep": 0.05} for k in BACKLOG], POOL, settings=fs)

        def expired() -> bool:
            return tm.task_pool.count_documents({"status": "running", "lease_until": {"$lt": utcnow()}}) == len(URGENT)

        wait_for(expired, timeout=60, what="the killed worker's leases expiring")
        r = qcelery("recover", cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
        assert f"pool '{POOL}': 2 task(s) back to waiting" in r.stdout
        assert "recovered 2 task(s) with an expired lease" in r.stdout
        back = {t["def"]["key"]: t for t in tm.query({"filter.key": {"$in": URGENT}})}
        assert {k: (t["status"], t["attempt"], t["worker"], t["lease_until"]) for k, t in back.items()} == dict.fromkeys(
            URGENT, ("waiting", 1, None, None)
        )
        assert all(t["published_at"] is not None for t in back.values())
        again = qcelery("recover", cwd=tmp_path, env=env)
        assert "recovered 0 task(s)" in again.stdout  # nothing else had expired

        cluster.start_worker(fs.default_queue, concurrency=1)
        cluster.start_beat()  # the urgent batch's chord died with the worker: the sweep re-checks it
        cluster.wait_ready(app_for(fs))
        wait_batch(tm, urgent)
        wait_batch(tm, backlog)

    order = start_order(fs)
    assert set(order[:2]) == set(URGENT)  # the killed runs
    assert set(order[2:4]) == set(URGENT), order  # re-published at priority 7: ahead of the backlog
    assert set(order[4:]) == set(BACKLOG) and len(order) == 10, order
    runs = file_runs(fs)
    assert {k: runs["done"][k] for k in URGENT + BACKLOG} == dict.fromkeys(URGENT + BACKLOG, 1)
    assert {t["def"]["key"]: (t["status"], t["attempt"]) for t in tm.query({})} == {
        **dict.fromkeys(URGENT, ("done", 2)),
        **dict.fromkeys(BACKLOG, ("done", 1)),
    }
