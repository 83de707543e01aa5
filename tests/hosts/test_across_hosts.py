"""A cluster on four machines: servers on one, a worker on each of two others, the
producer on a fourth (network namespaces with their own addresses, hostnames and run
directories; nothing on 127.0.0.1).

The servers listen on their host's address with passwords (SecantusDB with SCRAM users
and --sync-on-commit, redis-server with requirepass, an MLflow tracking server serving
artifacts); workers and the producer join with one set of URLs.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import pytest
from bson import ObjectId
from hosts_support import host_env, network, start_servers, wait_until
from mlflow.tracking import MlflowClient
from pymongo import MongoClient

from qcelery.beat import BEAT_LOG
from qcelery.celery_app import app_for
from qcelery.cluster import Cluster
from qcelery.settings import Settings
from qcelery.worker import SUPERSEDED_TAG

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CLI = [sys.executable, "-m", "qcelery.cli.main"]
LEASE, HEARTBEAT, RECOVER = 8, 2, 1
FAST = dict(
    QCELERY_LEASE_SECONDS=str(LEASE), QCELERY_HEARTBEAT_SECONDS=str(HEARTBEAT), QCELERY_RECOVER_INTERVAL=str(RECOVER),
    QCELERY_SWEEP_INTERVAL="2",
)  # fmt: skip


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Four machines and the servers, shared by this module's tests (the MLflow server
    takes long to start); each test uses a database of its own."""
    with network(tmp_path_factory.mktemp("hosts"), ["srv", "w1", "w2", "prod"]) as net:
        yield net, start_servers(net["srv"], VENV_BIN)


def _cluster_on(host, servers, db: str, **overrides) -> Cluster:
    settings = Settings(
        mongo_url=servers.mongo_url, mongo_db=db, broker_url=servers.broker_url, mlflow_tracking_uri=servers.tracking_uri,
        run_dir=host.home / ".qcelery" / db, lease_seconds=LEASE, heartbeat_seconds=HEARTBEAT, recover_interval=RECOVER,
        sweep_interval=2, **overrides,
    )  # fmt: skip
    return Cluster(settings, launcher=host.launcher)


def _runs(servers, experiment: str) -> list:
    client = MlflowClient(tracking_uri=servers.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=200) if exp else []


def test_demo_batch_runs_on_two_worker_hosts_and_is_collected_on_the_producer_host(hosts):
    """The demo workflow runs on both worker hosts, is aggregated exactly once, and
    `qcelery collect` on the producer's host shows a report that is a file on that host."""
    net, servers = hosts
    db = "demo_across_hosts"
    clusters = [_cluster_on(net[name], servers, db) for name in ("w1", "w2", "srv")]
    prod, env = net["prod"], host_env(net["prod"], servers, db, **FAST)
    try:
        for c in clusters[:2]:
            c.start_worker("cpu", concurrency=1)
        clusters[2].start_beat()
        clusters[0].wait_ready(app_for(clusters[0].settings), 2, timeout=120)
        enq = prod.run([*CLI, "enqueue", str(ROOT / "config" / "demo.yaml"), "-q"], env)
        assert enq.returncode == 0, enq.stderr
        bid = enq.stdout.strip().splitlines()[-1]
        waited = prod.run([*CLI, "wait", "--batch", bid, "--timeout", "240"], env)
        assert waited.returncode == 0, (waited.stdout, waited.stderr)
        collected = prod.run([*CLI, "collect", "--batch", bid], env)
        assert collected.returncode == 0, collected.stderr
    finally:
        for c in clusters:
            c.stop(timeout=10)

    # the report shown is a file on the producer's host, fetched from the summary run
    [line] = [x for x in collected.stdout.splitlines() if x.startswith("report: ")]
    report = Path(line.removeprefix("report: "))
    assert report.is_relative_to(prod.home) and report.is_file()
    assert "Model comparison" in report.read_text()
    # every task done, the batch aggregated once, on tasks spread over both hosts
    with MongoClient(servers.mongo_url, serverSelectionTimeoutMS=10000) as mc:
        pool = mc[db]["demo"]
        assert pool.count_documents({"status": "done"}) == 16 == pool.count_documents({})
        assert mc[db]["qcelery_batches"].find_one()["state"] == "aggregated"
    runs = _runs(servers, "qcelery_demo")
    assert len(runs) == 16 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags.get("hostname") for r in runs} == {"w1", "w2"}
    assert len(_runs(servers, "qcelery_demo.summary")) == 1
    # the aggregating worker wrote its own copy under its own run directory, elsewhere
    worker_reports = [p for h in ("w1", "w2") for p in (net[h].home / ".qcelery").glob(f"*/reports/{bid}/report.html")]
    assert len(worker_reports) == 1


