"""Scale benchmark (issue 14): what one batch of N tasks costs, as N grows.

For each N (default 10,000, 100,000 and 1,000,000), on fresh embedded servers (SecantusDB
and redis-server, started for that N and stopped after it), N unique tasks shaped like
``config/demo.yaml`` (its 16 tasks, 8 rolling windows x 2 models, times a grid over
``model.kwargs.alpha``, made lazily one at a time) are enqueued and measured:

* enqueue: wall time and rate of ``qcelery.producer.enqueue`` (generation included), run
  in a child process whose peak RSS (``ru_maxrss`` from ``wait4``) is the producer's alone;
* broker: Redis ``used_memory`` after the enqueue minus before, and the messages in the
  queue's lists (every priority);
* largest document: the largest BSON document (``$bsonSize``) of every collection but the
  task pool (batches and whatever else the design keeps), and of the first 1,000 tasks;
* status: ``qcelery status --batch B`` as a CLI subprocess (median of 3), and
  ``qcelery.batch.progress`` in process (median of 3);
* dispatch: no-op tasks (``qcelery.probes.noop``) on one worker with 2 processes, started
  after the enqueue, over the first ``--dispatch-sample`` commits or ``--dispatch-seconds``,
  whichever comes first; the rate is from the tasks' own ``finished_at`` (first to last
  commit of the sample), so the worker's start-up is not in it.

The same run measures the current design (the code at ``--baseline-ref``, checked out with
``git worktree add`` into a temporary directory) at ``--baseline-sizes``: the anchor of the
ratios. Each design runs in its own processes with ``PYTHONPATH`` and the working directory
at its checkout. Then per measure: the growth exponent (slope of log(measure) against log(N)
between consecutive sizes; 0 = does not grow, 1 = linear) and the ratio new / current.

    .venv/bin/python bench/scale.py                                        # 10k, 100k, 1M; current at 10k, 100k
    .venv/bin/python bench/scale.py --sizes 2000,20000 --baseline-sizes 2000,20000
    .venv/bin/python bench/scale.py --new-path /work/main --json out.json

The enqueue passes a generator (and a ``batch_key``) when the design's ``enqueue`` takes a
stream (detected from its signature), else a list. The 1,000,000 run takes tens of minutes.
Embedded SecantusDB scans the collection on ``findAndModify``, so its claims (and with them
the dispatch rate) slow down with the pool size whatever the design; ``--mongo-url`` runs
against a real MongoDB (a database per design and N). Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
DEMO = "config/demo.yaml"
NOOP = "qcelery.probes.noop"
TASK_SAMPLE = 1_000  # tasks whose document sizes are read
TASK_KEY = "task (first 1,000)"


# ------------------------------------------------------------------ task definitions
def demo_tasks(checkout: Path) -> list[dict]:
    """The 16 tasks of the checkout's ``config/demo.yaml`` (rolling windows x models)."""
    from qcelery.config import load_workflow
    from qcelery.gen import task_generator

    templates, generators = load_workflow(checkout / DEMO)
    return task_generator(templates, generators)


def grid_tasks(n: int, base: list[dict]) -> Iterator[dict]:
    """``n`` unique tasks, one at a time: ``base`` times a grid over ``model.kwargs.alpha``
    (point ``k`` scales each base task's alpha by ``1 + k / 1000``)."""
    for i in range(n):
        k, j = divmod(i, len(base))
        task = copy.deepcopy(base[j])
        kwargs = task["model"].setdefault("kwargs", {})
        kwargs["alpha"] = float(kwargs.get("alpha", 1.0)) * (1 + k / 1000)
        yield task


def takes_stream(enqueue: Any) -> bool:
    """Whether ``enqueue`` takes an iterable of task definitions (the streaming producer)
    rather than a list: it has a ``batch_key`` or its first parameter is typed as one."""
    params = inspect.signature(enqueue).parameters
    if "batch_key" in params:
        return True
    first = next(iter(params.values()))
    annotation = str(first.annotation)
    return any(word in annotation for word in ("Iterable", "Iterator", "Generator"))


