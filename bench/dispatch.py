"""Dispatch benchmark: N no-op tasks from enqueue to the batch aggregated.

qcelery side: one Celery worker with 2 prefork processes (the ``cpu`` pool spec,
``--concurrency 2``), no beat (the chord fires the aggregation); the clock runs from
the ``enqueue`` call to the batch's ``aggregated_at``. The anchor, in the same run and
on the same Mongo server, is Qlib's pull loop: ``TaskManager.create_task`` then two
processes running ``qlib.workflow.task.manage.run_task`` over the pool, started
together once both have imported Qlib. Qlib runs through the interpreter of a
virtualenv that has ``pyqlib`` (``--qlib-python``, default ``.venv-qlib/bin/python``).

    .venv/bin/python bench/dispatch.py                       # embedded SecantusDB + redis-server
    .venv/bin/python bench/dispatch.py --n 500 --no-qlib
    .venv/bin/python bench/dispatch.py --mongo-url mongodb://host:27017/ --broker-url redis://host:6379/0

Prints tasks/s per N, the ratio to Qlib, and where the time goes: the enqueue, the
time tasks spend inside ``execute`` (claim -> commit, from the task documents), the
aggregation lag, and CPU seconds per task of each process (worker main process, its
pool processes, the Mongo server, Redis, this producer). Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- Qlib side
# (imported by the pyqlib interpreter: standard library and Qlib only)


def qlib_noop(task_def: dict) -> dict:
    return {"ok": True}


def qlib_create(url: str, db: str, pool: str, n: int) -> None:
    """Qlib's create_task of ``n`` no-op tasks; prints JSON."""
    import logging

    from qlib.config import C
    from qlib.workflow.task.manage import TaskManager

    logging.disable(logging.INFO)  # Qlib logs every TaskManager at INFO
    C["mongo"] = {"task_url": url, "task_db_name": db}
    t0 = time.perf_counter()
    TaskManager(task_pool=pool).create_task([{"key": f"q{i}"} for i in range(n)])
    print(json.dumps({"create_s": time.perf_counter() - t0}))


def qlib_worker(url: str, db: str, pool: str, ready: str, go: str) -> None:
    """One Qlib worker: import, say ready, wait for the start signal, run_task until the
    pool has no waiting task; prints its end time (epoch seconds) as JSON."""
    import logging

    from qlib.config import C
    from qlib.workflow.task.manage import run_task

    logging.disable(logging.INFO)
    C["mongo"] = {"task_url": url, "task_db_name": db}
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.001)
    run_task(qlib_noop, pool)
    print(json.dumps({"end": time.time()}))


def run_qlib(python: str, url: str, db: str, n: int, workdir: Path) -> dict | None:
    pool = f"qlib_noop_{n}"
    head = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import dispatch; "
    created = subprocess.run(
        [python, "-c", head + "dispatch.qlib_create(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))", url, db, pool, str(n)],
        capture_output=True,
        text=True,
    )
    if created.returncode != 0:
        print(f"Qlib create_task failed ({python}):\n{created.stderr[-3000:]}", file=sys.stderr)
        return None
    go = workdir / f"go_{n}"
    readies = [workdir / f"ready_{n}_{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [python, "-c", head + "dispatch.qlib_worker(*sys.argv[1:6])", url, db, pool, str(r), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in readies
    ]
    while not all(r.exists() for r in readies):
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    t0 = time.time()
    go.touch()
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        print(f"Qlib run_task failed:\n{outs[0][1][-3000:]}\n{outs[1][1][-3000:]}", file=sys.stderr)
        return None
    end = max(json.loads(o.strip().splitlines()[-1])["end"] for o, _ in outs)
    return {"create_s": json.loads(created.stdout.strip().splitlines()[-1])["create_s"], "run_s": end - t0}


def qlib_available(python: str) -> bool:
    if not Path(python).exists():
        return False
    return subprocess.run([python, "-c", "import qlib.workflow.task.manage"], capture_output=True).returncode == 0


