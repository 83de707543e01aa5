"""Recovery latency after ``kill -9`` of the pool process running a task.

For each configuration (lease L, heartbeat H, beat recover interval R) one worker
(2 processes) and one beat run against real servers (embedded SecantusDB +
redis-server unless ``--mongo-url`` / ``--broker-url``). Each trial enqueues one
``qcelery.probes.counted`` task whose first run hangs and whose second returns at once,
kills the pool process running it once a few heartbeats have passed, and polls the
task document:

* lease left at the kill: ``lease_until`` - kill (at most L, at least L - H);
* expiry -> requeued: until beat's recover job put it back to ``waiting`` (<= R + job);
* kill -> running again: until another process claimed it (the recovery latency);
* kill -> done.

The bound is L + R (lease plus one beat interval); the Redis visibility timeout (7 days)
plays no part. Not a test: no thresholds.

``--backlog 0 1000`` repeats every configuration with that many tasks (0.5 s each) queued
on the same worker pool ahead of the trial task, so both worker processes are always busy;
the trial task is enqueued at priority 9, as a recovered one is re-published. The anchor
is the run without a backlog, in the same run: recovery should not depend on the queue.

    .venv/bin/python bench/recovery.py [--config 5,1,1 10,2,2] [--trials 5] [--backlog 0 1000]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fill_backlog(settings, n: int) -> None:
    """``n`` half-second tasks on the trial's worker pool, ahead of the trial task."""
    from qcelery.producer import enqueue

    if n:
        enqueue([{"key": f"b{i}", "sleep": 0.5} for i in range(n)], "backlog", settings=settings, task_func="qcelery.probes.counted")


def trial(settings, cluster, k: int, poll: float = 0.02) -> dict:
    from qcelery.manage import TaskManager
    from qcelery.producer import enqueue

    tm = TaskManager("recovery", settings)
    enqueue(
        [{"key": f"r{k}", "slow_times": 1, "slow_sleep": 3600, "sleep": 0}],
        "recovery",
        settings=settings,
        task_func="qcelery.probes.counted",
        priority=9,
    )
    worker = cluster.procs[0]
    while True:  # running in a pool process, a few heartbeats in
        doc = tm.task_pool.find_one({"filter.key": f"r{k}"}, {"status": 1, "worker": 1, "started_at": 1, "lease_until": 1})
        if doc["status"] == "running" and time.time() - doc["started_at"].timestamp() > 2.5 * settings.heartbeat_seconds:
            break
        time.sleep(poll)
    pid = int(doc["worker"].rsplit(":", 1)[1])
    assert pid in worker.children(), (pid, worker.children())
    doc = tm.task_pool.find_one({"_id": doc["_id"]}, {"lease_until": 1})
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    lease_until = doc["lease_until"].timestamp()
    requeued = reclaimed = None
    while True:
        d = tm.task_pool.find_one({"_id": doc["_id"]}, {"status": 1, "attempt": 1, "updated_at": 1, "started_at": 1, "finished_at": 1})
        now = time.time()
        if requeued is None and (d["status"] == "waiting" or d["attempt"] >= 2):
            requeued = now if d["status"] == "waiting" else d["started_at"].timestamp()
        if reclaimed is None and d["attempt"] >= 2:
            reclaimed = d["started_at"].timestamp()
        if d["status"] == "done":
            return {
                "lease_left": lease_until - killed,
                "expiry_to_requeue": requeued - lease_until,
                "kill_to_running": reclaimed - killed,
                "kill_to_done": d["finished_at"].timestamp() - killed,
            }
        assert now - killed < 120, f"task not recovered after 120 s: {d}"
        time.sleep(poll)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="+", default=["5,1,1", "10,2,2"], help="lease,heartbeat,recover_interval seconds")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--backlog", type=int, nargs="+", default=[0, 1000], help="tasks queued ahead of each trial")
    ap.add_argument("--mongo-url")
    ap.add_argument("--broker-url")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from _servers import servers

    from qcelery.celery_app import app_for
    from qcelery.cluster import Cluster
    from qcelery.settings import Settings
    from qcelery.store import scans_find_and_modify

    results = []
    with tempfile.TemporaryDirectory(prefix="qcelery-bench-") as tmp, servers(tmp, args.mongo_url, args.broker_url) as srv:
        url, broker = srv.mongo_url, srv.broker_url
        runs = [(config, backlog) for backlog in args.backlog for config in args.config]
        for c, (config, backlog) in enumerate(runs):
            lease, heartbeat, recover = (float(x) for x in config.split(","))
            settings = Settings(
                mongo_url=url,
                mongo_db=f"bench_recovery_{os.getpid()}_{c}",
                broker_url=broker,
                run_dir=Path(tmp) / f"run{c}",
                default_queue=f"recovery-{os.getpid()}-{c}",
                lease_seconds=lease,
                heartbeat_seconds=heartbeat,
                recover_interval=recover,
                sweep_interval=max(recover, 2.0),
                sweep_after=max(2 * lease, 10.0),
            )
            if c == 0:
                server = "SecantusDB (embedded)" if scans_find_and_modify(settings) else "MongoDB"
                print(
                    f"server: {server}; broker: Redis; python {sys.version.split()[0]}; {os.cpu_count()} CPUs; "
                    f"load average {os.getloadavg()[0]:.2f} at start"
                )
            with Cluster(settings) as cluster:
                cluster.start_worker(settings.default_queue, concurrency=2)
                cluster.start_beat()
                cluster.wait_ready(app_for(settings))
                fill_backlog(settings, backlog)
                for k in range(args.trials):
                    r = trial(settings, cluster, k)
                    results.append((lease, heartbeat, recover, backlog, r))
                    print(
                        f"L={lease:g} H={heartbeat:g} R={recover:g} backlog {backlog}: trial {k + 1}: "
                        f"kill -> running again {r['kill_to_running']:.2f} s",
                        flush=True,
                    )
                app_for(settings).control.purge()  # the rest of the backlog

    anchor = {}
    print(
        f"\n{'L':>4}{'H':>4}{'R':>4}{'backlog':>8}  {'lease left':>10}{'expiry->requeue':>16}{'kill->running':>14}{'kill->done':>11}"
        f"{'bound L+R':>10}{'ratio':>7}{'vs no backlog':>14}"
    )
    for config, backlog in runs:
        lease, heartbeat, recover = (float(x) for x in config.split(","))
        rs = [r for (L, H, R, B, r) in results if (lease, heartbeat, recover, backlog) == (L, H, R, B)]
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        worst = max(r["kill_to_running"] for r in rs)
        bound = lease + recover
        base = anchor.setdefault(config, med["kill_to_running"]) if backlog == min(args.backlog) else anchor.get(config)
        versus = f"{med['kill_to_running'] / base:>14.2f}" if base else f"{'-':>14}"
        print(
            f"{lease:>4g}{heartbeat:>4g}{recover:>4g}{backlog:>8}  {med['lease_left']:>10.2f}{med['expiry_to_requeue']:>16.2f}"
            f"{med['kill_to_running']:>14.2f}{med['kill_to_done']:>11.2f}{bound:>10.1f}{med['kill_to_running'] / bound:>7.2f}{versus}"
            f"   (medians of {len(rs)}; worst kill->running {worst:.2f} s)"
        )
    print("\nRedis' visibility timeout is 7 days: every recovery above came from the lease and beat.")


if __name__ == "__main__":
    main()
