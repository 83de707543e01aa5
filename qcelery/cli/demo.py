"""``qcelery demo`` (what ``make demo`` runs): a rolling experiment, end to end.

Starts the embedded servers, workers and beat in a demo run directory, enqueues the
workflow, shows the progress, prints the model comparison and where the HTML report
is, and stops everything, whatever happens (Ctrl-C and SIGTERM included). The run
directory keeps the MLflow store, the report and the logs until the next demo.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import typer

from .. import status as st
from ..errors import ConfigError
from . import workflow as wfl
from .rundir import RunState
from .state import CliState, err, out
from .tasks import EXIT_FAILED, follow, print_summary, submit

app = typer.Typer()

DEFAULT_RUN_DIR = Path(".qcelery") / "demo"
MARKER = ".qcelery-demo"


def mlflow_ui_command(run_dir: Path) -> str:
    """The shell command that opens MLflow's UI on the demo's store after the demo: its
    SQLite database and the artifacts the demo's tracking server kept, under ``run_dir``.
    The ``mlflow`` of this interpreter's environment is named when it is not on ``PATH``."""
    import shlex
    import sys

    from ..embedded import EmbeddedMlflow

    exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    store = EmbeddedMlflow(run_dir)
    store_args = f"--backend-store-uri {shlex.quote(store.store_uri)} --artifacts-destination {shlex.quote(str(store.artifacts_dir))}"
    return f"{shlex.quote(exe)} ui {store_args}"


def prepare_run_dir(run_dir: Path) -> None:
    """Start from an empty demo directory; never wipe a directory the demo did not make."""
    state = RunState.load(run_dir)
    if state is not None and state.alive():
        raise ConfigError(f"a demo (or `qcelery up`) is still running in {run_dir}: `qcelery --run-dir {run_dir} down` first")
    if run_dir.exists():
        if not (run_dir / MARKER).exists() and any(run_dir.iterdir()):
            raise ConfigError(f"{run_dir} is not empty and was not made by `qcelery demo`; pick another --run-dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / MARKER).write_text("made by `qcelery demo`; wiped by the next one\n")


@app.command(rich_help_panel="Servers")
def demo(
    ctx: typer.Context,
    config: Path = typer.Option(Path("config/demo.yaml"), "--config", help="Workflow to run."),
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="Worker processes (one task each at a time)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Give up waiting after this many seconds."),
    poll: float = typer.Option(0.5, "--poll", min=0.1, help="Seconds between two progress counts."),
) -> None:
    """Run the demo: embedded SecantusDB + redis-server + an MLflow tracking server,
    N workers and beat; enqueue the workflow (two models x rolling windows on built-in
    synthetic data); show progress; print the model comparison and the HTML report's
    path; stop everything. Uses <run_dir> = .qcelery/demo unless --run-dir is given."""
    from .. import batch as batches
    from ..store import database
    from .stack import Stack, StackOptions

    state: CliState = ctx.obj
    base = state.settings(use_run_config=False)
    run_dir = (Path(state.run_dir) if state.run_dir else DEFAULT_RUN_DIR).resolve()
    settings = base.model_copy(update={"run_dir": run_dir})
    wf = wfl.load(config, settings)  # a bad workflow fails before any server starts
    prepare_run_dir(run_dir)

    stack = Stack(settings, StackOptions(workers=workers, concurrency=1, embedded_only=True))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    t0 = time.monotonic()
    try:
        live = stack.start(step=lambda msg: err.print(f"[dim]{msg}[/dim]"))
        err.print(f"[dim]{workers} worker(s) and beat up in {time.monotonic() - t0:.0f}s; logs in {run_dir / 'logs'}[/dim]")
        sub = submit(wf, live, priority=0)
        done_before = sub.existing.get(st.DONE, 0)
        out.print(
            f"batch {sub.batch_id}: {sub.n_tasks} tasks ({_models_line(wf)}) on {workers} worker(s); "
            f"{sub.n_new} new, {done_before} already done",
            markup=False,
        )
        doc = batches.load(database(live), sub.batch_id)
        stat = follow(live, doc, timeout=timeout, poll=poll)
        doc = batches.load(database(live), sub.batch_id)
        out.print()
        print_summary(doc, live)
        out.print(f"MLflow runs: {mlflow_ui_command(run_dir)}", markup=False)
        out.print(f"run directory (logs, data): {run_dir}", markup=False)
        out.print(f"demo finished in {time.monotonic() - t0:.0f}s", markup=False)
    finally:
        err.print("[dim]stopping workers, beat and servers ...[/dim]")
        stack.stop(timeout=10)
        signal.signal(signal.SIGTERM, previous)
    if stat.get(st.FAILED):
        raise typer.Exit(EXIT_FAILED)


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _models_line(wf: wfl.Workflow) -> str:
    models = sorted({wfl.describe(t)[0] for t in wf.tasks})
    windows = len({wfl.describe(t)[2] for t in wf.tasks})
    return f"{len(models)} model(s) x {windows} rolling window(s)"
