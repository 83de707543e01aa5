"""Enqueue benchmark: ``TaskManager.create_task`` on fresh and on duplicate tasks.

For each N, N Qlib-shaped rolling tasks (LightGBM on Alpha158, one per window and
hyper-parameter set, segments as ``pd.Timestamp`` tuples as ``RollingGen`` makes
them) are created into an empty pool ("fresh"), then created again ("duplicate":
every task already exists, so only ids come back). The anchor is Qlib's own
``TaskManager.create_task`` on the same server, in the same run, through the
interpreter of a separate virtualenv that has ``pyqlib`` (``--qlib-python``,
default ``.venv-qlib/bin/python``); it runs at ``--qlib-n`` tasks only, since it
issues one unindexed ``find_one`` per task.

    .venv/bin/python bench/enqueue.py                    # embedded SecantusDB
    .venv/bin/python bench/enqueue.py --mongo-url mongodb://host:27017/

Prints a table of tasks/s and, when Qlib ran, the ratios at the Qlib N. With
``--profile`` it also prints the time of each phase of a fresh create_task
(encode, normalise, hash, lookup, insert). Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def make_tasks(n: int) -> list[dict]:
    """``n`` distinct Qlib rolling tasks (as ``RollingGen`` over a LightGBM template)."""
    tasks = []
    start = pd.Timestamp("2008-01-01")
    lrs = (0.05, 0.1, 0.2, 0.3)
    for i in range(n):
        window, hp = divmod(i, len(lrs) * 50)
        lr, leaves = lrs[hp % len(lrs)], 32 + hp // len(lrs)
        train_start = start + pd.DateOffset(months=window)
        train_end = train_start + pd.DateOffset(years=6) - pd.Timedelta(days=1)
        valid_end = train_end + pd.DateOffset(years=2)
        test_end = valid_end + pd.DateOffset(months=1)
        tasks.append(
            {
                "model": {
                    "class": "LGBModel",
                    "module_path": "qlib.contrib.model.gbdt",
                    "kwargs": {
                        "loss": "mse",
                        "colsample_bytree": 0.8879,
                        "learning_rate": lr,
                        "subsample": 0.8789,
                        "lambda_l1": 205.6999,
                        "lambda_l2": 580.9768,
                        "max_depth": 8,
                        "num_leaves": leaves,
                        "num_threads": 20,
                    },
                },
                "dataset": {
                    "class": "DatasetH",
                    "module_path": "qlib.data.dataset",
                    "kwargs": {
                        "handler": {
                            "class": "Alpha158",
                            "module_path": "qlib.contrib.data.handler",
                            "kwargs": {
                                "start_time": train_start,
                                "end_time": test_end,
                                "fit_start_time": train_start,
                                "fit_end_time": train_end,
                                "instruments": "csi300",
                            },
                        },
                        "segments": {
                            "train": (train_start, train_end),
                            "valid": (train_end + pd.Timedelta(days=1), valid_end),
                            "test": (valid_end + pd.Timedelta(days=1), test_end),
                        },
                    },
                },
                "record": [
                    {
                        "class": "SignalRecord",
                        "module_path": "qlib.workflow.record_temp",
                        "kwargs": {"model": "<MODEL>", "dataset": "<DATASET>"},
                    },
                    {
                        "class": "SigAnaRecord",
                        "module_path": "qlib.workflow.record_temp",
                        "kwargs": {"ana_long_short": False, "ann_scaler": 252},
                    },
                ],
            }
        )
    return tasks


def qlib_side(url: str, db: str, pool: str, n: int) -> None:
    """Run under the pyqlib interpreter: Qlib's create_task, fresh then duplicate; prints JSON."""
    import logging

    from qlib.config import C
    from qlib.workflow.task.manage import TaskManager

    logging.disable(logging.INFO)  # Qlib logs every TaskManager at INFO
    C["mongo"] = {"task_url": url, "task_db_name": db}
    tasks = make_tasks(n)
    tm = TaskManager(task_pool=pool)
    t0 = time.perf_counter()
    fresh = tm.create_task(tasks)
    t1 = time.perf_counter()
    again = tm.create_task(tasks)
    t2 = time.perf_counter()
    assert again == fresh and tm.task_pool.count_documents({}) == n
    print(json.dumps({"n": n, "fresh_s": t1 - t0, "duplicate_s": t2 - t1}))


