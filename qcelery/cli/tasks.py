"""Task commands: ``enqueue``, ``status``, ``wait``, ``collect`` and the pool's admin
(``recover``, ``reset-waiting``, ``retry-failed``, ``prioritize``, ``remove``, ``pools``).

``--pool`` here is a *task pool* (Qlib's ``task_pool``, a Mongo collection); the
worker pool a batch runs on is its ``--queue``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from .. import status as st
from ..errors import ConfigError, TaskNotFoundError
from ..settings import Settings
from . import checks, render
from . import workflow as wfl
from .state import CliState, err, out

if TYPE_CHECKING:
    from ..manage import TaskManager

# the pool, batch and Celery modules pull in pandas and celery: imported on first use,
# so `qcelery --help` and an unreachable server answer quickly
MAX_PRIORITY = 9  # qcelery.celery_app.MAX_PRIORITY (checked by the producer as well)

app = typer.Typer()
PANEL_RUN = "Batches"
PANEL_ADMIN = "Task pool admin"
EXIT_FAILED = 1
EXIT_ERROR = 2
_CHUNK = 100


def _fail(message: str) -> None:
    err.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(EXIT_ERROR)


def _settings(ctx: typer.Context) -> Settings:
    state: CliState = ctx.obj
    return state.settings()


def _pools(settings: Settings, pool: str | None) -> list[str]:
    from ..manage import TaskManager

    names = TaskManager.list(settings)
    if pool is None:
        return names
    if pool not in names:
        raise TaskNotFoundError(f"no task pool {pool!r} in database {settings.mongo_db!r}; pools: {', '.join(names) or 'none'}")
    return [pool]


def _latest_batch(settings: Settings, pool: str | None) -> dict:
    from .. import batch as batches
    from ..store import database

    docs = list(batches.list_batches(database(settings), pool, limit=1))
    if not docs:
        where = f"pool {pool!r}" if pool else f"database {settings.mongo_db!r}"
        raise TaskNotFoundError(f"no batch in {where}; enqueue one with `qcelery enqueue CONFIG.yaml`")
    return batches.load(database(settings), docs[0]["_id"])


# --------------------------------------------------------------------------- enqueue
@dataclass
class Submitted:
    batch_id: str
    pool: str
    queue: str
    n_tasks: int
    n_new: int
    existing: dict[str, int]  # status -> count of tasks that were already in the pool


def statuses_by_hash(tm: TaskManager, tasks: list[dict]) -> dict[str, str]:
    """``filter_hash -> status`` of the tasks of ``tasks`` already in the pool (the
    pool deduplicates on that hash)."""
    from ..canonical import filter_hash, normalize

    hashes = list(dict.fromkeys(filter_hash(normalize(t)) for t in tasks))
    found: dict[str, str] = {}
    for start in range(0, len(hashes), _CHUNK):
        for d in tm.task_pool.find({"filter_hash": {"$in": hashes[start : start + _CHUNK]}}, {"filter_hash": 1, "status": 1}):
            found[d["filter_hash"]] = d["status"]
    return found


def submit(
    wf: wfl.Workflow, settings: Settings, *, pool: str | None = None, queue: str | None = None, priority: int = 0, check: bool = True
) -> Submitted:
    """Enqueue the workflow's tasks as one batch (servers checked first)."""
    from ..celery_app import check_queue_name
    from ..manage import TaskManager
    from ..producer import enqueue as produce

    pool = pool or wf.default_pool
    queue = check_queue_name(queue or wf.queue or settings.default_queue)  # before anything is written
    if check:
        checks.check_all(settings)
    tm = TaskManager(pool, settings)
    task_func = settings.task_func
    experiment = wf.experiment_name or pool
    kwargs = {"experiment_name": experiment} if wfl.accepts(task_func, "experiment_name") else None
    bid = produce(
        wf.iter_tasks(),  # streamed: the producer holds one chunk at a time
        pool,
        settings=settings,
        queue=queue,
        priority=priority,
        aggregate=wfl.aggregate_spec(task_func, experiment),
        task_func=task_func,
        task_kwargs=kwargs,
        qlib_init=wf.qlib_init,
    )
    from .. import batch as batches

    doc = batches.load(tm.db, bid)  # what the producer found, counted chunk by chunk
    return Submitted(bid, pool, queue, doc["n_tasks"], doc.get("n_new", 0), dict(doc.get("found") or {}))


