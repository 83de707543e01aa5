"""Publish benchmark: the messages of one batch, from task ids to messages in the broker.

For N = 2,000 and 10,000 tasks, already written to Mongo as one batch, time:

* qcelery: ``producer._publish_slots`` (what ``enqueue`` does after ``create_tasks``):
  the chord size to the result backend, then one id-only ``execute`` message per task
  carrying the chord, through one kombu producer in publish batches;
* anchor, in the same run on the same servers: Celery's own canvas,
  ``chord([execute.si(...) for each task])(aggregate.si(...))``, which is how the
  producer published before (one signature cloned, frozen and sent per task, one broker
  round trip per message).

Each variant runs ``--repeat`` times per N (best reported), alternating; after each run
the queue is counted (it must hold N messages) and emptied. The Mongo writes of
``create_tasks`` are not in these figures (``bench/enqueue.py`` has them).

    .venv/bin/python bench/publish.py                          # embedded SecantusDB + redis-server
    .venv/bin/python bench/publish.py --broker-url amqp://guest:guest@127.0.0.1:5672// \\
        --result-backend redis://127.0.0.1:6379/1              # RabbitMQ broker

Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, nargs="+", default=[2_000, 10_000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mongo-url")
    ap.add_argument("--broker-url")
    ap.add_argument("--result-backend")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from _servers import servers
    from celery import chord

    from qcelery import batch as batches
    from qcelery import status as st
    from qcelery.celery_app import CONTROL_QUEUE, make_app
    from qcelery.manage import TaskManager
    from qcelery.producer import _publish_slots
    from qcelery.settings import Settings, mask_url
    from qcelery.store import client, scans_find_and_modify
    from qcelery.worker import AGGREGATE, EXECUTE

    with tempfile.TemporaryDirectory(prefix="qcelery-bench-") as tmp, servers(tmp, args.mongo_url, args.broker_url) as srv:
        url, broker = srv.mongo_url, srv.broker_url
        queue = f"publish-{os.getpid()}"
        settings = Settings(
            mongo_url=url,
            mongo_db=f"bench_publish_{os.getpid()}",
            broker_url=broker,
            result_backend=args.result_backend,
            run_dir=Path(tmp) / "run",
            default_queue=queue,
            task_func="qcelery.probes.noop",
        )
        app = make_app(settings)
        server = "SecantusDB (embedded)" if scans_find_and_modify(settings) else "MongoDB"
        print(
            f"mongo: {server}; broker: {mask_url(broker)}; result backend: "
            f"{mask_url(settings.effective_result_backend)}; python {sys.version.split()[0]}; "
            f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}"
        )

        with app.connection_for_write() as conn:
            channel = conn.default_channel

            def drain(n: int) -> None:
                """Check the queue holds ``n`` messages, then empty it (RabbitMQ counts the
                last messages from the producer's socket a moment later)."""
                deadline = time.monotonic() + 30
                while (count := channel.queue_declare(queue, passive=True)[1]) < n:
                    assert time.monotonic() < deadline, f"{count} messages in the queue, expected {n}"
                    time.sleep(0.1)
                assert count == n, f"{count} messages in the queue, expected {n}"
                channel.queue_purge(queue)

            def canvas(pool: str, ids: list, bid: str) -> None:
                header = [app.signature(EXECUTE, args=(pool, str(i), bid), queue=queue, immutable=True, ignore_result=True) for i in ids]
                body = app.signature(AGGREGATE, args=(pool, bid), queue=CONTROL_QUEUE, immutable=True, ignore_result=True)
                result = chord(header)(body)
                # building the GroupResult subscribed to every header task: undo it
                consumer = getattr(app.backend, "result_consumer", None)
                if consumer is not None:
                    for r in [result, *result.parent.results]:
                        consumer.cancel_for(r.id)

            def qcelery(pool: str, ids: list, bid: str) -> None:
                body = app.signature(AGGREGATE, args=(pool, bid), queue=CONTROL_QUEUE, immutable=True, ignore_result=True)
                _publish_slots(app, pool, ids, bid, queue, 0, body)

            # warm both paths (connections, declarations, registered scripts)
            tm = TaskManager("warm", settings)
            doc, _ = batches.create(
                tm,
                [{"key": "warm"}],
                queue=queue,
                task_func="qcelery.probes.noop",
                task_kwargs=None,
                before_status=st.WAITING,
                after_status=st.DONE,
                aggregate=None,
            )
            for fn in (qcelery, canvas):
                fn("warm", batches.task_ids(tm, doc["_id"]), str(doc["_id"]))
                drain(1)

            rows = []
            for n in args.n:
                tm = TaskManager(f"pool_{n}", settings)
                t0 = time.perf_counter()
                doc, _ = batches.create(
                    tm,
                    [{"key": f"t{i}"} for i in range(n)],
                    queue=queue,
                    task_func="qcelery.probes.noop",
                    task_kwargs=None,
                    before_status=st.WAITING,
                    after_status=st.DONE,
                    aggregate=None,
                )
                create_s = time.perf_counter() - t0
                ids, bid = batches.task_ids(tm, doc["_id"]), str(doc["_id"])
                best = {"qcelery": float("inf"), "canvas": float("inf")}
                for _ in range(args.repeat):
                    for name, fn in (("qcelery", qcelery), ("canvas", canvas)):
                        t0 = time.perf_counter()
                        fn(tm.name, ids, bid)
                        best[name] = min(best[name], time.perf_counter() - t0)
                        drain(n)
                rows.append((n, create_s, best["qcelery"], best["canvas"]))
        if args.mongo_url:  # leave a real server as it was
            client(settings).drop_database(settings.mongo_db)

    print(f"\n{'N':>8}{'create_tasks s':>16}{'qcelery s':>11}{'msg/s':>9}{'canvas s':>10}{'msg/s':>9}{'ratio':>8}")
    for n, create_s, q, c in rows:
        print(f"{n:>8,}{create_s:>16.2f}{q:>11.2f}{n / q:>9,.0f}{c:>10.2f}{n / c:>9,.0f}{c / q:>7.1f}x")


if __name__ == "__main__":
    main()
