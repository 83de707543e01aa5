"""Qlib's own ``TrainerR`` against qcelery on Celery workers, on the same Qlib tasks, in one run.

The tasks: Qlib's LightGBM + Alpha158 benchmark task (Qlib's ``LGBModel``, ``DatasetH``,
``Alpha158``; records ``SignalRecord`` + ``SigAnaRecord`` from ``qlib.workflow.record_temp``)
rolled over a handful of windows of the synthetic market written as a Qlib provider
(``qcelery qlib-data``), LightGBM with fixed threads and seed.

* Qlib: ``qlib.model.trainer.TrainerR(experiment_name).train(tasks)`` in this process, after
  ``qlib.init`` (not timed), its ``R`` on an MLflow file store of its own;
* qcelery: ``TrainerCelery(..., qlib_init=...).train(tasks)`` (the tasks go to the pool, one
  batch, and come back as recorders) with ``--workers`` Celery worker processes (one pool
  process each) started and ready beforehand (not timed), on the embedded SecantusDB and
  redis-server unless ``--mongo-url`` / ``--broker-url``.

Measured: wall time of ``train``; the time inside the tasks (each MLflow run's start to end);
per-task overhead = (wall - task time / parallel processes) / tasks; how often Alpha158 is
built. Builds are counted here, not in the library: the tasks name ``CountingAlpha158``, this
module's subclass of Qlib's ``Alpha158`` that appends a line to a file on every construction
(a handler loaded from qcelery's cache is unpickled, not constructed). Both runs' predictions
are compared as a check. Prints a table and the ratios to Qlib's run. Not a test: no thresholds.

    .venv/bin/python bench/qlib_trainer.py [--tasks 6] [--instruments 40] [--rounds 100] [--workers 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
#: the file CountingAlpha158 appends one line to per construction (inherited by the workers)
BUILDS_ENV = "QCELERY_BENCH_HANDLER_BUILDS"

START, FIT_END, VALID_END, TEST_START = "2020-01-02", "2021-12-31", "2022-06-30", "2022-07-01"


def _alpha158() -> type:
    from qlib.contrib.data.handler import Alpha158

    return Alpha158


class CountingAlpha158(_alpha158()):  # type: ignore[misc]  # Qlib's class, untyped
    """Qlib's ``Alpha158``, counting its constructions in the file named by ``$QCELERY_BENCH_HANDLER_BUILDS``."""

    def __init__(self, *args: Any, **kwargs: Any):
        path = os.environ.get(BUILDS_ENV)
        if path:
            with open(path, "a") as fh:
                fh.write(f"{os.getpid()}\n")
        super().__init__(*args, **kwargs)


def template(end: str, rounds: int) -> dict:
    handler = {
        "class": "CountingAlpha158",
        "module_path": "qlib_trainer",
        "kwargs": {"start_time": START, "end_time": end, "fit_start_time": START, "fit_end_time": FIT_END, "instruments": "all"},
    }
    return {
        "model": {
            "class": "LGBModel",
            "module_path": "qlib.contrib.model.gbdt",
            "kwargs": {
                "loss": "mse",
                "num_boost_round": rounds,
                "early_stopping_rounds": rounds,
                "learning_rate": 0.05,
                "num_leaves": 63,
                "colsample_bytree": 0.8879,
                "subsample": 0.8789,
                "num_threads": 1,
                "seed": 158,
            },
        },
        "dataset": {
            "class": "DatasetH",
            "module_path": "qlib.data.dataset",
            "kwargs": {
                "handler": handler,
                "segments": {"train": [START, FIT_END], "valid": ["2022-01-03", VALID_END], "test": [TEST_START, end]},
            },
        },
        "record": [
            {"class": "SignalRecord", "module_path": "qlib.workflow.record_temp", "kwargs": {"model": "<MODEL>", "dataset": "<DATASET>"}},
            {"class": "SigAnaRecord", "module_path": "qlib.workflow.record_temp", "kwargs": {"ana_long_short": False, "ann_scaler": 252}},
        ],
    }


def run_seconds(recs: list) -> float:
    """Time inside the tasks: the sum of their MLflow runs' durations."""
    total = 0.0
    for rec in recs:
        info = rec.client.get_run(rec.id).info
        total += (info.end_time - info.start_time) / 1000
    return total


