"""Progress of one batch at N tasks: the batch's counters against a real count, in ms.

In one process, against real servers (embedded SecantusDB unless ``--mongo-url``), for
each N a pool holding one batch of N tasks (written by ``batch.create``, nothing
published):

* ``progress``: ``batch.progress``, what ``qcelery status`` / ``wait`` and the progress
  bar read per batch and per poll (one read of the batch document), with the batch's
  ``task_ids`` in its document (as before issue 14 point 1) and without;
* ``real count``: ``task_stat({"batch_ids": ...})``, what ``progress`` was before the
  counters, and what a confirmation or the aggregation's check costs (once, not per poll);
* ``claim+commit``: one task claimed and committed (each moves a counter: one more write
  of the batch document), with ``task_ids`` in the batch document and without, and with
  the count moves switched off in this process: the difference is what keeping the
  counters adds per task.

Not a test: no thresholds. The anchor is the smallest N.

    .venv/bin/python bench/progress.py [--n 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn: Callable[[], object], rounds: int) -> float:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def claim_and_commit(tm, ids, rounds: int) -> float:  # type: ignore[no-untyped-def]
    """Median ms of claiming and committing the next task of ``ids``, ``rounds`` times."""
    return median_ms(lambda: tm.commit(tm.claim(next(ids)), None), rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--moves", type=int, default=200, help="tasks claimed and committed per measure of claim+commit")
    ap.add_argument("--mongo-url")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from _servers import servers

    from qcelery import batch as batches
    from qcelery import counts
    from qcelery import status as st
    from qcelery.manage import TaskManager
    from qcelery.settings import Settings

    with tempfile.TemporaryDirectory(prefix="qcelery-bench-") as tmp, servers(tmp, args.mongo_url, "redis://127.0.0.1:1/0") as srv:
        settings = Settings(mongo_url=srv.mongo_url, mongo_db=f"bench_progress_{os.getpid()}", run_dir=Path(tmp) / "run")
        print(f"server: {'embedded SecantusDB' if srv.mongo else srv.mongo_url}; {os.cpu_count()} CPUs")
        rows = []
        for n in args.n:
            tm = TaskManager(f"progress_{n}", settings)
            t = time.perf_counter()
            doc, _ = batches.create(
                tm,
                [{"key": i, "model": "noop"} for i in range(n)],
                queue="q",
                task_func="qcelery.probes.noop",
                task_kwargs=None,
                before_status=st.WAITING,
                after_status=st.DONE,
                aggregate=None,
            )
            created = time.perf_counter() - t
            ids = iter(doc["task_ids"])
            row = {"N": n, "created s": created}
            row["progress ms (ids in doc)"] = median_ms(lambda: batches.progress(tm, doc), 50)  # noqa: B023 - this iteration's
            row["claim+commit ms (ids in doc)"] = claim_and_commit(tm, ids, args.moves)
            # what issue 14 point 1 does: the batch document no longer lists its tasks
            tm.db[batches.COLLECTION].update_one({"_id": doc["_id"]}, {"$unset": {"task_ids": ""}})
            row["progress ms"] = median_ms(lambda: batches.progress(tm, doc), 50)  # noqa: B023
            row["claim+commit ms"] = claim_and_commit(tm, ids, args.moves)
            kept = counts.moved
            counts.moved = lambda *a, **k: None  # type: ignore[assignment]  # the count moves off, in this process only
            try:
                row["claim+commit ms (not counted)"] = claim_and_commit(tm, ids, args.moves)
            finally:
                counts.moved = kept
            counts.recount(tm, doc)  # repairs the counters the uncounted moves left behind
            row["real count ms"] = median_ms(lambda: tm.task_stat({"batch_ids": doc["_id"]}), 3)  # noqa: B023
            assert batches.progress(tm, doc) == tm.task_stat({"batch_ids": doc["_id"]})
            rows.append(row)
            print(f"N={n:,}: created in {created:.1f} s", flush=True)

        print()
        cols = list(rows[0])
        print(" | ".join(cols))
        for row in rows:
            print(" | ".join(f"{row[c]:,}" if c == "N" else f"{row[c]:.2f} (x{row[c] / rows[0][c]:.1f})" for c in cols))


if __name__ == "__main__":
    main()