# ------------------------------------------------------ child: the producer alone
def producer_main(argv: list[str]) -> None:
    """Run under the measured checkout: enqueue N tasks; prints JSON (batch id, seconds)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--pool", required=True)
    ap.add_argument("--settings", required=True, help="Settings as JSON")
    a = ap.parse_args(argv)

    from qcelery.producer import enqueue
    from qcelery.settings import Settings

    settings = Settings(**json.loads(a.settings))
    base = demo_tasks(Path.cwd())
    stream = takes_stream(enqueue)
    kwargs: dict[str, Any] = {"settings": settings, "task_func": NOOP}
    if "batch_key" in inspect.signature(enqueue).parameters:
        kwargs["batch_key"] = f"scale-{a.pool}"
    t0 = time.perf_counter()
    defs = grid_tasks(a.n, base)
    batch_id = enqueue(defs if stream else list(defs), a.pool, **kwargs)
    seconds = time.perf_counter() - t0
    print(json.dumps({"batch_id": str(batch_id), "enqueue_s": seconds, "streamed": stream}))


def run_producer(checkout: Path, env: dict[str, str], n: int, pool: str, settings_json: str, log: Path) -> dict:
    """The producer child; its JSON plus ``peak_mb``, its own peak RSS (from ``wait4``)."""
    argv = [sys.executable, __file__, "_producer", "--n", str(n), "--pool", pool, "--settings", settings_json]
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(argv, cwd=checkout, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.with_suffix(".err").read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"enqueue exited with {proc.returncode}: {' | '.join(tail)}")
    result = json.loads(log.read_text().strip().splitlines()[-1])
    result["peak_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


# ------------------------------------------------------------- measures on the servers
def broker_state(broker_url: str, queue: str) -> dict:
    """Redis ``used_memory`` and the messages waiting in ``queue``'s lists (all priorities)."""
    import redis

    r = redis.Redis.from_url(broker_url)
    try:
        queued = sum(r.llen(k) for k in r.scan_iter(match=f"{queue}*", count=1000) if r.type(k) == b"list")
        return {"used_memory": int(r.info("memory")["used_memory"]), "queued": int(queued)}
    finally:
        r.close()


def largest_documents(db: Any, pool: str) -> dict:
    """The largest BSON document of each collection but the pool (server-side ``$bsonSize``),
    and the largest of the pool's first ``TASK_SAMPLE`` tasks; sizes in bytes."""
    from bson.raw_bson import RawBSONDocument

    out: dict[str, int] = {}
    for name in db.list_collection_names():
        if name.startswith("system."):
            continue
        if name == pool:
            raw = db[name].with_options(codec_options=db[name].codec_options.with_options(document_class=RawBSONDocument))
            out[TASK_KEY] = max((len(d.raw) for d in raw.find().sort("_id", 1).limit(TASK_SAMPLE)), default=0)
            continue
        sizes = list(db[name].aggregate([{"$project": {"s": {"$bsonSize": "$$ROOT"}}}, {"$sort": {"s": -1}}, {"$limit": 1}]))
        out[name] = int(sizes[0]["s"]) if sizes else 0
    return out


