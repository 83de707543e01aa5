"""Framework overhead per task: what qcelery adds around a task function, in ms.

In one process, against real servers (embedded SecantusDB + redis-server unless
``--mongo-url`` / ``--broker-url``), for N no-op tasks of one batch:

* ``execute``: the whole ``qcelery.worker.execute_task`` of a no-op task (batch spec
  cached, as in a warm worker): claim, decode, heartbeat start/stop, call, commit;
* its parts, each timed alone on fresh tasks: claim (the atomic update and the read of
  the claimed document), decode of ``def``, heartbeat thread start + stop, commit;
* messages: one ``execute`` message of a chord, as ``enqueue`` publishes it (the time of
  publishing an N-message chord divided by N; 5 rounds) and one re-publish of a single
  task through ``producer.publish`` (what recovery and the sweep do: it also looks up
  the task's batch and marks it published).

The overhead per task is the median ``execute`` plus the median chord message. Celery's
own cost between tasks (message fetch, ack, events, IPC to the pool process) is not in
here: ``bench/dispatch.py`` shows it. Not a test: no thresholds.

    .venv/bin/python bench/overhead.py [--n 300]
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


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def row(name: str, ms: list[float]) -> tuple[str, float, float]:
    ms = sorted(ms)
    return name, statistics.median(ms), ms[int(len(ms) * 0.9)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--mongo-url")
    ap.add_argument("--broker-url")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    import redis as redis_client
    from _servers import servers

    from qcelery import batch as batches
    from qcelery import status as st
    from qcelery.celery_app import make_app
    from qcelery.manage import Heartbeat, TaskManager, worker_name
    from qcelery.producer import _publish_slots, publish
    from qcelery.settings import Settings
    from qcelery.store import client, scans_find_and_modify
    from qcelery.worker import AGGREGATE, _batch_spec, execute_task

    n = args.n
    with tempfile.TemporaryDirectory(prefix="qcelery-bench-") as tmp, servers(tmp, args.mongo_url, args.broker_url) as srv:
        url, broker = srv.mongo_url, srv.broker_url
        queue = f"overhead-{os.getpid()}"
        settings = Settings(
            mongo_url=url,
            mongo_db=f"bench_overhead_{os.getpid()}",
            broker_url=broker,
            run_dir=Path(tmp) / "run",
            default_queue=queue,
            task_func="qcelery.probes.noop",
        )
        server = "SecantusDB (embedded)" if scans_find_and_modify(settings) else "MongoDB"
        print(
            f"server: {server} {client(settings).server_info().get('version')}; broker: Redis; "
            f"python {sys.version.split()[0]}; N={n} tasks per measurement; load average {os.getloadavg()[0]:.2f}"
        )
        app = make_app(settings)
        tm = TaskManager("overhead", settings)

        def new_batch(prefix: str) -> tuple[dict, list]:
            doc, _ = batches.create(
                tm,
                [{"key": f"{prefix}{i}"} for i in range(n)],
                queue=queue,
                task_func="qcelery.probes.noop",
                task_kwargs=None,
                before_status=st.WAITING,
                after_status=st.DONE,
                aggregate=None,
            )
            return doc, batches.task_ids(tm, doc["_id"])

        # whole execute_task (warm: the first call caches the batch spec and the manager)
        doc, ids = new_batch("e")
        bid = str(doc["_id"])
        _batch_spec(app, tm, bid)
        it = iter(ids)
        execute = timed(lambda: execute_task(app, "overhead", str(next(it)), bid), n)
        assert tm.task_stat({"batch_ids": doc["_id"]}) == {"done": n}

        # the parts, on a fresh batch
        doc, ids = new_batch("p")
        it = iter(ids)
        claimed: list[dict] = []
        claim = timed(lambda: claimed.append(tm.claim(next(it), worker=worker_name(), decode=False)), n)
        it = iter(claimed)
        decode = timed(lambda: tm._decode_task(next(it)), n)
        it = iter(claimed)

        def heartbeat_start_stop() -> None:
            with Heartbeat(tm, next(it)):
                pass

        heartbeat = timed(heartbeat_start_stop, n)
        it = iter(claimed)
        commit = timed(lambda: tm.commit(next(it), {"ok": True}, st.DONE), n)
        assert tm.task_stat({"batch_ids": doc["_id"]}) == {"done": n}

        # messages (to a queue nobody consumes; deleted afterwards)
        body = app.signature(AGGREGATE, args=("overhead", str(doc["_id"])), queue=queue, immutable=True, ignore_result=True)
        message = [t / n for t in timed(lambda: _publish_slots(app, "overhead", ids, doc["_id"], queue, 0, body.clone()), 5)]
        it = iter(ids)
        republish = timed(lambda: publish(app, "overhead", [next(it)]), n)
        r = redis_client.Redis.from_url(broker)
        for key in r.keys(f"{queue}*"):
            r.delete(key)

    rows = [
        row("execute (noop, whole)", execute),
        row("  claim", claim),
        row("  decode def", decode),
        row("  heartbeat start+stop", heartbeat),
        row("  commit", commit),
        row("message in the chord", message),
        row("re-publish (recover/sweep)", republish),
    ]
    print(f"\n{'':<30}{'median ms':>10}{'p90 ms':>9}")
    for name, med, p90 in rows:
        print(f"{name:<30}{med:>10.2f}{p90:>9.2f}")
    total = rows[0][1] + rows[5][1]
    print(f"\noverhead per task (execute + its chord message): {total:.2f} ms median")


if __name__ == "__main__":
    main()
