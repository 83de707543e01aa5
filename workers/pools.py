"""Worker pools: one spec per pool, started the same way on every machine.

A pool is a Celery queue with its own workers. ``cpu`` and ``gpu`` are predefined;
any other name gets the ``cpu`` defaults. Each worker also consumes the control queue
(aggregations and beat jobs). Values can be overridden on the command line
(``qcelery worker --pool cpu --autoscale 8,2``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from typing import Any

from qcelery.celery_app import CONTROL_QUEUE


@dataclass(frozen=True)
class PoolSpec:
    name: str
    concurrency: int | None = None  # fixed number of processes (None: number of cores)
    autoscale: tuple[int, int] | None = None  # (max, min) processes, grows with the queue
    soft_time_limit: float | None = None  # seconds; the task sees SoftTimeLimitExceeded
    time_limit: float | None = None  # seconds; the process is killed, the lease recovers the task
    max_tasks_per_child: int | None = 50  # recycle processes (memory of model training)
    prefetch_multiplier: int = 1


POOLS: dict[str, PoolSpec] = {
    "cpu": PoolSpec("cpu", autoscale=(max(os.cpu_count() or 1, 1), 1), time_limit=6 * 3600, soft_time_limit=6 * 3600 - 60),
    # one process per GPU by default: several trainings on one device fight for memory
    "gpu": PoolSpec("gpu", concurrency=1, time_limit=12 * 3600, soft_time_limit=12 * 3600 - 60, max_tasks_per_child=1),
}


def spec_for(name: str, **overrides: Any) -> PoolSpec:
    base = POOLS.get(name) or replace(POOLS["cpu"], name=name)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "autoscale" in given and "concurrency" not in given:
        given["concurrency"] = None
    if "concurrency" in given and "autoscale" not in given:
        given["autoscale"] = None
    hard = given.get("time_limit", base.time_limit)
    soft = given.get("soft_time_limit", base.soft_time_limit)
    if "soft_time_limit" not in given and hard and soft and soft >= hard:
        # a pool's default soft limit above a smaller hard limit given here would disable
        # the hard one: the prefork pool arms the hard timer only when the soft one fires
        given["soft_time_limit"] = None
    return replace(base, **given)


def worker_argv(spec: PoolSpec, loglevel: str = "INFO", hostname: str | None = None) -> list[str]:
    """The ``celery worker`` arguments for ``spec``."""
    argv = [
        "worker",
        "-Q",
        f"{spec.name},{CONTROL_QUEUE}",
        "-n",
        hostname or f"{spec.name}-{os.getpid()}@{socket.gethostname()}",
        "--loglevel",
        loglevel,
        "--prefetch-multiplier",
        str(spec.prefetch_multiplier),
        "-O",
        "fair",
    ]
    if spec.autoscale:
        argv += ["--autoscale", f"{spec.autoscale[0]},{spec.autoscale[1]}"]
    elif spec.concurrency:
        argv += ["--concurrency", str(spec.concurrency)]
    if spec.time_limit:
        argv += ["--time-limit", str(spec.time_limit)]
    if spec.soft_time_limit:
        argv += ["--soft-time-limit", str(spec.soft_time_limit)]
    if spec.max_tasks_per_child:
        argv += ["--max-tasks-per-child", str(spec.max_tasks_per_child)]
    return argv


def start(spec: PoolSpec, loglevel: str = "INFO", hostname: str | None = None) -> None:
    """Run a worker for ``spec`` in this process until it is stopped (SIGTERM: warm
    shutdown, the running task finishes and commits; a second signal: the task's lease
    expires and beat hands it to another worker)."""
    from qcelery.celery_app import make_app
    from qcelery.settings import load_settings

    app = make_app(load_settings())
    app.worker_main(worker_argv(spec, loglevel, hostname))
