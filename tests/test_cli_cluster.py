"""``qcelery up``, then every task command against what it started, then ``down``.

One ``up`` (embedded SecantusDB + redis-server, one worker, beat) serves the module;
each command runs through the console script in a user's environment, which finds
the servers through the run directory's ``qcelery.toml``.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pymongo
import pytest
import redis
from bson import ObjectId
from cli_support import (
    PROBE,
    QCELERY,
    alive_groups,
    batch_id_from,
    cli_env,
    probe_workflow,
    qcelery,
    qcelery_many,
    state_pids,
    table_rows,
    wait_until,
)

from qcelery.manage import TaskManager
from qcelery.probes import RUNS
from qcelery.settings import Settings

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

FAST = {
    "QCELERY_AGGREGATE_COUNTDOWN": "0.5",  # summaries written soon after the last task
    "QCELERY_ALLOWED_MODULES": '["gated_probe"]',  # the user's own task function module, below
}


class Up:
    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.env = cli_env(**FAST, QCELERY_TASK_FUNC=PROBE)
        self.run_dir = cwd / ".qcelery"

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return qcelery(*args, cwd=self.cwd, env={**self.env, **env})

    def many(self, *commands: list[str]) -> list[subprocess.CompletedProcess]:
        return qcelery_many(list(commands), cwd=self.cwd, env=self.env)

    @property
    def live(self) -> dict:
        return tomllib.loads((self.run_dir / "qcelery.toml").read_text())

    def db(self):
        live = self.live
        return pymongo.MongoClient(live["mongo_url"], serverSelectionTimeoutMS=5000)[live["mongo_db"]]


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("up")
    u = Up(cwd)
    proc = u("up", "--workers", "1", "--concurrency", "2")
    assert proc.returncode == 0, proc.stderr
    u.up_output = proc.stdout + proc.stderr
    pids = state_pids(u.run_dir)
    try:
        yield u
    finally:
        down = u("down")
        assert down.returncode == 0, down.stderr
        assert "qcelery is down" in down.stdout
        assert wait_until(lambda: not alive_groups(pids), timeout=10), f"left running: {alive_groups(pids)}"
        assert not (u.run_dir / "state.json").exists() and not (u.run_dir / "qcelery.toml").exists()


def test_up_writes_the_live_settings_and_refuses_a_second_up(up):
    live = up.live
    assert live["mongo_url"].startswith("mongodb://127.0.0.1:") and live["broker_url"].startswith("redis://:")
    assert urlsplit(live["broker_url"]).hostname == "127.0.0.1"
    # MLflow: a tracking server on SQLite (not the deprecated file store), answering
    assert live["mlflow_tracking_uri"].startswith("http://127.0.0.1:")
    with urllib.request.urlopen(live["mlflow_tracking_uri"] + "/health", timeout=10) as health:
        assert health.status == 200
    assert (up.run_dir / "mlflow.db").is_file() and not (up.run_dir / "mlruns").exists()
    assert stat.S_IMODE(os.stat(up.run_dir / "qcelery.toml").st_mode) == 0o600
    names = [p["name"] for p in json.loads((up.run_dir / "state.json").read_text())["processes"]]
    assert names == ["mlflow", "secantusdb", "redis", "worker-cpu-1", "beat-1"]
    again = up("up")
    assert again.returncode == 2 and "already up" in again.stderr


def test_the_embedded_broker_wants_the_run_directory_password_and_nothing_shows_it(up):
    password = urlsplit(up.live["broker_url"]).password
    assert password and password == (up.run_dir / "redis.password").read_text().strip()
    assert stat.S_IMODE(os.stat(up.run_dir).st_mode) == 0o700
    port = urlsplit(up.live["broker_url"]).port
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port).lpush("cpu", b"this is {not json")
    status = up("status")
    assert status.returncode == 0, status.stderr
    shown = [up.up_output, status.stdout, status.stderr, (up.run_dir / "state.json").read_text()]
    shown += [log.read_text(errors="replace") for log in [*up.run_dir.glob("*.log"), *(up.run_dir / "logs").glob("*.log")]]
    assert not [text[:200] for text in shown if password in text]
    assert "redis://:***@127.0.0.1" in up.up_output


def test_enqueue_wait_status_collect(up):
    wf = probe_workflow(up.cwd / "three.yaml", windows=3, sleep=0.2)
    first = up("enqueue", str(wf))
    assert first.returncode == 0, first.stderr
    bid = batch_id_from(first)
    assert "3 tasks in pool 'probes', queue 'cpu': 3 new, 0 already done" in first.stdout

    waited = up("wait", "--batch", bid, "--poll", "0.2")
    assert waited.returncode == 0, waited.stderr
    assert f"batch {bid}: 3 done, 0 failed" in waited.stdout

    status, collected, as_json, pools = up.many(["status"], ["collect", "--batch", bid], ["collect", "--batch", bid, "--json"], ["pools"])
    row = next(line for line in status.stdout.splitlines() if bid in line)
    assert "probes" in row and "aggregated" in row
    assert collected.returncode == 0, collected.stderr
    assert f"batch {bid} (pool 'probes'): 3 tasks, 3 done" in collected.stdout
    assert json.loads(as_json.stdout)["counts"] == {"done": 3}
    assert ["probes", "3", "0", "0", "0", "3", "0"] in table_rows(pools.stdout)

    # the same workflow again: nothing new, nothing runs twice
    second = up("enqueue", str(wf))
    assert "0 new, 3 already done" in second.stdout
    assert up("wait", "--batch", batch_id_from(second), "--poll", "0.2").returncode == 0
    assert up.db()[RUNS].count_documents({"event": "done"}) == 3


def test_failed_tasks_make_wait_exit_1_and_status_shows_the_error(up):
    wf = probe_workflow(up.cwd / "failing.yaml", windows=2, fail=True, experiment="failing")
    bid = batch_id_from(up("enqueue", str(wf), "-q", QCELERY_MAX_ATTEMPTS="1"))
    waited = up("wait", "--batch", bid, "--poll", "0.2")
    assert waited.returncode == 1, waited.stderr
    assert "0 done, 2 failed" in waited.stdout

    status = up("status", "--batch", bid)
    assert status.returncode == 0
    failures = [row for row in table_rows(status.stdout) if row[-1].startswith("RuntimeError: probe")]
    assert len(failures) == 2 and all(row[1:3] == ["failing", "1"] for row in failures)

    retried = up("retry-failed", "--batch", bid)
    assert "2 failed task(s) back to waiting or part_done and re-published" in retried.stdout
    assert up("wait", "--batch", bid, "--poll", "0.2").returncode == 1  # they fail again, on their fresh attempt
    db = up.db()
    assert db["failing"].count_documents({"status": "failed", "attempt": 2}) == 2


GATED = """
import os, time
from pathlib import Path
from urllib.parse import urlsplit

