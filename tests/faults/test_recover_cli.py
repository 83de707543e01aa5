"""``qcelery recover`` with real work to recover: a worker killed (-9) in the middle of
two tasks leaves them ``running`` under leases that expire; with no beat running, the
command puts them back to ``waiting`` and re-publishes them at the top priority, as
beat's recover job does (they have waited already), ahead of a backlog of priority 8
that arrived meanwhile; each then completes once."""

from __future__ import annotations

import signal

from cli_support import cli_env, qcelery
from faults_support import POOL, assert_aggregated_once, counted_aggregation, fault_settings, running, wait_batch, wait_for
from side_effects import FILE_COUNTED, file_runs, start_order

from qcelery.celery_app import app_for
from qcelery.manage import TaskManager, utcnow
from qcelery.producer import enqueue

LOST = ["u0", "u1"]
BACKLOG = [f"b{i}" for i in range(6)]


def test_recover_command_requeues_expired_leases_first_and_they_run_once(settings, tmp_path):
    """Injects SIGKILL of a worker mid-task and lets its leases expire; proves ``qcelery
    recover`` returns exactly those tasks to waiting and re-publishes them ahead of the
    queue, after which each task completes once and both batches aggregate once."""
    fs = fault_settings(settings, **FILE_COUNTED, lease_seconds=4.0)
    tm = TaskManager(POOL, fs)
    env = cli_env(fs)
    with running(fs) as cluster:
        first = cluster.start_worker(fs.default_queue, concurrency=2)
        cluster.wait_ready(app_for(fs))
        lost = enqueue([{"key": k, "first_sleep": 60, "sleep": 0.05} for k in LOST], POOL, settings=fs, aggregate=counted_aggregation())
        wait_for(lambda: set(file_runs(fs)["start"]) == set(LOST), timeout=60, what="both lost tasks running")
        first.stop(sig=signal.SIGKILL)  # the worker and its pool processes die mid-task
        cluster.procs.remove(first)
        backlog = enqueue([{"key": k, "sleep": 0.05} for k in BACKLOG], POOL, settings=fs, priority=8, aggregate=counted_aggregation())

        def expired() -> bool:
            return tm.task_pool.count_documents({"status": "running", "lease_until": {"$lt": utcnow()}}) == len(LOST)

        wait_for(expired, timeout=60, what="the killed worker's leases expiring")
        r = qcelery("recover", cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
        assert f"pool '{POOL}': 2 task(s) back to waiting" in r.stdout
        assert "recovered 2 task(s) with an expired lease" in r.stdout
        back = {t["def"]["key"]: t for t in tm.query({"filter.key": {"$in": LOST}})}
        assert {k: (t["status"], t["attempt"], t["worker"], t["lease_until"]) for k, t in back.items()} == dict.fromkeys(
            LOST, ("waiting", 1, None, None)
        )
        assert all(t["published_at"] is not None for t in back.values())
        again = qcelery("recover", cwd=tmp_path, env=env)
        assert "recovered 0 task(s)" in again.stdout  # nothing else had expired

        cluster.start_worker(fs.default_queue, concurrency=1)
        cluster.start_beat()  # the lost batch's chord died with the worker: the sweep re-checks it
        cluster.wait_ready(app_for(fs))
        for bid in (lost, backlog):
            assert_aggregated_once(fs, wait_batch(tm, bid))

    order = start_order(fs)
    assert set(order[:2]) == set(LOST)  # the killed runs
    assert set(order[2:4]) == set(LOST), order  # re-published at the top priority: ahead of the backlog
    assert set(order[4:]) == set(BACKLOG) and len(order) == 10, order
    runs = file_runs(fs)
    assert {k: runs["done"][k] for k in LOST + BACKLOG} == dict.fromkeys(LOST + BACKLOG, 1)
    assert {t["def"]["key"]: (t["status"], t["attempt"]) for t in tm.query({})} == {
        **dict.fromkeys(LOST, ("done", 2)),
        **dict.fromkeys(BACKLOG, ("done", 1)),
    }