def attempt(result: dict, what: str, measure: Any) -> Any:
    """``measure()``, or ``None`` with the failure noted in ``result["errors"]``: one measure
    a design cannot take (a changed API, a server error) does not cost the others."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 - reported with the results, not hidden
        result.setdefault("errors", []).append(f"{what}: {type(exc).__name__}: {exc}"[:400])
        return None


def median_seconds(fn: Any, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def status_cli_seconds(checkout: Path, env: dict[str, str], batch_id: str, cwd: Path) -> float:
    """``qcelery status --batch B`` in a fresh interpreter, median of 3 (start-up included)."""
    argv = [sys.executable, "-m", "qcelery.cli.main", "status", "--batch", batch_id]

    def once() -> None:
        out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"qcelery status exited with {out.returncode}: {last}")

    return median_seconds(once)


def progress_seconds(settings: Any, pool: str, batch_id: str) -> float:
    """``qcelery.batch.progress`` of the batch, in this process (median of 3)."""
    from qcelery import batch as batches
    from qcelery.manage import TaskManager
    from qcelery.store import database

    tm = TaskManager.open(pool, settings)
    doc = batches.load(database(settings), batch_id)
    return median_seconds(lambda: batches.progress(tm, doc))


def dispatch_rate(settings: Any, pool: str, sample: int, limit_s: float, loglevel: str, beat: bool) -> dict:
    """Start one worker (2 processes) on the batch's queue, let it commit ``sample`` tasks
    or run ``limit_s`` seconds, stop it; the rate from the first to the last commit."""
    from qcelery.celery_app import app_for
    from qcelery.cluster import Cluster
    from qcelery.manage import TaskManager

    tasks = TaskManager.open(pool, settings).task_pool
    with Cluster(settings) as cluster:
        cluster.start_worker(settings.default_queue, concurrency=2, loglevel=loglevel)
        if beat:
            cluster.start_beat()
        cluster.wait_ready(app_for(settings), timeout=120)
        ready = time.monotonic()
        done = 0
        while done < sample and time.monotonic() - ready < limit_s:
            time.sleep(0.5)
            done = tasks.count_documents({"status": "done"})
        waited = time.monotonic() - ready
    ends = [d["finished_at"] for d in tasks.find({"status": "done"}, {"finished_at": 1}).sort("finished_at", 1).limit(sample)]
    if len(ends) < 2:
        return {"dispatch_rate": None, "dispatched": len(ends), "dispatch_wait_s": waited}
    span = (ends[-1] - ends[0]).total_seconds()
    return {"dispatch_rate": (len(ends) - 1) / span if span > 0 else None, "dispatched": len(ends), "dispatch_wait_s": waited}


def measure_main(argv: list[str]) -> None:
    """Run under the measured checkout: every measure of one N on fresh servers; prints JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--mongo-url")
    ap.add_argument("--broker-url")
    ap.add_argument("--dispatch-sample", type=int, default=2_000)
    ap.add_argument("--dispatch-seconds", type=float, default=60.0)
    ap.add_argument("--loglevel", default="INFO")
    ap.add_argument("--beat", action="store_true")
    ap.add_argument("--mongo-timeout-ms", type=int, default=60_000)
    a = ap.parse_args(argv)

    sys.path.insert(0, str(BENCH))
    from _servers import servers

    from qcelery.settings import Settings
    from qcelery.store import client, database, scans_find_and_modify

    checkout = Path.cwd()
    tag = f"{a.n}_{os.getpid()}"
    pool, queue = f"scale_{a.n}", f"scale-{tag}"
    result: dict[str, Any] = {"n": a.n, "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="qcelery-scale-") as tmp, servers(tmp, a.mongo_url, a.broker_url) as srv:
        run_dir = Path(tmp)
        settings = Settings(
            mongo_url=srv.mongo_url,
            mongo_db=f"bench_scale_{tag}",
            broker_url=srv.broker_url,
            run_dir=run_dir / "run",
            default_queue=queue,
            mongo_timeout_ms=a.mongo_timeout_ms,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("QCELERY_")}
        env.update(settings.to_env())
        env["PYTHONPATH"] = str(checkout)
        server = "SecantusDB (embedded)" if scans_find_and_modify(settings) else "MongoDB"
        result["server"] = f"{server} {client(settings).server_info().get('version')}"
        result["broker_shared"] = srv.redis is None
        try:
            before = broker_state(settings.broker_url, queue)
            made = run_producer(checkout, env, a.n, pool, settings.model_dump_json(), run_dir / "producer.log")
        except Exception as exc:  # noqa: BLE001 - a design that cannot enqueue N tasks is a result: report it and go on
            result["errors"] = [f"enqueue: {type(exc).__name__}: {exc}"[:400]]
        else:
            bid = made["batch_id"]
            result.update(made)
            result["enqueue_rate"] = a.n / made["enqueue_s"]
            after = broker_state(settings.broker_url, queue)
            result["broker_mb"] = (after["used_memory"] - before["used_memory"]) / 2**20
            result["queued"] = after["queued"]
            docs = attempt(result, "largest document", lambda: largest_documents(database(settings), pool)) or {}
            others = {k: v for k, v in docs.items() if k != TASK_KEY}
            if others:
                biggest = max(others, key=lambda k: others[k])
                result["largest_doc_kb"], result["largest_doc_in"] = others[biggest] / 1024, biggest
            result["largest_task_kb"] = docs.get(TASK_KEY, 0) / 1024
            result["status_cli_s"] = attempt(result, "status", lambda: status_cli_seconds(checkout, env, bid, run_dir))
            ms = attempt(result, "progress", lambda: progress_seconds(settings, pool, bid))
            result["progress_ms"] = ms * 1000 if ms is not None else None
            sample = min(a.dispatch_sample, a.n)
            result.update(
                attempt(result, "dispatch", lambda: dispatch_rate(settings, pool, sample, a.dispatch_seconds, a.loglevel, a.beat)) or {}
            )
        finally:
            with contextlib.suppress(Exception):
                client(settings).drop_database(settings.mongo_db)
    print(json.dumps(result))


# ------------------------------------------------------------------- the orchestrator
MEASURES = [
    # key, label, format
    ("enqueue_s", "enqueue s", "{:,.1f}"),
    ("enqueue_rate", "enqueue tasks/s", "{:,.0f}"),
    ("peak_mb", "producer peak MB", "{:,.0f}"),
    ("broker_mb", "Redis MB", "{:,.1f}"),
    ("queued", "messages queued", "{:,.0f}"),
    ("largest_doc_kb", "largest doc KB", "{:,.1f}"),
    ("status_cli_s", "status --batch s", "{:,.2f}"),
    ("progress_ms", "progress ms", "{:,.1f}"),
    ("dispatch_rate", "dispatch tasks/s", "{:,.1f}"),
]


def run_measure(checkout: Path, n: int, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "_measure", "--n", str(n), "--dispatch-sample", str(args.dispatch_sample)]
    argv += [
        "--dispatch-seconds",
        str(args.dispatch_seconds),
        "--loglevel",
        args.loglevel,
        "--mongo-timeout-ms",
        str(args.mongo_timeout_ms),
    ]
    if args.mongo_url:
        argv += ["--mongo-url", args.mongo_url]
    if args.broker_url:
        argv += ["--broker-url", args.broker_url]
    if args.beat:
        argv.append("--beat")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QCELERY_")}
    env["PYTHONPATH"] = str(checkout)
    out = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"n": n, "errors": [f"measure exited with {out.returncode}: {out.stderr.strip()[-400:]}"]}
    return json.loads(lines[-1])


