"""``qcelery up`` / ``qcelery down``: the servers, workers, beat and Flower of a run directory."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..errors import ConfigError
from ..settings import Settings, mask_url
from .rundir import RunState, stop_groups
from .state import CliState, err, out

if TYPE_CHECKING:
    from .stack import Stack

app = typer.Typer()
PANEL = "Servers"


def _interrupt_on_sigterm() -> None:
    """SIGTERM behaves as Ctrl-C, so the clean-up in ``finally`` runs."""

    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def print_stack(stack: Stack, settings: Settings, *, detached: bool) -> None:
    state = stack.state
    if state is None:  # Stack.start() sets it
        raise RuntimeError("print_stack needs a started stack")
    out.print(f"qcelery is up in {stack.run_dir}")
    rows = [
        ("mongo", mask_url(settings.mongo_url), "embedded SecantusDB" if stack.mongo else "configured"),
        ("broker", mask_url(settings.broker_url), "embedded redis-server" if stack.redis else "configured"),
        (
            "mlflow",
            mask_url(settings.mlflow_tracking_uri),
            "embedded tracking server"
            if stack.mlflow
            else "local store"
            if str(settings.mlflow_tracking_uri).startswith(("file:", "sqlite:"))
            else "configured",
        ),
    ]
    for rec in state.processes:
        if rec.kind == "service":
            rows.append((rec.name, rec.detail, f"pid {rec.pid}, log {rec.log}"))
    width = max(len(r[0]) for r in rows)
    for name, what, how in rows:
        out.print(f"  {name:<{width}}  {what}  ({how})", markup=False)
    if stack.options.listen is not None:
        out.print(f"other hosts join with: QCELERY_CONFIG=join.toml qcelery worker (join.toml: a 0600 copy of {state.join_path})")
    if detached:
        out.print(f"settings for the other commands: {state.config_path}")
        out.print("stop everything with: qcelery down")


@app.command(rich_help_panel=PANEL)
def up(
    ctx: typer.Context,
    workers: int = typer.Option(2, "--workers", "-w", min=0, help="Worker processes to start."),
    pool: str | None = typer.Option(None, "--pool", help="Worker pool (queue) they serve. Default: settings.default_queue (cpu)."),
    concurrency: int = typer.Option(1, "--concurrency", "-c", min=1, help="Task processes per worker."),
    autoscale: str | None = typer.Option(None, "--autoscale", help="MAX,MIN processes per worker (instead of --concurrency)."),
    beat: bool = typer.Option(True, "--beat/--no-beat", help="Start celery beat (lease recovery, sweeps)."),
    flower: bool = typer.Option(False, "--flower", help="Start Flower too (basic auth from FLOWER_BASIC_AUTH=user:password)."),
    flower_port: int | None = typer.Option(None, "--flower-port", help="Default 5555, or a free port if 5555 is taken."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Flower without authentication (localhost only)."),
    listen: str | None = typer.Option(
        None,
        "--listen",
        help=(
            "Address the embedded servers (and Flower) bind for workers and producers on other hosts, each with a password "
            "(SecantusDB --auth --sync-on-commit, redis requirepass, MLflow basic-auth); writes <run_dir>/join.toml for them."
        ),
    ),
    foreground: bool = typer.Option(False, "--foreground", help="Stay attached; Ctrl-C or SIGTERM stops everything."),
) -> None:
    """Start the embedded SecantusDB and redis-server (unless QCELERY_MONGO_URL /
    QCELERY_BROKER_URL name real servers), a local MLflow store (unless
    MLFLOW_TRACKING_URI is set), N workers and beat, then return.

    Their data, logs and state live in the run directory; the servers' URLs are
    written to `<run_dir>/qcelery.toml`, which the other commands read, so
    `qcelery enqueue ...` just works afterwards. `qcelery down` stops all of it.

    `--listen ADDR`: the embedded servers (and Flower) bind ADDR for other hosts, each
    asking for a password, and `<run_dir>/join.toml` holds their URLs (with passwords)
    for workers and producers there: `QCELERY_CONFIG=join.toml qcelery worker`."""
    from .run import parse_autoscale
    from .stack import Stack, StackOptions

    state: CliState = ctx.obj
    parse_autoscale(autoscale)  # refuse a malformed value before starting anything
    base = state.settings(use_run_config=False)
    stack = Stack(
        base,
        StackOptions(
            workers=workers,
            pool=pool,
            concurrency=concurrency,
            autoscale=autoscale,
            beat=beat,
            flower=flower,
            flower_port=flower_port,
            flower_no_auth=no_auth,
            flower_address=listen or "127.0.0.1",
            listen=listen,
        ),
    )
    if listen is not None:
        _check_listen(listen)
    if flower:
        from ..flower import basic_auth_from_env

        basic_auth_from_env(no_auth=no_auth, address=stack.options.flower_address)  # refuse now, before starting
    _interrupt_on_sigterm()
    settings = stack.start(step=lambda msg: err.print(f"[dim]{msg}[/dim]"))
    if not foreground:
        stack.detach()
        print_stack(stack, settings, detached=True)
        return
    print_stack(stack, settings, detached=False)
    out.print("running in the foreground; Ctrl-C stops everything")
    try:
        while stack.state is not None and stack.state.path.exists():  # `qcelery down` from another shell removes it
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        err.print("stopping ...")
        stack.stop()
        out.print("qcelery is down")


@app.command(rich_help_panel=PANEL)
def down(
    ctx: typer.Context,
    timeout: float = typer.Option(20.0, "--timeout", help="Seconds a worker gets to finish its task before it is killed."),
) -> None:
    """Stop everything `qcelery up` started in the run directory (workers first, with
    a warm shutdown, then beat, Flower and the servers), also after `up` crashed."""
    state: CliState = ctx.obj
    run_dir = _run_dir(state)
    rs = RunState.load(run_dir)
    if rs is None:
        raise ConfigError(f"nothing is up in {run_dir} (no {run_dir / 'state.json'}); start it with `qcelery up`")
    services = [p for p in rs.processes if p.kind != "server"]
    servers = [p for p in rs.processes if p.kind == "server"]
    alive = rs.alive()
    stopped, killed = stop_groups(services, timeout)
    s2, k2 = stop_groups(servers, 10.0)
    rs.clear()
    if not alive:
        out.print(f"nothing was running in {run_dir}; cleaned the state of a crashed `qcelery up`")
        return
    gone = len(rs.processes) - len(alive)
    msg = f"qcelery is down: stopped {stopped + s2} process group(s)"
    if killed + k2:
        msg += f", {killed + k2} of them with SIGKILL after {timeout:g}s"
    if gone:
        msg += f"; {gone} had already exited"
    out.print(msg)


def _check_listen(address: str) -> None:
    """Refuse an address this host cannot bind, before anything starts."""
    import socket

    if address in ("", "0.0.0.0"):
        raise ConfigError(
            f"--listen {address!r}: give the address other hosts reach this one at (join.toml names it), e.g. from `ip -4 addr`"
        )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
    except (OSError, UnicodeError) as exc:
        raise ConfigError(
            f"--listen {address!r}: not an IPv4 address of this host ({exc}); give one of its addresses, e.g. from `ip -4 addr`"
        ) from None


def _run_dir(state: CliState) -> Path:
    """The run directory without requiring the servers' settings to be valid."""
    if state.run_dir:
        return Path(state.run_dir).resolve()
    return Path(state.settings(use_run_config=False).run_dir).resolve()
