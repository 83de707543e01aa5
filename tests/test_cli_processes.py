"""``qcelery worker`` and ``qcelery beat`` as a user starts them on a machine of their
own, against real servers named by QCELERY_* variables: a worker dies mid-task, beat
recovers the lease, a second worker (autoscaled) finishes the batch."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from cli_support import PROBE, QCELERY, alive_groups, batch_id_from, cli_env, probe_workflow, qcelery, wait_until


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []

    def start(*args: str, cwd, env) -> subprocess.Popen:
        with open(cwd / f"{args[0]}-{len(started)}.log", "wb") as log:  # the child keeps its own descriptor
            p = subprocess.Popen(
                [*QCELERY, *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in started:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    assert wait_until(lambda: not alive_groups(p.pid for p in started), timeout=10)


def test_a_killed_worker_s_task_is_recovered_by_beat_and_finished_by_another_worker(tmp_path, settings, mongo_db, processes):
    env = cli_env(settings, QCELERY_TASK_FUNC=PROBE)
    first = processes("worker", "--pool", "cpu", "--concurrency", "1", "--hostname", "first@%h", cwd=tmp_path, env=env)
    processes("beat", cwd=tmp_path, env=env)
    wf = probe_workflow(tmp_path / "wf.yaml", windows=2, sleep=2.0, experiment="crash")
    bid = batch_id_from(qcelery("enqueue", str(wf), "-q", cwd=tmp_path, env=env))
    pool = mongo_db["crash"]
    assert wait_until(lambda: pool.count_documents({"status": "running"}) == 1, timeout=60)
    victim = pool.find_one({"status": "running"})
    assert victim["worker"].split(":")[1] != str(first.pid)  # the prefork child holds the lease
    os.killpg(first.pid, signal.SIGKILL)  # the machine dies: no warm shutdown, no commit
    first.wait()

    processes("worker", "--pool", "cpu", "--autoscale", "2,1", "--hostname", "second@%h", cwd=tmp_path, env=env)
    waited = qcelery("wait", "--batch", bid, "--timeout", "120", cwd=tmp_path, env=env, timeout=150)
    assert waited.returncode == 0, waited.stderr
    assert f"batch {bid}: 2 done, 0 failed" in waited.stdout
    again = pool.find_one({"_id": victim["_id"]})
    assert again["status"] == "done" and again["attempt"] == 2
    assert mongo_db["qcelery_beat_log"].count_documents({"job": "recover", "requeued": {"$gte": 1}}) >= 1