def test_a_worker_cut_off_mid_task_is_recovered_elsewhere_and_serves_again(hosts):
    """Fault: worker host w1 loses its link in the middle of a task (its run keeps
    going, unable to renew its lease). Property: beat puts the task back while w1 is still
    cut off, w2 runs it to the committed result; when w1's run ends after the link is
    back its commit is refused and its MLflow run is marked superseded (KILLED, tagged),
    so MLflow shows one FINISHED run for the task; and w1 then serves new tasks."""
    net, servers = hosts
    db = "cut_off"
    w1c, w2c, beat = (_cluster_on(net[n], servers, db, task_func="qcelery.probes.recorded") for n in ("w1", "w2", "srv"))
    app = app_for(w1c.settings)
    mc = MongoClient(servers.mongo_url, serverSelectionTimeoutMS=10000, tz_aware=True)
    pool = mc[db]["cut"]
    w1 = net["w1"]
    try:
        w1c.start_worker("cpu", concurrency=1)
        beat.start_beat()
        w1c.wait_ready(app, 1, timeout=120)
        from qcelery.producer import enqueue

        settings = w1c.settings
        bid = enqueue(
            [{"key": "long", "sleep": 25, "experiment": "cut"}], "cut", settings=settings,
            aggregate={"func": "qcelery.probes.counted_aggregate", "kwargs": {}},
        )  # fmt: skip
        first = wait_until(lambda: pool.find_one({"status": "running", "worker": {"$regex": "^w1:"}}), 60, "the task running on w1")
        w2c.start_worker("cpu", concurrency=1)
        w2c.wait_ready(app, 2, timeout=120)
        w1.cut()
        cut_at = dt.datetime.now(dt.timezone.utc)
        retaken = wait_until(
            lambda: pool.find_one({"_id": first["_id"], "attempt": 2, "worker": {"$regex": "^w2:"}}), 90, "the task taken by w2"
        )
        recovered = mc[db][BEAT_LOG].find_one({"job": "recover", "requeued": {"$gte": 1}})
        w1.reconnect()  # w1's run is still sleeping: it ends after this, and tries to commit
        done = wait_until(lambda: pool.find_one({"_id": first["_id"], "status": "done"}), 120, "the task done")
        # the chord's count was cut with w1 (the re-published message is outside it): the
        # batch is aggregated all the same, once
        batch = wait_until(lambda: mc[db]["qcelery_batches"].find_one({"_id": ObjectId(bid), "state": "aggregated"}), 120, "aggregated")

        def both_ended() -> list | None:
            rs = _runs(servers, "cut")
            return rs if len(rs) == 2 and all(r.info.status != "RUNNING" for r in rs) else None

        runs = wait_until(both_ended, 120, "both runs of the task ended")

        # w1 serves again once its link is back: with w2 gone, a new task runs there
        w2c.stop(timeout=10)
        enqueue([{"key": "after", "sleep": 0, "experiment": "cut"}], "cut", settings=settings)
        wait_until(lambda: pool.find_one({"filter.key": "after", "status": "done"}), 120, "a new task done by w1 after the cut")
    finally:
        for c in (w1c, w2c, beat):
            c.stop(timeout=10)
        w1.reconnect()

    # recovered while w1 was still cut off (not when it came back), within lease + interval
    assert recovered is not None and recovered["at"] >= cut_at
    assert retaken["started_at"] - cut_at < dt.timedelta(seconds=LEASE + 10 * RECOVER), retaken["started_at"] - cut_at
    assert done["attempt"] == 2
    by_host = {r.data.tags["hostname"]: r for r in runs}
    assert set(by_host) == {"w1", "w2"}
    assert by_host["w2"].info.status == "FINISHED" and SUPERSEDED_TAG not in by_host["w2"].data.tags
    assert by_host["w1"].info.status == "KILLED" and "attempt 1" in by_host["w1"].data.tags[SUPERSEDED_TAG]
    after = [r for r in _runs(servers, "cut") if r.data.tags.get("key") == "after"]
    assert [r.data.tags["hostname"] for r in after] == ["w1"]
    calls = list(mc[db]["qcelery_probe_aggregations"].find({"batch_id": ObjectId(bid), "event": "done"}))
    assert len(calls) == 1 and batch["summary"]["aggregate_call"] == str(calls[0]["call"])
    mc.close()