def gated(task_def, tags):
    # runs until the test opens the gate, so the test decides when a run ends
    gate = Path(task_def["gate"])
    (gate.parent / f"started-{tags['attempt']}").touch()
    deadline = time.monotonic() + 120
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"attempt": tags["attempt"], "pid": os.getpid()}
"""


def test_reset_waiting_runs_a_running_task_again_and_the_first_run_cannot_commit(up):
    # a task function of the user's own, importable from the directory `up` ran in
    (up.cwd / "gated_probe.py").write_text(GATED)
    gate = up.cwd / "gate" / "open"
    gate.parent.mkdir()
    wf = probe_workflow(up.cwd / "gated.yaml", windows=1, experiment="gated", extra={"gate": str(gate)})
    env = {"QCELERY_TASK_FUNC": "gated_probe.gated", "PYTHONPATH": str(up.cwd)}
    bid = batch_id_from(up("enqueue", str(wf), "-q", **env))
    assert wait_until((gate.parent / "started-1").exists, timeout=60)
    reset = up("reset-waiting", "--batch", bid)
    assert "1 running task(s) reset to waiting" in reset.stdout
    # the second process of the worker takes the re-published task while the first still runs
    assert wait_until((gate.parent / "started-2").exists, timeout=60)
    gate.touch()
    assert up("wait", "--batch", bid, "--poll", "0.2").returncode == 0
    task = up.db()["gated"].find_one()
    assert task["status"] == "done" and task["attempt"] == 2
    live = up.live
    tm = TaskManager("gated", Settings(mongo_url=live["mongo_url"], mongo_db=live["mongo_db"]))
    assert tm.re_query(task["_id"])["res"]["attempt"] == "2"  # the first run's commit was refused


def test_prioritize_and_remove(up):
    wf = probe_workflow(up.cwd / "prio.yaml", windows=2, experiment="prio")
    bid = batch_id_from(up("enqueue", str(wf), "-q"))
    db = up.db()
    assert wait_until(lambda: db["prio"].count_documents({"status": "done"}) == 2, timeout=60)
    one = str(db["prio"].find_one()["_id"])
    by_id, recovered, refused = up.many(
        ["prioritize", "7", one, "--pool", "prio"], ["recover"], ["remove", "--batch", bid]
    )  # no terminal to confirm on
    assert by_id.returncode == 0, by_id.stderr
    assert db["prio"].find_one({"_id": ObjectId(one)})["priority"] == 7
    assert "recovered 0 task(s) with an expired lease" in recovered.stdout
    assert refused.returncode == 2 and "--yes" in refused.stderr
    by_batch = up("prioritize", "3", "--batch", bid)
    assert "2 task(s) of pool 'prio' at priority 3" in by_batch.stdout
    assert sorted(d["priority"] for d in db["prio"].find()) == [3, 3]
    removed = up("remove", "--batch", bid, "--yes")
    assert "removed 2 task(s)" in removed.stdout
    assert db["prio"].count_documents({}) == 0
    gone = up("status", "--batch", bid)
    assert gone.returncode == 2 and f"no batch {bid}" in gone.stderr


def test_down_cleans_up_after_a_crashed_up(tmp_path):
    env = cli_env(**FAST)
    run_dir = tmp_path / ".qcelery"
    proc = subprocess.Popen(
        [*QCELERY, "up", "--workers", "1", "--no-beat"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        state = run_dir / "state.json"
        assert wait_until(lambda: state.exists() and "worker-cpu-1" in state.read_text(), timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)  # `up` dies half-way: no clean-up of its own
        proc.wait()
    pids = state_pids(run_dir)
    assert alive_groups(pids), "the servers started before the crash should still run"
    down = qcelery("down", cwd=tmp_path, env=env)
    assert down.returncode == 0, down.stderr
    assert wait_until(lambda: not alive_groups(pids), timeout=10), f"left running: {alive_groups(pids)}"
    again = qcelery("down", cwd=tmp_path, env=env)
    assert again.returncode == 2 and "nothing is up" in again.stderr


def test_up_in_the_foreground_stops_everything_on_sigterm(tmp_path):
    env = cli_env(**FAST)
    proc = subprocess.Popen(
        [*QCELERY, "up", "--workers", "0", "--no-beat", "--foreground"],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "running in the foreground" in line:
                break
        pids = state_pids(tmp_path / ".qcelery")
        status = qcelery("pools", cwd=tmp_path, env=env)  # other shells find the servers meanwhile
        assert status.returncode == 0, status.stderr
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "qcelery is down" in rest
    assert not alive_groups(pids)
    assert not (tmp_path / ".qcelery" / "state.json").exists()


def test_enqueue_warns_when_no_live_worker_serves_the_queue(up):
    wf = probe_workflow(up.cwd / "unserved.yaml", windows=1, experiment="unserved")
    served = up("enqueue", str(wf), "-q")
    assert served.returncode == 0 and "warning" not in served.stderr, served.stderr
    nobody = up("enqueue", str(wf), "--queue", "nobody-here", "-q", "--pool", "unserved2")
    assert nobody.returncode == 0, nobody.stderr
    [line] = [x for x in nobody.stderr.splitlines() if x.startswith("warning: ")]
    assert "no live worker serves queue 'nobody-here'" in line and "cpu" in line and "qcelery worker --pool nobody-here" in line
    # the batch is there all the same, waiting for a worker of that queue
    bid = nobody.stdout.strip().splitlines()[-1]
    assert up.db()["unserved2"].count_documents({"status": "waiting", "batch_ids": ObjectId(bid)}) == 1
    assert up("remove", "--batch", bid, "--yes").returncode == 0