# ------------------------------------------------------------- qcelery side


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and of its children, reaped or alive."""
    import psutil

    try:
        p = psutil.Process(pid)
        t = p.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for c in p.children(recursive=True):
            try:
                ct = c.cpu_times()
                total += ct.user + ct.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


def run_qcelery(settings, n: int, pids: dict[str, int], tag: str = "", poll: float = 0.05) -> dict:
    import psutil

    from qcelery import batch as batches
    from qcelery.manage import TaskManager
    from qcelery.producer import enqueue

    pool = f"noop{tag}_{n}"
    defs = [{"key": f"c{tag}{i}"} for i in range(n)]
    tm = TaskManager(pool, settings)
    worker = psutil.Process(pids["worker"])
    before = {name: cpu_seconds(pid) for name, pid in pids.items() if name != "worker"}
    before["worker main"] = sum(worker.cpu_times()[:2])
    before["pool processes"] = cpu_seconds(pids["worker"]) - before["worker main"]
    me0 = sum(os.times()[:2])

    t0 = time.time()
    bid = enqueue(defs, pool, settings=settings, task_func="qcelery.probes.noop")
    t_enq = time.time()
    while (doc := batches.load(tm.db, bid))["state"] != batches.AGGREGATED:
        time.sleep(poll)
    t_end = time.time()

    me = sum(os.times()[:2]) - me0
    after = {name: cpu_seconds(pid) for name, pid in pids.items() if name != "worker"}
    after["worker main"] = sum(worker.cpu_times()[:2])
    after["pool processes"] = cpu_seconds(pids["worker"]) - after["worker main"]
    cpu = {k: after[k] - before[k] for k in after}
    cpu["producer (this process)"] = me

    docs = list(tm.task_pool.find({"batch_ids": doc["_id"]}, {"started_at": 1, "finished_at": 1}))
    inside = [(d["finished_at"] - d["started_at"]).total_seconds() for d in docs]
    first_start = min(d["started_at"] for d in docs).timestamp()
    last_finish = max(d["finished_at"] for d in docs).timestamp()
    stat = tm.task_stat({"batch_ids": doc["_id"]})
    assert stat == {"done": n}, stat
    assert doc["aggregate_runs"] == 1
    return {
        "n": n,
        "enqueue_s": t_enq - t0,
        "total_s": doc["aggregated_at"].timestamp() - t0,
        "observed_s": t_end - t0,
        "first_claim_s": first_start - t0,
        "last_commit_s": last_finish - t0,
        "aggregation_lag_s": doc["aggregated_at"].timestamp() - last_finish,
        "inside_execute_ms": statistics.median(inside) * 1000,
        "inside_execute_sum_s": sum(inside),
        "cpu_s": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[500, 2_000])
    ap.add_argument("--mongo-url")
    ap.add_argument("--broker-url")
    ap.add_argument("--qlib-python", default=str(ROOT / ".venv-qlib" / "bin" / "python"))
    ap.add_argument("--no-qlib", action="store_true")
    ap.add_argument(
        "--max-tasks-per-child",
        type=int,
        default=100_000,
        help="also run a worker recycling its processes this rarely (the cpu pool recycles every 50 "
        "tasks, for the memory of model training); 0: skip",
    )
    ap.add_argument("--loglevel", default="INFO", help="worker log level (INFO logs two lines per task, as in production)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from _servers import servers

    from qcelery.celery_app import app_for
    from qcelery.cluster import Cluster
    from qcelery.settings import Settings
    from qcelery.store import client, scans_find_and_modify

    with tempfile.TemporaryDirectory(prefix="qcelery-bench-") as tmp, servers(tmp, args.mongo_url, args.broker_url) as srv:
        run_dir = Path(tmp)
        url, broker, mongo, redis = srv.mongo_url, srv.broker_url, srv.mongo, srv.redis
        db = f"bench_dispatch_{os.getpid()}"
        settings = Settings(mongo_url=url, mongo_db=db, broker_url=broker, run_dir=run_dir / "run", default_queue=f"bench-{os.getpid()}")
        server = "SecantusDB (embedded)" if scans_find_and_modify(settings) else "MongoDB"
        version = client(settings).server_info().get("version")
        print(
            f"server: {server} {version}; broker: Redis at {broker}; python {sys.version.split()[0]}; "
            f"{os.cpu_count()} CPUs; worker log level {args.loglevel}; load average {os.getloadavg()[0]:.2f} at start"
        )
        rows = []
        configs = [("qcelery, cpu pool spec", None)]
        if args.max_tasks_per_child:
            configs.append((f"qcelery, recycle {args.max_tasks_per_child:,}", args.max_tasks_per_child))
        for k, (label, recycle) in enumerate(configs):
            with Cluster(settings) as cluster:
                proc = cluster.start_worker(settings.default_queue, concurrency=2, loglevel=args.loglevel, max_tasks_per_child=recycle)
                cluster.wait_ready(app_for(settings))
                pids = {"worker": proc.pid}
                if mongo:
                    pids["Mongo server"] = mongo.proc.pid
                if redis:
                    pids["Redis server"] = redis.proc.pid
                run_qcelery(settings, 50, pids, f"w{k}")  # warm-up: pool processes connect
                for n in args.n:
                    rows.append({**run_qcelery(settings, n, pids, str(k)), "label": label})
        qlib_rows = {}
        if not args.no_qlib:
            if qlib_available(args.qlib_python):
                for n in args.n:
                    q = run_qlib(args.qlib_python, url, db, n, run_dir)
                    if q:
                        qlib_rows[n] = q
            else:
                print(
                    f"Qlib not available at {args.qlib_python} (python3 -m venv .venv-qlib && .venv-qlib/bin/pip install pyqlib); no anchor"
                )

    print(f"\n{'N':>6}  {'system (2 processes)':<32}{'enqueue s':>10}{'run s':>8}{'total s':>9}{'tasks/s':>9}")
    for n in args.n:
        for r in (r for r in rows if r["n"] == n):
            run = r["total_s"] - r["enqueue_s"]
            print(f"{n:>6,}  {r['label']:<32}{r['enqueue_s']:>10.2f}{run:>8.2f}{r['total_s']:>9.2f}{n / r['total_s']:>9.1f}")
        if n in qlib_rows:
            q = qlib_rows[n]
            total = q["create_s"] + q["run_s"]
            print(f"{n:>6,}  {'Qlib 0.9 create_task + run_task':<32}{q['create_s']:>10.2f}{q['run_s']:>8.2f}{total:>9.2f}{n / total:>9.1f}")
    for r in rows:
        if r["n"] in qlib_rows:
            q = qlib_rows[r["n"]]
            print(
                f"ratio {r['label']} / Qlib at N={r['n']:,}: end to end {(q['create_s'] + q['run_s']) / r['total_s']:.2f}x, "
                f"run only {q['run_s'] / (r['total_s'] - r['enqueue_s']):.2f}x"
            )

    for r in rows:
        n = r["n"]
        wall = r["last_commit_s"] - r["first_claim_s"]
        print(f"\nwhere the time goes, {r['label']}, N={n:,} (wall {r['total_s']:.2f} s):")
        print(f"  enqueue (tasks + batch + {n:,} messages)   {r['enqueue_s']:7.2f} s  ({r['enqueue_s'] / n * 1000:.2f} ms/task)")
        print(f"  enqueue start -> first claim              {r['first_claim_s']:7.2f} s")
        print(f"  first claim -> last commit                {wall:7.2f} s  ({wall / n * 1000:.2f} ms/task, 2 processes)")
        print(
            f"    inside execute (claim -> commit)        {r['inside_execute_sum_s']:7.2f} s  process-time,"
            f" median {r['inside_execute_ms']:.2f} ms/task"
            f" = {r['inside_execute_sum_s'] / (2 * wall) * 100:.0f}% of the 2 processes' wall time"
        )
        print(f"  last commit -> aggregated                 {r['aggregation_lag_s']:7.2f} s")
        print("  CPU seconds per task by process:")
        for name, s in sorted(r["cpu_s"].items(), key=lambda kv: -kv[1]):
            print(f"    {name:<28}{s / n * 1000:7.2f} ms   ({s:.2f} s)")
        print(
            f"    {'total':<28}{sum(r['cpu_s'].values()) / n * 1000:7.2f} ms"
            f"   (2 cores give {2 * r['total_s'] / n * 1000:.2f} ms of CPU per task at this rate)"
        )


if __name__ == "__main__":
    main()