def test_broker_and_store_restart_while_workers_on_other_hosts_keep_running(hosts):
    """Fault: mid-batch, the redis-server on the servers' host is killed and started again
    empty (no persistence: every queued message and the chord's counter are gone); later
    SecantusDB is killed -9 and started again on its data. Property: the workers on w1 and
    w2 and beat ride both out in the same processes; the lost messages are re-published by
    the sweep; every task runs to completion exactly once and the batch is aggregated
    exactly once (counted by the probes' own records in Mongo)."""
    import signal

    from qcelery.producer import enqueue

    net, servers = hosts
    db = "restarts"
    clusters = [_cluster_on(net[n], servers, db, task_func="qcelery.probes.counted", sweep_after=4) for n in ("w1", "w2", "srv")]
    settings = clusters[0].settings
    mc = MongoClient(servers.mongo_url, serverSelectionTimeoutMS=10000)
    runs = mc[db]["qcelery_probe_runs"]
    n = 40
    try:
        for c in clusters[:2]:
            c.start_worker("cpu", concurrency=1)
        clusters[2].start_beat()
        clusters[0].wait_ready(app_for(settings), 2, timeout=120)
        procs = [p for c in clusters for p in c.procs]
        pids = [p.pid for p in procs]
        bid = enqueue(
            [{"key": f"r{i}", "sleep": 0.5} for i in range(n)], "restarts", settings=settings,
            aggregate={"func": "qcelery.probes.counted_aggregate", "kwargs": {}},
        )  # fmt: skip
        wait_until(lambda: runs.count_documents({"event": "done"}) >= 4, 120, "4 tasks done")
        servers.restart("redis", down_for=1.0)
        wait_until(lambda: runs.count_documents({"event": "done"}) >= 16, 180, "16 tasks done after the broker restart")
        servers.restart("mongo", signal.SIGKILL, down_for=1.0)
        batch = wait_until(
            lambda: mc[db]["qcelery_batches"].find_one({"_id": ObjectId(bid), "state": "aggregated"}), 240, "the batch aggregated"
        )
        assert [p.alive() for p in procs] == [True] * 3 and [p.pid for p in procs] == pids
    finally:
        for c in clusters:
            c.stop(timeout=10)

    done: dict[str, int] = {}
    for d in runs.find({"event": "done"}, {"key": 1}):
        done[d["key"]] = done.get(d["key"], 0) + 1
    assert done == {f"r{i}": 1 for i in range(n)}
    assert mc[db]["restarts"].count_documents({"status": "done"}) == n
    calls = list(mc[db]["qcelery_probe_aggregations"].find({"batch_id": ObjectId(bid), "event": "done"}))
    assert len(calls) == 1 and batch["summary"]["aggregate_call"] == str(calls[0]["call"])
    mc.close()