def run_qlib(python: str, url: str, db: str, n: int) -> dict | None:
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import enqueue; enqueue.qlib_side(*sys.argv[1:4], int(sys.argv[4]))"
    out = subprocess.run([python, "-c", code, url, db, "qlib_pool", str(n)], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"Qlib side failed ({python}):\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def qlib_available(python: str) -> bool:
    if not Path(python).exists():
        return False
    return subprocess.run([python, "-c", "import qlib.workflow.task.manage"], capture_output=True).returncode == 0


def profile_phases(tm, tasks: list[dict]) -> dict[str, float]:
    """Time the phases of a fresh create_task separately (into an empty pool)."""
    from qcelery.canonical import canonical_json, hash_text, normalize

    phases: dict[str, float] = {}
    t = time.perf_counter()
    [tm._encode_def(d, i) for i, d in enumerate(tasks)]
    phases["encode (pickle)"] = time.perf_counter() - t
    t = time.perf_counter()
    filters = [normalize(d) for d in tasks]
    phases["normalize"] = time.perf_counter() - t
    t = time.perf_counter()
    hashes = [hash_text(canonical_json(f)) for f in filters]
    phases["hash"] = time.perf_counter() - t
    t = time.perf_counter()
    tm._ids_by_hash(set(hashes))
    phases["lookup (empty pool)"] = time.perf_counter() - t
    t = time.perf_counter()
    tm.create_task(tasks)
    phases["whole create_task"] = time.perf_counter() - t
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mongo-url", help="a MongoDB server to use instead of an embedded SecantusDB")
    ap.add_argument("-n", type=int, nargs="+", default=[2_000, 10_000], help="task counts (default 2000 10000)")
    ap.add_argument("--qlib-n", type=int, default=2_000, help="task count for Qlib's create_task (default 2000)")
    ap.add_argument("--qlib-python", default=str(ROOT / ".venv-qlib" / "bin" / "python"))
    ap.add_argument("--repeat", type=int, default=3, help="runs per N; the best is reported (default 3)")
    ap.add_argument("--profile", action="store_true", help="also time each phase of a fresh create_task")
    args = ap.parse_args()

    from qcelery.embedded import EmbeddedMongo
    from qcelery.manage import TaskManager
    from qcelery.settings import Settings
    from qcelery.store import client, scans_find_and_modify

    with tempfile.TemporaryDirectory(prefix="qcelery-bench-") as run_dir:
        mongo = None
        url = args.mongo_url
        if not url:
            mongo = EmbeddedMongo(run_dir).start(timeout=60)
            url = mongo.url
        try:
            db = f"bench_enqueue_{os.getpid()}"
            settings = Settings(mongo_url=url, mongo_db=db)
            server = "SecantusDB (embedded)" if scans_find_and_modify(settings) else "MongoDB"
            version = client(settings).server_info().get("version")
            print(f"server: {server} {version} at {url}; python {sys.version.split()[0]}; {os.cpu_count()} CPUs")
            rows = []
            for n in args.n:
                tasks = make_tasks(n)
                best_fresh = best_dup = float("inf")
                for r in range(args.repeat):
                    tm = TaskManager(f"pool_{n}_{r}", settings)
                    t0 = time.perf_counter()
                    ids = tm.create_task(tasks)
                    t1 = time.perf_counter()
                    again = tm.create_task(tasks)
                    t2 = time.perf_counter()
                    assert again == ids and len(set(ids)) == n and tm.task_pool.count_documents({}) == n
                    best_fresh, best_dup = min(best_fresh, t1 - t0), min(best_dup, t2 - t1)
                    tm.task_pool.drop()
                rows.append((n, n / best_fresh, n / best_dup))
                if args.profile:
                    tm = TaskManager(f"profile_{n}", settings)
                    phases = profile_phases(tm, tasks)
                    tm.task_pool.drop()
                    print(f"phases of a fresh create_task, N={n}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in phases.items()))

            qlib = None
            if qlib_available(args.qlib_python):
                qlib = run_qlib(args.qlib_python, url, db, args.qlib_n)
            else:
                print(
                    f"Qlib not available at {args.qlib_python} (create it: python3 -m venv .venv-qlib && "
                    ".venv-qlib/bin/pip install pyqlib); no ratios"
                )

            print()
            print(f"{'implementation':<16}{'N':>8}{'fresh tasks/s':>16}{'duplicate tasks/s':>20}")
            for n, fresh, dup in rows:
                print(f"{'qcelery':<16}{n:>8,}{fresh:>16,.0f}{dup:>20,.0f}")
            if qlib:
                q_fresh, q_dup = qlib["n"] / qlib["fresh_s"], qlib["n"] / qlib["duplicate_s"]
                print(f"{'Qlib 0.9':<16}{qlib['n']:>8,}{q_fresh:>16,.0f}{q_dup:>20,.0f}")
                same = [r for r in rows if r[0] == qlib["n"]]
                if same:
                    _, fresh, dup = same[0]
                    print(f"\nratio qcelery / Qlib at N={qlib['n']:,}: fresh {fresh / q_fresh:,.0f}x, duplicate {dup / q_dup:,.0f}x")
            client(settings).drop_database(db)
        finally:
            if mongo is not None:
                mongo.stop()


if __name__ == "__main__":
    main()
