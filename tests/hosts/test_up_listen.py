"""`qcelery up --listen ADDR` on a server host, joined by a worker host and a producer host
with nothing but a copy of the join file (network namespaces; nothing on 127.0.0.1 is
used across hosts).

Properties: the batch enqueued on the producer host runs on the worker host (its MLflow
runs logged through the tracking server's basic auth) and is aggregated exactly once;
every server of the stack refuses a client without its password, from another host;
nothing listens on the server host's address without authentication; no password is
printed; `qcelery down` stops it all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pymongo
import pytest
import redis
import tomllib
from bson import ObjectId
from hosts_support import Host, network, wait_until
from mlflow.tracking import MlflowClient
from pymongo.errors import OperationFailure

from qcelery.probes import AGGREGATIONS

CLI = [sys.executable, "-m", "qcelery.cli.main"]
DB = "joined"
POOL = "joined_probes"
FLOWER_AUTH = "ops:flower-secret-pw"
FAST = dict(
    QCELERY_LEASE_SECONDS="8", QCELERY_HEARTBEAT_SECONDS="2", QCELERY_RECOVER_INTERVAL="1", QCELERY_SWEEP_INTERVAL="2",
    QCELERY_AGGREGATE_COUNTDOWN="1",
)  # fmt: skip


def _env(host: Host, **extra: str) -> dict[str, str]:
    """A clean environment on ``host``: no settings inherited from the test process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QCELERY_", "MLFLOW_", "FLOWER_"))}
    env.update(QCELERY_RUN_DIR=str(host.home / ".qcelery"), PYTHONPATH=str(Path(__file__).resolve().parents[2]), **FAST, **extra)
    return env


def _listening(host: Host) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening in ``host``'s network namespace."""
    out = subprocess.run(["ip", "netns", "exec", host.ns, "ss", "-ltnH"], capture_output=True, text=True, check=True, timeout=30).stdout
    found = set()
    for line in out.splitlines():
        local = line.split()[3]
        addr, _, port = local.rpartition(":")
        found.add((addr.strip("[]"), int(port)))
    return found