@contextlib.contextmanager
def baseline_checkout(ref: str) -> Iterator[Path]:
    """The code at ``ref`` in a temporary git worktree, removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="qcelery-baseline-"))
    path = tmp / "checkout"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)
        with contextlib.suppress(OSError):
            tmp.rmdir()


def fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def growth(rows: list[dict], key: str) -> list[str]:
    """Slope of log(measure) against log(N) between consecutive sizes that have the measure."""
    pts = [(r["n"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] > 0]
    return [f"{math.log(b / a) / math.log(m / n):+.2f}" for (n, a), (m, b) in zip(pts, pts[1:], strict=False)]


def print_report(new: list[dict], current: list[dict], labels: tuple[str, str]) -> None:
    for label, rows in zip(labels, (new, current), strict=True):
        if not rows:
            continue
        print(f"\n{label}")
        print(f"{'measure':<20}" + "".join(f"{'N=' + format(r['n'], ','):>14}" for r in rows))
        for key, name, pattern in MEASURES:
            print(f"{name:<20}" + "".join(f"{fmt(r.get(key), pattern):>14}" for r in rows))
        for r in rows:
            notes = [f"largest doc in {r['largest_doc_in']}"] if r.get("largest_doc_in") else []
            if r.get("largest_task_kb"):
                notes.append(f"task doc {r['largest_task_kb']:.1f} KB")
            if "dispatched" in r:
                notes.append(f"dispatch over {r['dispatched']:,} tasks in {r['dispatch_wait_s']:.0f} s")
            if "streamed" in r:
                notes.append("stream" if r["streamed"] else "list")
            if "load" in r:
                notes.append(f"load {r['load']:.1f} at its start")
            notes += [f"ERROR {e}" for e in r.get("errors", [])]
            print(f"  N={r['n']:,}: " + "; ".join(notes))

    sizes = lambda rows: "->".join(f"{r['n']:,}" for r in rows)  # noqa: E731 - a label, used twice
    print(f"\ngrowth exponent d log(measure) / d log(N)   new: {sizes(new)}   current: {sizes(current)}")
    print(f"{'measure':<20}{'new':>22}{'current':>22}")
    for key, name, _ in MEASURES:
        print(f"{name:<20}{', '.join(growth(new, key)) or '-':>22}{', '.join(growth(current, key)) or '-':>22}")

    common = sorted({r["n"] for r in new} & {r["n"] for r in current})
    if common:
        print("\nratio new / current (the anchor), same run")
        print(f"{'measure':<20}" + "".join(f"{'N=' + format(n, ','):>14}" for n in common))
        by_n = {r["n"]: r for r in new}, {r["n"]: r for r in current}
        for key, name, _ in MEASURES:
            cells = []
            for n in common:
                a, b = by_n[0][n].get(key), by_n[1][n].get(key)
                cells.append(f"{a / b:,.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-")
            print(f"{name:<20}" + "".join(f"{c:>14}" for c in cells))


def sizes_arg(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()] if text.strip() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=sizes_arg, default=[10_000, 100_000, 1_000_000], help="N for the new design (comma-separated)")
    ap.add_argument("--baseline-sizes", type=sizes_arg, default=[10_000, 100_000], help="N for the current design ('' to skip)")
    ap.add_argument("--baseline-ref", default="07462b4", help="git ref of the current design (default 07462b4)")
    ap.add_argument("--new-path", type=Path, default=ROOT, help="checkout of the new design (default: this one)")
    ap.add_argument("--mongo-url", help="a MongoDB server instead of an embedded SecantusDB per N")
    ap.add_argument("--broker-url", help="a Redis instead of an embedded one per N (its INFO memory is then shared)")
    ap.add_argument("--dispatch-sample", type=int, default=2_000, help="tasks the dispatch rate is measured over")
    ap.add_argument("--dispatch-seconds", type=float, default=60.0, help="at most this long per dispatch sample")
    ap.add_argument("--loglevel", default="INFO", help="worker log level (INFO: two lines per task, as in production)")
    ap.add_argument("--beat", action="store_true", help="also run beat beside the worker while dispatching")
    ap.add_argument(
        "--mongo-timeout-ms",
        type=int,
        default=60_000,
        help="QCELERY_MONGO_TIMEOUT_MS of every process (default 60000: pymongo's heartbeats time out after it, and the "
        "embedded SecantusDB, busy with one long query over a large batch, answers no heartbeat; at the 3 s default the "
        "other clients' operations are cancelled)",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    new_path = args.new_path.resolve()
    commit = subprocess.run(["git", "-C", str(new_path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    labels = (f"new design: {new_path} at {commit}", f"current design: {args.baseline_ref}")
    print(
        f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at start; "
        f"new {new_path} ({commit}), current {args.baseline_ref}",
        flush=True,
    )
    new: list[dict] = []
    current: list[dict] = []
    with baseline_checkout(args.baseline_ref) if args.baseline_sizes else contextlib.nullcontext(None) as base:
        runs = [(labels[0], new_path, new, n) for n in args.sizes]
        if base is not None:
            runs += [(labels[1], base, current, n) for n in args.baseline_sizes]
        for label, checkout, rows, n in sorted(runs, key=lambda r: r[3]):
            t0 = time.monotonic()
            row = run_measure(checkout, n, args)
            rows.append(row)
            if args.json:  # after every N: a long run stopped half-way keeps what it measured
                args.json.write_text(json.dumps({"new": new, "current": current, "labels": labels}, indent=1))
            brief = ", ".join(f"{name} {fmt(row.get(k), p)}" for k, name, p in MEASURES if k in row)
            print(f"[{time.monotonic() - t0:,.0f} s] {label} N={n:,}: " + "; ".join([brief, *row.get("errors", [])]), flush=True)
    server = next((r["server"] for r in new + current if "server" in r), "?")
    print(f"\nMongo: {server}; load average {os.getloadavg()[0]:.2f} at the end")
    print_report(new, current, labels)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_producer":
        producer_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_measure":
        measure_main(sys.argv[2:])
    else:
        main()
