"""Workers are supervised and visible.

``qcelery up`` (its ``Stack``) runs each worker under ``qcelery.supervise``: a worker
killed with SIGKILL comes back as a new process under the same name and serves the
next batch, and stopping the stack leaves nothing behind. Every worker records itself
in ``qcelery_workers``; ``qcelery status`` lists them with their queues and when each
was last heard from, and a worker that died shows as ``lost``, one stopped as ``stopped``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from cli_support import cli_env, qcelery, table_rows
from faults_support import POOL, assert_exactly_once, probe_defs, running, wait_batch, wait_for

from qcelery.celery_app import CONTROL_QUEUE, app_for
from qcelery.cli.rundir import group_members
from qcelery.cli.stack import Stack, StackOptions
from qcelery.errors import EmbeddedServerError
from qcelery.manage import TaskManager
from qcelery.presence import LOST, ONLINE, STOPPED, WORKERS, state_of
from qcelery.producer import enqueue
from qcelery.store import database
from qcelery.supervise import GIVE_UP_AFTER


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_a_worker_killed_under_up_is_restarted_and_serves(fsettings):
    workers = database(fsettings)[WORKERS]
    tm = TaskManager(POOL, fsettings)
    stack = Stack(fsettings, StackOptions(workers=1, concurrency=1, beat=True))
    stack.start()
    try:
        supervisor = next(p for p in stack.cluster.procs if p.name.startswith("worker"))
        name = f"{supervisor.name}@{socket.gethostname()}"
        first = wait_for(lambda: workers.find_one({"_id": name, "state": ONLINE}), what=f"{name} online")
        assert first["pid"] != supervisor.pid and first["queues"] == sorted([fsettings.default_queue, CONTROL_QUEUE])

        pool_processes = _children(first["pid"])
        assert pool_processes
        os.kill(first["pid"], signal.SIGKILL)

        again = wait_for(
            lambda: workers.find_one({"_id": name, "state": ONLINE, "pid": {"$ne": first["pid"]}}), timeout=90, what=f"{name} restarted"
        )
        assert again["starts"] == first["starts"] + 1
        assert supervisor.alive() and _pid_alive(again["pid"]) and not _pid_alive(first["pid"])
        # the dead worker's pool process does not linger (it sees its parent gone)
        wait_for(lambda: not any(_pid_alive(c) for c in pool_processes), timeout=60, what="the old pool process gone")
        bid = enqueue(probe_defs(6, sleep=0.05), POOL, settings=fsettings)
        assert_exactly_once(fsettings, tm, wait_batch(tm, bid))
        log = supervisor.log.read_text(errors="replace")
        assert f"supervisor: {supervisor.name} (pid {first['pid']}) exited with -9" in log
        assert f"supervisor: {supervisor.name} restarted (start 2, pid {again['pid']})" in log
    finally:
        groups = [p.pid for p in stack.cluster.procs] if stack.cluster else []
        stack.stop()
    # the stop reached the supervisors and everything they started
    assert groups and not any(group_members(g) for g in groups)
    assert workers.find_one({"_id": name})["state"] == STOPPED


def test_a_worker_that_cannot_start_is_given_up_and_up_reports_why(fsettings):
    # a worker that exits at once every time (here: an --autoscale it cannot parse)
    stack = Stack(fsettings, StackOptions(workers=1, autoscale="many,few", beat=False, ready_timeout=240))
    with pytest.raises(EmbeddedServerError) as raised:
        stack.start()
    message = str(raised.value)
    assert message.startswith("worker-") and "exited with 1" in message
    assert f"exited with 1 {GIVE_UP_AFTER} times in a row" in message and "giving up" in message
    assert "ValueError" in message  # the worker's own error, from its log
    [log] = (Path(fsettings.run_dir) / "logs").glob("worker-*.log")
    assert log.read_text(errors="replace").count("restarted (start") == GIVE_UP_AFTER - 1


def test_status_lists_the_workers_and_shows_a_dead_one_lost(fsettings, tmp_path):
    workers = database(fsettings)[WORKERS]
    host = socket.gethostname()
    env = cli_env(fsettings)

    def rows() -> dict[str, list[str]]:
        res = qcelery("status", cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stderr
        return {r[0]: r for r in table_rows(res.stdout) if r and r[0].endswith(f"@{host}")}

    with running(fsettings) as cluster:
        doomed = cluster.start_worker(fsettings.default_queue, concurrency=1, name="doomed")
        steady = cluster.start_worker(fsettings.default_queue, concurrency=1, name="steady")
        cluster.wait_ready(app_for(fsettings))
        for proc in (doomed, steady):
            wait_for(lambda p=proc: workers.find_one({"_id": f"{p.name}@{host}", "state": ONLINE}), what=f"{proc.name} online")

        doomed.stop(sig=signal.SIGKILL)  # no warm shutdown: it just stops reporting
        wait_for(lambda: state_of(workers.find_one({"_id": f"doomed@{host}"})) == LOST, timeout=60, what="doomed seen as lost")

        table = rows()
        assert table[f"doomed@{host}"][1] == LOST
        assert table[f"steady@{host}"][1] == ONLINE
        assert table[f"steady@{host}"][2] == ",".join(sorted([fsettings.default_queue, CONTROL_QUEUE]))
        assert table[f"steady@{host}"][3] == str(workers.find_one({"_id": f"steady@{host}"})["pid"])
        assert table[f"steady@{host}"][4].endswith(" ago")

        steady.stop()  # warm shutdown: it says goodbye
        assert rows()[f"steady@{host}"][1] == STOPPED
