"""``python -m workers POOL [--autoscale MAX,MIN] [--concurrency N]``: start a pool's worker."""

from __future__ import annotations

import argparse

from .pools import spec_for, start


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    p.add_argument("pool")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--autoscale", help="MAX,MIN")
    p.add_argument("--time-limit", type=float)
    p.add_argument("--soft-time-limit", type=float)
    p.add_argument("--max-tasks-per-child", type=int, help="recycle a pool process after this many tasks")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--hostname")
    a = p.parse_args()
    autoscale = tuple(int(x) for x in a.autoscale.split(",")) if a.autoscale else None
    spec = spec_for(
        a.pool,
        concurrency=a.concurrency,
        autoscale=autoscale,
        time_limit=a.time_limit,
        soft_time_limit=a.soft_time_limit,
        max_tasks_per_child=a.max_tasks_per_child,
    )
    start(spec, a.loglevel, a.hostname)


if __name__ == "__main__":
    main()