def builds(path: Path) -> tuple[int, int]:
    """How many handlers were constructed, and in how many processes."""
    pids = path.read_text().split() if path.exists() else []
    return len(pids), len(set(pids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=6, help="rolling windows (tasks)")
    ap.add_argument("--step", type=int, default=20, help="trading days per test window")
    ap.add_argument("--instruments", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=100, help="LightGBM boosting rounds")
    ap.add_argument("--workers", type=int, default=2, help="Celery worker processes for qcelery")
    ap.add_argument("--mongo-url")
    ap.add_argument("--broker-url")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    sys.path[:0] = [str(ROOT), str(BENCH)]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import pandas as pd
    from _servers import servers

    from qcelery.celery_app import app_for
    from qcelery.cluster import Cluster
    from qcelery.data.qlib_provider import write_qlib_provider
    from qcelery.gen import RollingGen, task_generator
    from qcelery.qlib_bridge import provider_calendar
    from qcelery.settings import Settings
    from qcelery.trainer import TrainerCelery

    work = Path(tempfile.mkdtemp(prefix="qlib-trainer-", dir=ROOT / "bench" / "out" if (ROOT / "bench" / "out").is_dir() else None))
    try:
        provider = work / "provider"
        # the data runs 40 trading days past the last window: the label looks 2 days ahead
        days_needed = args.tasks * args.step + 40
        end_guess = pd.Timestamp(TEST_START) + pd.offsets.BDay(days_needed)
        write_qlib_provider(provider, instruments=args.instruments, start_time=START, end_time=end_guess)
        qlib_init = {"provider_uri": str(provider), "region": "cn"}
        calendar = provider_calendar(qlib_init)
        days = list(calendar.dates)
        first = next(i for i, d in enumerate(days) if d >= pd.Timestamp(TEST_START))
        test_end = days[first + args.tasks * args.step - 1]
        tasks = task_generator(
            template(f"{test_end:%Y-%m-%d}", args.rounds), RollingGen(step=args.step, rtype=RollingGen.ROLL_SD, calendar=calendar)
        )
        n = len(tasks)

        # ---- Qlib's own TrainerR, in this process
        import qlib
        from qlib.model.trainer import TrainerR as QlibTrainerR

        exp_manager = {
            "class": "MLflowExpManager",
            "module_path": "qlib.workflow.expm",
            "kwargs": {"uri": (work / "qlib_mlruns").as_uri(), "default_exp_name": "x"},
        }
        qlib.init(**qlib_init, exp_manager=exp_manager)
        os.environ[BUILDS_ENV] = str(work / "builds-qlib")
        cwd = os.getcwd()
        os.chdir(work)  # Qlib's MLflowExpManager puts its lock for a file:///abs URI under ./abs (relative)
        try:
            t = time.perf_counter()
            qlib_recs = QlibTrainerR(experiment_name="qlib_trainer_bench").train(
                copy.deepcopy(tasks)
            )  # Qlib edits the configs it builds from
            qlib_wall = time.perf_counter() - t
        finally:
            os.chdir(cwd)
        qlib_tasks_s = run_seconds(qlib_recs)
        qlib_builds = builds(work / "builds-qlib")

        # ---- qcelery: the same tasks as one batch on Celery workers
        with servers(work / "servers", args.mongo_url, args.broker_url) as srv:
            settings = Settings(
                mongo_url=srv.mongo_url,
                mongo_db=f"qlib_trainer_{os.getpid()}",
                broker_url=srv.broker_url,
                run_dir=work / "run",
                mlflow_tracking_uri=(work / "mlruns").as_uri(),
                allowed_modules=["qlib_trainer"],
                default_queue=f"qlib-bench-{os.getpid()}",
            )
            env = {"PYTHONPATH": str(BENCH), BUILDS_ENV: str(work / "builds-qcelery")}
            cluster = Cluster(settings, extra_env=env)
            try:
                for _ in range(args.workers):
                    cluster.start_worker(settings.default_queue, concurrency=1)
                cluster.wait_ready(app_for(settings), timeout=180)
                t = time.perf_counter()
                recs = TrainerCelery("qlib_trainer_bench", task_pool="qlib_trainer_bench", settings=settings, qlib_init=qlib_init).train(
                    tasks
                )
                qc_wall = time.perf_counter() - t
            finally:
                cluster.stop()
            qc_tasks_s = run_seconds(recs)
            qc_builds = builds(work / "builds-qcelery")
            same = all(
                ours.load_object("pred.pkl").equals(theirs.load_object("pred.pkl")) for ours, theirs in zip(recs, qlib_recs, strict=True)
            )
            server = "embedded SecantusDB + redis-server" if srv.mongo is not None else "given servers"

        rows = [
            ("Qlib TrainerR (1 process)", qlib_wall, qlib_tasks_s, 1, qlib_builds),
            (f"qcelery TrainerCelery ({args.workers} workers)", qc_wall, qc_tasks_s, args.workers, qc_builds),
        ]
        print(f"{n} tasks: LGBModel {args.rounds} rounds (num_threads=1, seed 158) + Alpha158 on {args.instruments} synthetic instruments, "
              f"train {START}..{FIT_END}, test windows of {args.step} days from {days[first]:%Y-%m-%d}; {server}")  # fmt: skip
        print(f"{'run':<36} {'wall s':>8} {'task s':>8} {'s/task':>7} {'overhead s/task':>16} {'handler builds':>15}")
        for name, wall, task_s, procs, (nb, nproc) in rows:
            overhead = (wall - task_s / procs) / n
            print(f"{name:<36} {wall:8.2f} {task_s:8.2f} {wall / n:7.2f} {overhead:16.3f} {f'{nb} ({nproc} proc)':>15}")
        print(f"ratio qcelery / Qlib: wall {qc_wall / qlib_wall:.2f} (speed-up {qlib_wall / qc_wall:.2f}x), "
              f"time inside tasks {qc_tasks_s / qlib_tasks_s:.2f}, handler builds {qc_builds[0]}/{qlib_builds[0]}")  # fmt: skip
        print(f"predictions identical to Qlib's, task by task: {'yes' if same else 'NO'}")
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