@app.command(rich_help_panel=PANEL_RUN)
def enqueue(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Workflow YAML (Qlib's task: section plus generators:)."),
    pool: str | None = typer.Option(
        None, "--pool", "-p", help="Task pool (Mongo collection). Default: the file's pool:, else the file's name (demo.yaml: demo)."
    ),
    queue: str | None = typer.Option(
        None, "--queue", "-Q", help="Worker pool (queue) to run on. Default: the file's queue: or settings.default_queue (cpu)."
    ),
    priority: int = typer.Option(0, "--priority", min=0, max=MAX_PRIORITY, help=f"Message priority 0..{MAX_PRIORITY}, higher first."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the tasks that would run (new / existing); write nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print the batch id only."),
) -> None:
    """Generate the workflow's tasks, deduplicate them against the pool and enqueue
    them as one batch. Prints the batch id and how many tasks are new / already done.

    Every model, dataset and record class is imported first: a typo fails here,
    before anything is written. Tasks already done are not run again (as Qlib's
    create_task) but belong to the batch and to its summary."""
    settings = _settings(ctx)
    # servers first: an unreachable one is reported at once, before the (slower) imports
    checks.check_all(settings, broker=not dry_run, tracking=not dry_run)
    wf = wfl.load(config, settings)
    if dry_run:
        _dry_run(wf, settings, pool)
        return
    sub = submit(wf, settings, pool=pool, queue=queue, priority=priority, check=False)
    _warn_unserved(settings, sub.queue)
    if quiet:
        out.print(sub.batch_id)
        return
    done = sub.existing.get(st.DONE, 0)
    pending = sum(n for s, n in sub.existing.items() if s != st.DONE)
    out.print(f"batch {sub.batch_id}", markup=False)
    out.print(
        f"  {sub.n_tasks} tasks in pool {sub.pool!r}, queue {sub.queue!r}: {sub.n_new} new, {done} already done"
        + (f", {pending} from earlier batches not done yet" if pending else ""),
        markup=False,
    )
    out.print(f"  follow it: qcelery wait --batch {sub.batch_id}   results: qcelery collect --batch {sub.batch_id}", markup=False)


def _warn_unserved(settings: Settings, queue: str) -> None:
    """A batch sent to a queue no live worker consumes would wait in silence: say so."""
    from ..presence import queues_served

    served = queues_served(settings)
    if queue not in served:
        online = ", ".join(sorted(served)) or "none"
        err.print(
            f"warning: no live worker serves queue {queue!r} (queues served now: {online}); the batch waits until one "
            f"does: `qcelery worker --pool {queue}`",
            markup=False,
            soft_wrap=True,
        )


def _dry_run(wf: wfl.Workflow, settings: Settings, pool: str | None) -> None:
    from rich.table import Table

    from ..canonical import filter_hash, normalize
    from ..manage import TaskManager

    pool = pool or wf.default_pool
    # an unknown pool is not created by a dry run
    status_of = statuses_by_hash(TaskManager.open(pool, settings), wf.tasks) if pool in TaskManager.list(settings) else {}
    t = Table(title=f"{wf.path}: tasks for pool {pool!r} (dry run)", title_justify="left")
    for col in ("#", "model", "train", "test", "in pool"):
        t.add_column(col, no_wrap=True)
    for i, task in enumerate(wf.tasks):
        model, train, test = wfl.describe(task)
        s = status_of.get(filter_hash(normalize(task)))
        t.add_row(str(i), model, train, test, s if s else "[bold]new[/]")
    out.print(t)
    n_new = len(wf.tasks) - len(status_of)
    done = sum(1 for s in status_of.values() if s == st.DONE)
    out.print(
        f"dry run: {len(wf.tasks)} tasks, {n_new} new, {done} already done, "
        f"{len(status_of) - done} in the pool not done; nothing was written"
    )


# ---------------------------------------------------------------------------- status
@app.command(rich_help_panel=PANEL_RUN)
def status(
    ctx: typer.Context,
    pool: str | None = typer.Option(None, "--pool", "-p", help="Only this task pool."),
    batch: str | None = typer.Option(None, "--batch", "-b", help="Only this batch."),
    limit: int = typer.Option(10, "--limit", "-n", min=1, help="Batches (and rows of each table) shown."),
) -> None:
    """Counts by status per batch (from the batch's counters: as fast for a million tasks
    as for ten), running tasks with their worker and lease,
    failures with the line of their error that says what went wrong, and the workers
    seen with their queues and when each was last heard from (`lost`: silent too long)."""
    from .. import batch as batches
    from ..manage import TaskManager
    from ..store import database

    settings = _settings(ctx)
    checks.check_mongo(settings)
    db = database(settings)
    if batch:
        docs = [batches.load(db, batch)]
        pools = [docs[0]["pool"]]
        task_q: dict[str, Any] = {"batch_ids": docs[0]["_id"]}
    else:
        pools = _pools(settings, pool)
        docs = list(batches.list_batches(db, pool, limit=limit))
        task_q = {}
    managers = {p: TaskManager.open(p, settings) for p in pools}
    if docs:
        rows = [(d, batches.progress(managers.get(d["pool"]) or TaskManager.open(d["pool"], settings), d)) for d in docs]
        out.print(render.batches_table(rows))
    elif pools:
        # no task scan here: a pool's own counts are one pass over it (`qcelery pools`)
        names = ", ".join(repr(p) for p in pools)
        out.print(f"no batches in pool(s) {names}; `qcelery pools` counts their tasks by status (one pass over each pool)", markup=False)
    else:
        out.print(f"no task pools or batches in database {settings.mongo_db!r} yet; enqueue with `qcelery enqueue CONFIG.yaml`")
        _print_workers(settings, limit)
        return
    running, failed = [], []
    for p, tm in managers.items():
        for d in (
            tm.task_pool.find({**task_q, "status": st.RUNNING}, {"worker": 1, "attempt": 1, "started_at": 1, "lease_until": 1})
            .sort("started_at", 1)
            .limit(limit)
        ):
            running.append({**d, "_pool": p})
        for d in (
            tm.task_pool.find({**task_q, "status": st.FAILED}, {"attempt": 1, "error": 1, "finished_at": 1})
            .sort("finished_at", -1)
            .limit(limit)
        ):
            failed.append({**d, "_pool": p})
    if running:
        out.print(render.running_table(running[:limit]))
    if failed:
        out.print(render.failures_table(failed[:limit]))
    _print_workers(settings, limit)


def _print_workers(settings: Settings, limit: int) -> None:
    from ..presence import workers_seen

    workers = list(workers_seen(settings, limit=limit))
    if workers:
        out.print(render.workers_table(workers))
    else:
        out.print("no worker has reported to this database in the last day; start one with `qcelery up` or `qcelery worker`")


# ------------------------------------------------------------------------------ wait
class RateColumn(ProgressColumn):
    """Tasks per minute (or second), from rich's moving estimate."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("-- tasks/min", style="progress.data.speed")
        if speed >= 1:
            return Text(f"{speed:.1f} tasks/s", style="progress.data.speed")
        return Text(f"{speed * 60:.1f} tasks/min", style="progress.data.speed")


def follow(settings: Settings, doc: dict, *, timeout: float | None = None, poll: float = 1.0, aggregation: bool = True) -> dict[str, int]:
    """Show a progress bar (rate, ETA) until every task of the batch is final and,
    with ``aggregation``, its summary is written. Polls the batch's counters
    (one document), confirmed by a real count when they say it is finished or stop moving."""
    from .. import batch as batches
    from ..manage import TaskManager

    tm = TaskManager.open(doc["pool"], settings)
    final = batches.final_statuses(doc)
    total = doc["n_tasks"]
    deadline = None if timeout is None else time.monotonic() + timeout

    def finished(stat: dict[str, int]) -> int:
        return sum(n for s, n in stat.items() if s in final)

    def check_deadline(what: str) -> None:
        if deadline is not None and time.monotonic() > deadline:
            _fail(f"batch {doc['_id']}: {what} after {timeout:g}s; still running, check `qcelery status --batch {doc['_id']}`")

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
        console=err,
        transient=False,
    )
    stat = batches.watched_progress(tm, doc)
    with progress:
        bar = progress.add_task(f"batch {str(doc['_id'])[-6:]}", total=total, completed=finished(stat), detail="")
        while doc["state"] == batches.CREATING or finished(stat) < total:
            check_deadline(f"{total - finished(stat)} of {total} tasks not finished")
            time.sleep(poll)
            if doc["state"] == batches.CREATING:  # its producer is still writing it: the total grows
                doc = batches.load(tm.db, doc["_id"])
                total = doc["n_tasks"]
                progress.update(bar, total=total)
            stat = batches.watched_progress(tm, doc)
            detail = ", ".join(f"{stat.get(s, 0)} {s}" for s in (st.RUNNING, st.FAILED) if stat.get(s))
            progress.update(bar, completed=finished(stat), detail=detail)
        if aggregation:
            progress.update(bar, detail="tasks final; waiting for the summary")
            while batches.load(tm.db, doc["_id"])["state"] != batches.AGGREGATED:
                check_deadline("the summary was not written")
                time.sleep(min(poll, 0.5))
            progress.update(bar, detail="summary written")
            stat = batches.progress(tm, doc)  # the aggregation counted them for real
    return stat


@app.command(rich_help_panel=PANEL_RUN)
def wait(
    ctx: typer.Context,
    batch: str | None = typer.Option(None, "--batch", "-b", help="Batch id. Default: the latest batch."),
    pool: str | None = typer.Option(None, "--pool", "-p", help="Latest batch of this task pool."),
    timeout: float | None = typer.Option(None, "--timeout", help="Give up after this many seconds (exit 2)."),
    poll: float = typer.Option(1.0, "--poll", min=0.1, help="Seconds between two counts."),
) -> None:
    """Wait for a batch with a progress bar (rate, ETA) until its tasks are done or
    failed and its summary is written. Exit code 0: all done; 1: some failed."""
    from .. import batch as batches
    from ..store import database

    settings = _settings(ctx)
    checks.check_mongo(settings)
    db = database(settings)
    doc = batches.load(db, batch) if batch else _latest_batch(settings, pool)
    stat = follow(settings, doc, timeout=timeout, poll=poll)
    failed = stat.get(st.FAILED, 0)
    done = sum(n for s, n in stat.items() if s != st.FAILED)
    out.print(f"batch {doc['_id']}: {done} done, {failed} failed", markup=False)
    if failed:
        out.print(
            f"see the errors: qcelery status --batch {doc['_id']}; run them again: qcelery retry-failed --batch {doc['_id']}", markup=False
        )
        raise typer.Exit(EXIT_FAILED)


# --------------------------------------------------------------------------- collect
@app.command(rich_help_panel=PANEL_RUN)
def collect(
    ctx: typer.Context,
    batch: str | None = typer.Option(None, "--batch", "-b", help="Batch id. Default: the latest batch."),
    wait_: bool = typer.Option(False, "--wait", help="Wait for the batch to finish first."),
    tasks_: bool = typer.Option(False, "--tasks", help="Also print one row per task."),
    as_json: bool = typer.Option(False, "--json", help="Print the batch summary as JSON."),
) -> None:
    """Print a finished batch's summary: the model comparison table, failures, and
    where the MLflow summary run, the HTML report and the plots are."""
    import json

    from .. import batch as batches
    from ..manage import TaskManager
    from ..store import database

    settings = _settings(ctx)
    checks.check_mongo(settings)
    db = database(settings)
    doc = batches.load(db, batch) if batch else _latest_batch(settings, None)
    if doc["state"] != batches.AGGREGATED:
        if not wait_:
            left = batches.outstanding(TaskManager.open(doc["pool"], settings), doc)
            _fail(
                f"batch {doc['_id']} has no summary yet ({left} tasks not finished, state {doc['state']}): "
                f"`qcelery wait --batch {doc['_id']}` or `qcelery collect --wait`"
            )
        follow(settings, doc)
        doc = batches.load(db, doc["_id"])
    summary = doc.get("summary") or {}
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        return
    print_summary(doc, settings, with_tasks=tasks_)


def print_summary(doc: dict, settings: Settings, *, with_tasks: bool = False) -> None:
    from ..collect import local_report

    # the report was written on the aggregating worker's machine: shown from here
    summary = local_report(doc.get("summary") or {}, settings)
    lines, tables = render.summary_lines(doc)
    for line in lines:
        out.print(line, markup=False)
    for t in tables:
        out.print(t)
    if with_tasks and summary.get("tasks"):
        out.print(render.records_table("tasks", list(summary["tasks"]), first=("task_id", "model")))
    for line in render.where_lines(summary, settings.effective_tracking_uri):
        out.print(line, markup=False)


# ----------------------------------------------------------------------------- admin
def _query(settings: Settings, pool: str | None, batch: str | None) -> tuple[list[str], dict]:
    from .. import batch as batches
    from ..store import database

    if batch:
        doc = batches.load(database(settings), batch)
        if pool and pool != doc["pool"]:
            raise ConfigError(f"batch {batch} belongs to pool {doc['pool']!r}, not {pool!r}")
        return [doc["pool"]], {"batch_ids": doc["_id"]}
    return _pools(settings, pool), {}


def _publish(settings: Settings, pool: str, ids: list, priority: int | None = None) -> int:
    from ..celery_app import app_for
    from ..producer import publish

    return publish(app_for(settings), pool, ids, priority=priority) if ids else 0


def _requeue(
    ctx: typer.Context, pool: str | None, batch: str | None, requeue: Callable[[TaskManager, dict | None], tuple[list, int]]
) -> int:
    """Run ``requeue(manager, query)`` on each selected pool (``query`` selects the
    batch's tasks, ``None`` all) and re-publish the ids it returns with the count it
    put back; the sum of the counts."""
    from ..manage import TaskManager

    settings = _settings(ctx)
    checks.check_all(settings, tracking=False)
    pools, q = _query(settings, pool, batch)
    total = 0
    for p in pools:
        ids, n = requeue(TaskManager.open(p, settings), q or None)
        _publish(settings, p, ids)
        total += n
    return total


@app.command(rich_help_panel=PANEL_ADMIN)
def recover(
    ctx: typer.Context,
    pool: str | None = typer.Option(None, "--pool", "-p", help="Only this task pool (default: all)."),
) -> None:
    """Now, what beat does every few seconds: tasks `running` past their lease go back
    to `waiting` (or `failed` after max_attempts) and are re-published ahead of the
    backlog (at the top priority, as beat does: they have waited already)."""
    from ..manage import TaskManager

    settings = _settings(ctx)
    checks.check_all(settings, tracking=False)
    total = 0
    for p in _pools(settings, pool):
        ids = TaskManager.open(p, settings).recover_expired()
        total += _publish(settings, p, ids, priority=MAX_PRIORITY)
        if ids:
            out.print(f"pool {p!r}: {len(ids)} task(s) back to waiting", markup=False)
    out.print(f"recovered {total} task(s) with an expired lease", markup=False)


@app.command("reset-waiting", rich_help_panel=PANEL_ADMIN)
def reset_waiting(
    ctx: typer.Context,
    pool: str | None = typer.Option(None, "--pool", "-p", help="Only this task pool (default: all)."),
    batch: str | None = typer.Option(None, "--batch", "-b", help="Only the tasks of this batch."),
) -> None:
    """Qlib's reset_waiting: every `running` task back to `waiting`, lease or not, and
    re-published. For when workers are known dead; `recover` only takes expired
    leases. A worker still running such a task cannot commit it any more."""

    def reset(tm: TaskManager, q: dict | None) -> tuple[list, int]:
        ids = [d["_id"] for d in tm.task_pool.find({**(q or {}), "status": st.RUNNING}, {"_id": 1})]
        return ids, tm.reset_waiting(q)

    total = _requeue(ctx, pool, batch, reset)
    out.print(f"{total} running task(s) reset to waiting and re-published", markup=False)


@app.command("retry-failed", rich_help_panel=PANEL_ADMIN)
def retry_failed(
    ctx: typer.Context,
    pool: str | None = typer.Option(None, "--pool", "-p", help="Only this task pool (default: all)."),
    batch: str | None = typer.Option(None, "--batch", "-b", help="Only the tasks of this batch."),
) -> None:
    """`failed` tasks back to the phase that failed (`waiting`, or `part_done` for a
    second-phase failure) with a fresh attempt budget, re-published.
    A batch's summary is written once: enqueue the workflow again for a new one
    (done tasks are not run twice)."""

    def retry(tm: TaskManager, q: dict | None) -> tuple[list, int]:
        ids = tm.retry_failed(q)
        return ids, len(ids)

    total = _requeue(ctx, pool, batch, retry)
    out.print(f"{total} failed task(s) back to waiting or part_done and re-published", markup=False)


@app.command(rich_help_panel=PANEL_ADMIN)
def prioritize(
    ctx: typer.Context,
    priority: int = typer.Argument(..., min=0, max=MAX_PRIORITY, help=f"0..{MAX_PRIORITY}, higher runs first."),
    task_ids: list[str] | None = typer.Argument(None, help="Task ids (or use --batch)."),
    pool: str | None = typer.Option(None, "--pool", "-p", help="Task pool of the ids (default: the only pool)."),
    batch: str | None = typer.Option(None, "--batch", "-b", help="Every task of this batch."),
) -> None:
    """Qlib's prioritize: set the priority of tasks; the waiting ones are re-published
    at that priority so the workers take them first."""
    from ..manage import TaskManager, to_object_id

    settings = _settings(ctx)
    checks.check_all(settings, tracking=False)
    if not task_ids and not batch:
        raise ConfigError("give task ids or --batch BATCH_ID")
    if batch:
        pools, q = _query(settings, pool, batch)
    else:
        pools = _pools(settings, pool)
        if len(pools) != 1:
            raise ConfigError(f"--pool is needed: the database has {len(pools)} task pools ({', '.join(pools)})")
        q = {"_id": {"$in": [to_object_id(i) for i in task_ids or ()]}}  # (given, checked above)
    tm = TaskManager.open(pools[0], settings)
    if task_ids:
        for i in task_ids:
            tm.prioritize(i, priority)  # TaskNotFoundError names a wrong id
        n = len(task_ids)
        waiting = [d["_id"] for d in tm.task_pool.find({**q, "status": {"$in": list(st.CLAIMABLE)}}, {"_id": 1})]
    else:
        # the batch's next messages go out at its new priority; only those already on the
        # broker (its window) are sent again, not the whole batch
        from .. import batch as batches
        from ..lease import RESEND

        tm.db[batches.COLLECTION].update_one({"_id": to_object_id(batch)}, {"$set": {"priority": priority}})
        n = tm.task_pool.update_many(q, {"$set": {"priority": priority}}).matched_count
        sent = {**q, "status": {"$in": list(st.CLAIMABLE)}, "published_at": {"$gt": RESEND}}
        waiting = [d["_id"] for d in tm.task_pool.find(sent, {"_id": 1})]
    _publish(settings, pools[0], waiting, priority=priority)
    out.print(f"{n} task(s) of pool {pools[0]!r} at priority {priority}; {len(waiting)} waiting re-published", markup=False)


@app.command(rich_help_panel=PANEL_ADMIN)
def remove(
    ctx: typer.Context,
    pool: str | None = typer.Option(None, "--pool", "-p", help="Task pool."),
    batch: str | None = typer.Option(None, "--batch", "-b", help="The tasks of this batch (and the batch)."),
    status_: str | None = typer.Option(None, "--status", "-s", help="Only tasks in this status."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Qlib's remove: delete tasks (and their stored results). Without --batch or
    --status, the whole pool and its batches."""
    from .. import batch as batches
    from .. import counts, dispatch, registry
    from ..manage import TaskManager, to_object_id
    from ..store import database

    settings = _settings(ctx)
    checks.check_mongo(settings)
    if not pool and not batch:
        raise ConfigError("give --pool POOL or --batch BATCH_ID")
    pools, q = _query(settings, pool, batch)
    if status_:
        q["status"] = st.check(status_)
    tm = TaskManager.open(pools[0], settings)
    n = sum(tm.task_stat(q).values())
    what = f"{n} task(s) of pool {pools[0]!r}" + (f" in batch {batch}" if batch else "") + (f" with status {status_}" if status_ else "")
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"would remove {what}: pass --yes to confirm")
        typer.confirm(f"remove {what}?", abort=True)
    removed = tm.remove(q)
    db = database(settings)
    if batch:
        db[batches.COLLECTION].delete_one({"_id": to_object_id(batch)})
        dispatch.drop_chunks(db, to_object_id(batch))
        counts.forget(db, [to_object_id(batch)])
    elif not status_:  # the whole pool: its batches (and their queues) and the collection go too
        gone = [b["_id"] for b in db[batches.COLLECTION].find({"pool": pools[0]}, {"_id": 1})]
        for b_id in gone:
            dispatch.drop_chunks(db, b_id)
        counts.forget(db, gone)
        db[batches.COLLECTION].delete_many({"pool": pools[0]})
        tm.task_pool.drop()
        registry.forget(db, pools[0])
    out.print(f"removed {removed} task(s)", markup=False)


@app.command(rich_help_panel=PANEL_ADMIN)
def pools(ctx: typer.Context) -> None:
    """The task pools of the database with their counts by status."""
    from ..manage import TaskManager

    settings = _settings(ctx)
    checks.check_mongo(settings)
    names = TaskManager.list(settings)
    if not names:
        out.print(f"no task pools in database {settings.mongo_db!r} at {settings.masked()['mongo_url']}", markup=False)
        return
    out.print(render.pools_table((p, TaskManager.open(p, settings).task_stat()) for p in names))


@app.command(rich_help_panel=PANEL_ADMIN)
def adopt(ctx: typer.Context, pool: str = typer.Argument(..., help="The collection Qlib's TaskManager filled.")) -> None:
    """Take a task pool that Qlib's TaskManager filled into qcelery: its tasks get qcelery's
    fields (dedup hash, attempts), Qlib's fields stay, Qlib can still read it. Run it once;
    afterwards workers serve it and `enqueue` deduplicates against it."""
    from ..manage import TaskManager

    settings = _settings(ctx)
    checks.check_mongo(settings)
    tm, n = TaskManager.adopt(pool, settings)
    if n:
        out.print(f"pool {pool!r} adopted: {n} task(s); {tm.task_stat()}", markup=False)
    else:
        out.print(f"pool {pool!r} is already a qcelery task pool; nothing to do", markup=False)
