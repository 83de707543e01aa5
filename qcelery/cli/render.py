"""Tables the commands print (rich), built from documents and summaries."""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.table import Table

from .. import status as st

STATUS_COLUMNS = (st.WAITING, st.RUNNING, st.PART_DONE, st.DONE, st.FAILED)
#: the model table's columns in a terminal (the HTML report and `collect --json` have them all)
MODEL_COLUMNS = ("model", "name", "n_tasks", "IC", "ICIR", "Rank IC", "Rank ICIR", "annualized_return", "information_ratio", "max_drawdown")
_STYLE = {st.DONE: "green", st.FAILED: "red", st.RUNNING: "cyan", st.WAITING: "yellow", st.PART_DONE: "blue"}


def error_line(error: str | None) -> str:
    """The line of a stored traceback that says what went wrong (its last one)."""
    lines = [ln.strip() for ln in (error or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def ago(when: _dt.datetime | None, now: _dt.datetime | None = None) -> str:
    if when is None:
        return ""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return duration((now - when).total_seconds())


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    if s < 10:
        return f"{sign}{s:.1f}s"
    if s < 60:
        return f"{sign}{s:.0f}s"
    if s < 3600:
        return f"{sign}{int(s // 60)}m{int(s % 60):02d}s"
    return f"{sign}{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def fmt(value: Any) -> str:
    """A cell: numbers to 4 significant digits, containers as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


def counts_cells(stat: Mapping[str, int]) -> list[str]:
    cells = []
    for s in STATUS_COLUMNS:
        n = stat.get(s, 0)
        cells.append(f"[{_STYLE[s]}]{n}[/]" if n else "0")
    return cells


def batches_table(rows: Iterable[tuple[Mapping[str, Any], Mapping[str, int]]]) -> Table:
    t = Table(title="batches", title_justify="left")
    for col in ("batch", "pool", "queue", "created", "tasks", *STATUS_COLUMNS, "state"):
        t.add_column(col, justify="right" if col in ("tasks", *STATUS_COLUMNS) else "left", no_wrap=True)
    for doc, stat in rows:
        created = ago(doc.get("created_at"))
        t.add_row(
            str(doc["_id"]),
            doc.get("pool", ""),
            doc.get("queue", ""),
            f"{created} ago" if created else "",
            str(doc.get("n_tasks", sum(stat.values()))),
            *counts_cells(stat),
            doc.get("state", ""),
        )
    return t


def pools_table(rows: Iterable[tuple[str, Mapping[str, int]]]) -> Table:
    t = Table(title="task pools", title_justify="left")
    t.add_column("pool", no_wrap=True)
    t.add_column("tasks", justify="right")
    for s in STATUS_COLUMNS:
        t.add_column(s, justify="right")
    for name, stat in rows:
        t.add_row(name, str(sum(stat.values())), *counts_cells(stat))
    return t


def running_table(docs: Iterable[Mapping[str, Any]]) -> Table:
    now = _dt.datetime.now(_dt.timezone.utc)
    t = Table(title="running tasks", title_justify="left")
    for col in ("task", "pool", "worker", "attempt", "running for", "lease left"):
        t.add_column(col, no_wrap=True, min_width=24 if col == "task" else None)
    for d in docs:
        lease = d.get("lease_until")
        if lease is not None and lease.tzinfo is None:
            lease = lease.replace(tzinfo=_dt.timezone.utc)
        left = duration((lease - now).total_seconds()) if lease else ""
        if lease and lease < now:
            left = f"[red]expired {duration((now - lease).total_seconds())} ago[/]"
        t.add_row(
            str(d["_id"]), d.get("_pool", ""), str(d.get("worker") or ""), str(d.get("attempt", "")), ago(d.get("started_at"), now), left
        )
    return t


_WORKER_STYLE = {"online": "green", "lost": "red", "stopped": "dim"}


def workers_table(docs: Iterable[Mapping[str, Any]]) -> Table:
    """The workers seen (``qcelery.presence``): state, queues, pid and when last heard from."""
    now = _dt.datetime.now(_dt.timezone.utc)
    t = Table(title="workers", title_justify="left")
    for col in ("worker", "state", "queues", "pid", "last heard", "started"):
        t.add_column(col, no_wrap=True, justify="right" if col == "pid" else "left")
    for d in docs:
        state = str(d.get("state", ""))
        heard = ago(d.get("last_seen"), now)
        started = ago(d.get("started_at"), now)
        t.add_row(
            str(d["_id"]),
            f"[{_WORKER_STYLE.get(state, 'default')}]{state}[/]",
            ",".join(d.get("queues") or []),
            str(d.get("pid", "")),
            f"{heard} ago" if heard else "",
            f"{started} ago" if started else "",
        )
    return t


def failures_table(docs: Iterable[Mapping[str, Any]]) -> Table:
    docs = list(docs)
    t = Table(title="failed tasks", title_justify="left")
    # ids, pools and attempts stay whole; a long error line is what gets cut
    t.add_column("task", no_wrap=True, min_width=24)
    t.add_column("pool", no_wrap=True, min_width=max([4, *(len(str(d.get("_pool", ""))) for d in docs)]))
    t.add_column("attempts", justify="right", min_width=8)
    t.add_column("error", overflow="ellipsis", no_wrap=True, max_width=110)
    for d in docs:
        t.add_row(
            str(d.get("_id") or d.get("task_id")),
            d.get("_pool", ""),
            str(d.get("attempt", "")),
            error_line(d.get("error")),
        )
    return t


def records_table(title: str, rows: Sequence[Mapping[str, Any]], first: Iterable[str] = ()) -> Table:
    """A table of dicts: columns in first-seen order (``first`` ones leading)."""
    cols: list[str] = [c for c in first if any(c in r for r in rows)]
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    t = Table(title=title, title_justify="left")
    for c in cols:
        numeric = all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows if r.get(c) is not None)
        t.add_column(str(c), justify="right" if numeric else "left", no_wrap=True)
    for r in rows:
        t.add_row(*(fmt(r.get(c)) for c in cols))
    return t


def summary_lines(doc: Mapping[str, Any]) -> tuple[list[str], list[Table]]:
    """Headline lines and tables of a batch's ``summary`` (models, failures)."""
    summary = doc.get("summary") or {}
    counts = summary.get("counts") or {}
    lines = []
    parts = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUS_COLUMNS if counts.get(s))
    lines.append(
        f"batch {doc['_id']} (pool {doc.get('pool')!r}): {summary.get('n_tasks', doc.get('n_tasks'))} tasks, {parts or 'none final'}"
    )
    dur = summary.get("duration_s") or {}
    if dur.get("total") is not None:
        lines.append(
            f"run time: {duration(dur.get('total'))} in all, median {duration(dur.get('median'))} per task, "
            f"longest {duration(dur.get('max'))}"
        )
    tables: list[Table] = []
    models = summary.get("models")
    if models:
        rows = [{k: v for k, v in m.items() if k in MODEL_COLUMNS} for m in models]
        if not any(len(r) > 1 for r in rows):  # a collector with other metrics: show them all
            rows = list(models)
        tables.append(records_table("model comparison", rows, first=MODEL_COLUMNS))
    failures = summary.get("failures") or []
    if failures:
        tables.append(failures_table(failures))
    return lines, tables


def where_lines(summary: Mapping[str, Any], tracking_uri: str | None = None) -> list[str]:
    """Where the summary run, the report and the plots are."""
    lines = []
    if summary.get("summary_run_id"):
        exp = summary.get("experiment_name") or summary.get("experiment")
        lines.append(
            f"summary run: {summary['summary_run_id']}"
            + (f" (experiment {exp!r})" if exp else "")
            + (f" in {tracking_uri}" if tracking_uri else "")
        )
    if summary.get("report_path"):
        lines.append(f"report: {summary['report_path']}")
    plots = summary.get("plots") or summary.get("plot_paths")
    if plots:
        items = plots.values() if isinstance(plots, Mapping) else plots
        lines.append("plots: " + ", ".join(str(p) for p in items))
    if summary.get("aggregate_error"):
        lines.append(f"aggregation failed: {error_line(summary['aggregate_error'])}")
    return lines
