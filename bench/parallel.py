"""Parallel training: 16 rolling LightGBM tasks, trained by 1 and by 2 worker processes.

    .venv/bin/python bench/parallel.py                 # embedded SecantusDB, local MLflow store
    QCELERY_MONGO_URL=mongodb://host:27017 .venv/bin/python bench/parallel.py

Each task is real training (LightGBM, one thread, fixed rounds; ~2 s on an idle core)
on the built-in synthetic data: 16 sliding windows of one template, so every task does
the same amount of work. Workers are TrainerRM pull-loop processes
(``TrainerRM.worker()``) forked after the imports and released together; the handler
is built once beforehand and is in the GridFS cache (and inherited in memory). Reports
wall time from release to the last commit, per-task times from the pool, and the
parallel efficiency ideal/actual with ideal = T(1 worker) / N.

Prints a table and the ratio to the anchor (the ideal time); no thresholds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# before numpy and LightGBM load (through qcelery below)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core per worker process, or the comparison means nothing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcelery.data import HandlerCache  # noqa: E402 - after the thread limits and sys.path above
from qcelery.embedded import EmbeddedMongo  # noqa: E402 - after the thread limits and sys.path above
from qcelery.exp import get_experiment  # noqa: E402 - after the thread limits and sys.path above
from qcelery.gen import RollingGen, task_generator  # noqa: E402 - after the thread limits and sys.path above
from qcelery.manage import TaskManager  # noqa: E402 - after the thread limits and sys.path above
from qcelery.settings import Settings  # noqa: E402 - after the thread limits and sys.path above
from qcelery.trainer import TrainerRM  # noqa: E402 - after the thread limits and sys.path above

N_TASKS = 16


def template(rounds: int, instruments: int) -> dict:
    handler = {
        "class": "SyntheticAlphaHandler",
        "module_path": "qcelery.data",
        "kwargs": {
            "instruments": instruments,
            "start_time": "2017-01-03",
            "end_time": "2023-06-30",
            "fit_start_time": "2017-01-03",
            "fit_end_time": "2019-12-31",
            "seed": 16,
        },
    }
    return {
        "model": {
            "class": "LGBModel",
            "module_path": "qcelery.models",
            "kwargs": {"num_boost_round": rounds, "early_stopping_rounds": 0, "num_leaves": 63, "learning_rate": 0.05, "num_threads": 1},
        },
        "dataset": {
            "class": "DatasetH",
            "module_path": "qcelery.data",
            "kwargs": {
                "handler": handler,
                "segments": {
                    "train": ("2018-01-02", "2019-12-31"),
                    "valid": ("2020-01-02", "2020-03-31"),
                    "test": ("2020-04-01", "2021-09-30"),
                },
            },
        },
        "record": [
            {"class": "SignalRecord", "module_path": "qcelery.records", "kwargs": {"model": "<MODEL>", "dataset": "<DATASET>"}},
            {"class": "SigAnaRecord", "module_path": "qcelery.records"},
        ],
    }


def tasks_for(rounds: int, instruments: int) -> list[dict]:
    tasks = task_generator(template(rounds, instruments), RollingGen(step=20, rtype=RollingGen.ROLL_SD, calendar="XSHG"))
    return tasks[:N_TASKS]


def _worker(settings: Settings, experiment: str, pool: str, start, counts) -> None:
    start.wait()
    counts.put(TrainerRM(experiment, pool, settings=settings).worker())


def run(settings: Settings, tasks: list[dict], n_workers: int, tag: str) -> dict:
    pool, experiment = f"bench_{tag}_{n_workers}w", f"bench_{tag}_{n_workers}w"
    tm = TaskManager(pool, settings)
    tm.remove()
    ids = tm.create_task(tasks)
    get_experiment(experiment, settings)
    ctx = multiprocessing.get_context("fork")
    start, counts = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(settings, experiment, pool, start, counts)) for _ in range(n_workers)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let the children settle before the clock starts
    cpu0 = os.times()
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    cpu = (cpu1.children_user + cpu1.children_system) - (cpu0.children_user + cpu0.children_system)
    ran = [counts.get(timeout=10) for _ in procs]
    stat = tm.task_stat()
    if stat != {"done": len(ids)}:
        raise RuntimeError(f"{n_workers} worker(s): pool ended as {stat}")
    durations = [(d["finished_at"] - d["started_at"]).total_seconds() for d in tm.task_pool.find({}, {"started_at": 1, "finished_at": 1})]
    return {
        "workers": n_workers,
        "wall": wall,
        "per_worker": ran,
        "task_mean": statistics.mean(durations),
        "task_sum": sum(durations),
        "cpu": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=120, help="LightGBM rounds per task (sets the task size)")
    parser.add_argument("--instruments", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=1, help="measure each worker count this many times (best kept)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qcelery-bench-") as tmp:
        mongo = None
        mongo_url = os.environ.get("QCELERY_MONGO_URL")
        if not mongo_url:
            mongo = EmbeddedMongo(Path(tmp) / "mongo").start()
            mongo_url = mongo.url
        try:
            settings = Settings(
                mongo_url=mongo_url,
                mongo_db="qcelery_bench",
                run_dir=Path(tmp) / "run",
                mlflow_tracking_uri=(Path(tmp) / "mlruns").as_uri(),
                lease_seconds=120,
                heartbeat_seconds=10,
            )
            tasks = tasks_for(args.rounds, args.instruments)
            t0 = time.perf_counter()
            HandlerCache(settings).get(tasks[0]["dataset"]["kwargs"]["handler"])  # built once, shared by all tasks
            build = time.perf_counter() - t0
            results = {}
            for n in (1, 2):
                best = None
                for r in range(args.repeat):
                    res = run(settings, tasks, n, f"r{r}")
                    best = res if best is None or res["wall"] < best["wall"] else best
                results[n] = best
        finally:
            if mongo is not None:
                mongo.stop()

    server = "SecantusDB (embedded)" if mongo is not None else "MongoDB at QCELERY_MONGO_URL"
    t1 = results[1]["wall"]
    print(
        f"parallel training: {N_TASKS} tasks (LGBModel, {args.rounds} rounds, {args.instruments} instruments), "
        f"TrainerRM pull-loop workers; store: {server}; handler built once in {build:.1f}s"
    )
    print(
        f"{'workers':>7} {'wall s':>8} {'ideal s':>8} {'task mean s':>11} {'cpu s/task':>10} {'tasks/worker':>12} "
        f"{'speedup':>8} {'efficiency':>10}"
    )
    for n, res in results.items():
        ideal = t1 / n
        print(
            f"{n:>7} {res['wall']:>8.2f} {ideal:>8.2f} {res['task_mean']:>11.2f} {res['cpu'] / N_TASKS:>10.2f} "
            f"{'/'.join(map(str, res['per_worker'])):>12} {t1 / res['wall']:>8.2f} {ideal / res['wall']:>10.2f}"
        )
    two = results[2]
    print(
        f"coordination overhead with 2 workers: wall - (sum of task times)/2 = "
        f"{two['wall'] - two['task_sum'] / 2:.2f}s; task time grew {two['task_mean'] / results[1]['task_mean']:.2f}x "
        f"at {two['cpu'] / results[1]['cpu']:.2f}x the CPU (above 1x the cores were shared with other processes)"
    )
    print(f"ratio to anchor (ideal time T1/2 over actual time with 2 workers): {(t1 / 2) / results[2]['wall']:.2f}")
    if hasattr(os, "getloadavg"):
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
