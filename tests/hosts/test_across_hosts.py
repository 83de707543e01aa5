"""A cluster on four machines: servers on one, a worker on each of two others, the
producer on a fourth (network namespaces with their own addresses, hostnames and run
directories; no shared disk, nothing on 127.0.0.1).

Set-up proved: the servers listen on their host's address with passwords (SecantusDB
with SCRAM users and --sync-on-commit, redis-server with requirepass, an MLflow tracking
server serving artifacts); workers and the producer join with one set of URLs. The
demo workflow runs on both worker hosts, is aggregated exactly once, and `qcelery
collect` on the producer's host shows a report that is a file on that host.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hosts_support import host_env, network, start_servers
from pymongo import MongoClient

from qcelery.celery_app import app_for
from qcelery.cluster import Cluster
from qcelery.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
FAST = dict(QCELERY_LEASE_SECONDS="8", QCELERY_HEARTBEAT_SECONDS="2", QCELERY_RECOVER_INTERVAL="1", QCELERY_SWEEP_INTERVAL="2")


def _cluster_on(host, servers, db: str) -> Cluster:
    settings = Settings(
        mongo_url=servers.mongo_url,
        mongo_db=db,
        broker_url=servers.broker_url,
        mlflow_tracking_uri=servers.tracking_uri,
        run_dir=host.home / ".qcelery",
        lease_seconds=8,
        heartbeat_seconds=2,
        recover_interval=1,
        sweep_interval=2,
    )
    return Cluster(settings, launcher=host.launcher)


def test_demo_batch_runs_on_two_worker_hosts_and_is_collected_on_the_producer_host(tmp_path):
    db = "across_hosts"
    with network(tmp_path, ["srv", "w1", "w2", "prod"]) as net:
        servers = start_servers(net["srv"], VENV_BIN)
        clusters = [_cluster_on(net[name], servers, db) for name in ("w1", "w2", "srv")]
        try:
            for c in clusters[:2]:
                c.start_worker("cpu", concurrency=1)
            clusters[2].start_beat()
            clusters[0].wait_ready(app_for(clusters[0].settings), 2, timeout=120)

            prod, env = net["prod"], host_env(net["prod"], servers, db, **FAST)
            enq = prod.run([sys.executable, "-m", "qcelery.cli.main", "enqueue", str(ROOT / "config" / "demo.yaml"), "-q"], env)
            assert enq.returncode == 0, enq.stderr
            bid = enq.stdout.strip().splitlines()[-1]
            waited = prod.run([sys.executable, "-m", "qcelery.cli.main", "wait", "--batch", bid, "--timeout", "240"], env)
            assert waited.returncode == 0, (waited.stdout, waited.stderr)
            collected = prod.run([sys.executable, "-m", "qcelery.cli.main", "collect", "--batch", bid], env)
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
            batch = mc[db]["qcelery_batches"].find_one()
            assert batch["state"] == "aggregated"
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=servers.tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name("qcelery_demo").experiment_id], max_results=100)
        assert len(runs) == 16 and {r.info.status for r in runs} == {"FINISHED"}
        assert {r.data.tags.get("hostname") for r in runs} == {"w1", "w2"}
        summaries = client.search_runs([client.get_experiment_by_name("qcelery_demo.summary").experiment_id])
        assert len(summaries) == 1
        # the aggregating worker wrote its own copy under its own run directory, elsewhere
        worker_reports = [p for h in ("w1", "w2") for p in (net[h].home / ".qcelery" / "reports").glob("*/report.html")]
        assert len(worker_reports) == 1 and worker_reports[0].parent.name == bid