def _status(url: str, auth: str | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        import base64

        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


ENQUEUE = f"""
from qcelery.producer import enqueue
from qcelery.settings import load_settings
defs = [{{"key": f"j{{i}}", "experiment": "joined"}} for i in range(4)]
agg = {{"func": "qcelery.probes.counted_aggregate", "kwargs": {{}}}}
print(enqueue(defs, {POOL!r}, settings=load_settings(), aggregate=agg))
"""


def test_up_listen_is_joined_by_a_worker_and_a_producer_on_other_hosts_with_passwords_only(tmp_path_factory):
    with network(tmp_path_factory.mktemp("listen"), ["srv", "w1", "prod"]) as net:
        srv, w1, prod = net["srv"], net["w1"], net["prod"]
        srv_env = _env(srv, FLOWER_BASIC_AUTH=FLOWER_AUTH)
        run_dir = srv.home / ".qcelery"
        try:
            up = srv.run([*CLI, "up", "--listen", srv.addr, "--workers", "0", "--flower"], srv_env, timeout=420)
            assert up.returncode == 0, (up.stdout, up.stderr)
            _check_stack(net, srv, w1, prod, run_dir, up)
        finally:
            down = srv.run([*CLI, "down", "--timeout", "10"], srv_env, timeout=120)
        assert down.returncode == 0, (down.stdout, down.stderr)
        assert not (run_dir / "join.toml").exists() and not (run_dir / "state.json").exists()
        assert not {(a, p) for a, p in _listening(srv) if a != "127.0.0.1"}, "a server of the stack still listens after down"


def _check_stack(net, srv: Host, w1: Host, prod: Host, run_dir: Path, up: subprocess.CompletedProcess) -> None:
    join = run_dir / "join.toml"
    assert join.stat().st_mode & 0o777 == 0o600
    urls = tomllib.loads(join.read_text())
    assert "run_dir" not in urls  # each host keeps its own
    secrets = [(run_dir / f).read_text().strip() for f in ("mongo.password", "redis.password", "mlflow.password")]
    assert all(secrets) and all(s in join.read_text() for s in secrets)
    shown = up.stdout + up.stderr + (run_dir / "state.json").read_text()  # what `up` prints and records for `down`
    for s in [*secrets, FLOWER_AUTH.split(":")[1]]:
        assert s not in shown
    mongo, broker, tracking = (urlsplit(urls[k]) for k in ("mongo_url", "broker_url", "mlflow_tracking_uri"))
    assert {mongo.hostname, broker.hostname, tracking.hostname} == {srv.addr}

    # every socket on the server host's address is one of the stack's, each asking for a password
    flower = json.loads((run_dir / "state.json").read_text())
    [flower_url] = [p["detail"] for p in flower["processes"] if p["name"] == "flower"]
    flower_port = urlsplit(flower_url).port
    exposed = {(a, p) for a, p in _listening(srv) if a not in ("127.0.0.1", "::1")}
    assert exposed == {(srv.addr, p) for p in (mongo.port, broker.port, tracking.port, flower_port)}, exposed
    # ... and refuses a client without it (the test process is another host on the bridge)
    with pymongo.MongoClient(srv.addr, mongo.port, directConnection=True, serverSelectionTimeoutMS=10000) as anon:
        with pytest.raises(OperationFailure):
            anon[DB].list_collection_names()
        with pytest.raises(OperationFailure):
            anon[DB]["x"].insert_one({"a": 1})
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=srv.addr, port=broker.port, socket_timeout=10).ping()
    api = f"http://{srv.addr}:{tracking.port}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(api) == 401
    assert _status(api, f"{tracking.username}:{tracking.password}") == 200
    assert _status(f"http://{srv.addr}:{flower_port}/api/tasks") == 401
    assert _status(f"http://{srv.addr}:{flower_port}/api/tasks", FLOWER_AUTH) == 200

    # the other hosts join with a copy of the join file and nothing else
    for host in (w1, prod):
        shutil.copy(join, host.home / "join.toml")
        os.chmod(host.home / "join.toml", 0o600)
    joined = dict(QCELERY_CONFIG="join.toml", QCELERY_TASK_FUNC="qcelery.probes.recorded")
    w1.popen([*CLI, "worker", "--pool", "cpu", "--concurrency", "1"], _env(w1, **joined), "worker.log")
    enq = prod.run([sys.executable, "-c", ENQUEUE], _env(prod, **joined), timeout=120)
    assert enq.returncode == 0, enq.stderr
    batch = enq.stdout.strip().splitlines()[-1]

    with pymongo.MongoClient(urls["mongo_url"], serverSelectionTimeoutMS=10000) as mc:
        db = mc[urls.get("mongo_db", "qcelery")]
        wait_until(lambda: db["qcelery_batches"].find_one({"_id": ObjectId(batch), "state": "aggregated"}), 240, "the batch aggregated")
        docs = list(db[POOL].find())
        assert len(docs) == 4 and {d["status"] for d in docs} == {"done"}
        time.sleep(3)  # a second aggregation would be recorded by now (countdown 1 s)
        assert db[AGGREGATIONS].count_documents({"event": "done"}) == 1
    client = MlflowClient(tracking_uri=urls["mlflow_tracking_uri"])
    exp = client.get_experiment_by_name("joined")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 4 and {r.data.tags["hostname"] for r in runs} == {"w1"}  # ran on w1, logged through basic auth
    assert (w1.home / "worker.log").exists() and not any(s in (w1.home / "worker.log").read_text() for s in secrets)


@pytest.mark.parametrize("address", ["0.0.0.0", "192.0.2.77", "not-an-address"])
def test_up_refuses_a_listen_address_other_hosts_cannot_use_before_starting_anything(tmp_path, address):
    """0.0.0.0 (join.toml would name no reachable host) and addresses that are not this
    host's: one error line naming the value, exit 2, nothing started or written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QCELERY_", "MLFLOW_", "FLOWER_"))}
    env["QCELERY_RUN_DIR"] = str(tmp_path / "run")
    res = subprocess.run([*CLI, "up", "--listen", address, "--workers", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.startswith(f"error: --listen {address!r}") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "run").exists()
