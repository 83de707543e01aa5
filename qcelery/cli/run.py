"""``qcelery worker`` / ``beat`` / ``flower``: one long-running process each, in the
foreground (what a systemd unit, a container or ``qcelery up`` runs)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import ConfigError
from . import checks
from .state import CliState, err

app = typer.Typer()
PANEL = "Processes"


def parse_autoscale(value: str | None) -> tuple[int, int] | None:
    """``MAX,MIN`` as a pair (``None`` stays ``None``); :class:`ConfigError` otherwise."""
    if value is None:
        return None
    parts = value.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) < int(parts[1]):
        raise ConfigError(f"--autoscale takes MAX,MIN with MAX >= MIN (e.g. 4,1), got {value!r}")
    return int(parts[0]), int(parts[1])


@app.command(rich_help_panel=PANEL)
def worker(
    ctx: typer.Context,
    pool: str = typer.Option("cpu", "--pool", "-p", help="Worker pool: the queue served (cpu, gpu or any name)."),
    autoscale: str | None = typer.Option(None, "--autoscale", help="MAX,MIN task processes, grown with the queue."),
    concurrency: int | None = typer.Option(None, "--concurrency", "-c", min=1, help="Fixed number of task processes."),
    time_limit: float | None = typer.Option(None, "--time-limit", help="Hard limit per task, seconds (the lease recovers it)."),
    soft_time_limit: float | None = typer.Option(None, "--soft-time-limit", help="Soft limit per task, seconds."),
    hostname: str | None = typer.Option(None, "--hostname", "-n", help="Worker name, e.g. cpu-1@%h."),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l", help="Celery log level."),
) -> None:
    """Run a worker of pool `--pool` here until stopped. It serves the pool's queue and
    the control queue (aggregations, beat jobs). Defaults per pool: workers/pools.py.

    SIGTERM: warm shutdown (the running task finishes and commits). A second signal,
    or a kill: the task's lease expires and beat hands it to another worker."""
    from workers.pools import spec_for, worker_argv

    from ..celery_app import make_app

    settings = ctx.obj.settings()
    if autoscale is not None and concurrency is not None:
        raise ConfigError("give either --autoscale or --concurrency, not both")
    checks.check_all(settings)
    spec = spec_for(
        pool, concurrency=concurrency, autoscale=parse_autoscale(autoscale), time_limit=time_limit, soft_time_limit=soft_time_limit
    )
    make_app(settings).worker_main(worker_argv(spec, loglevel, hostname))


@app.command(rich_help_panel=PANEL)
def beat(
    ctx: typer.Context,
    schedule: Path | None = typer.Option(None, "--schedule", "-s", help="Beat's schedule file. Default: <run_dir>/celerybeat-schedule"),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l", help="Celery log level."),
) -> None:
    """Run celery beat here: it recovers expired leases, re-publishes lost messages
    and re-checks stalled batches every few seconds (QCELERY_RECOVER_INTERVAL,
    QCELERY_SWEEP_INTERVAL). Start one per cluster; a second one stays idle (a Mongo
    lock) and takes over when the first stops."""
    from ..celery_app import make_app

    settings = ctx.obj.settings()
    checks.check_all(settings, tracking=False)
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    app_ = make_app(settings)
    app_.start(["beat", "--loglevel", loglevel, "-s", str(schedule or run_dir / "celerybeat-schedule"), "--max-interval", "1"])


@app.command(rich_help_panel=PANEL)
def flower(
    ctx: typer.Context,
    port: int = typer.Option(5555, "--port", help="Port to serve on."),
    address: str = typer.Option("127.0.0.1", "--address", help="Address to bind (0.0.0.0: every interface)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="No authentication; allowed on a loopback address only."),
    broker_api: str | None = typer.Option(
        None, "--broker-api", envvar="FLOWER_BROKER_API", help="RabbitMQ management API URL (queue lengths)."
    ),
) -> None:
    """Run Flower (the Celery dashboard, with /metrics for Prometheus) here.

    Basic auth comes from FLOWER_BASIC_AUTH=user:password; without it Flower is
    refused, unless --no-auth is given and the address is loopback."""
    from .. import flower as flower_mod

    state: CliState = ctx.obj
    auth = flower_mod.basic_auth_from_env(no_auth=no_auth, address=address)
    settings = state.settings()
    checks.check_broker(settings)
    err.print(f"flower on http://{address}:{port}/ ({'basic auth' if auth else 'no authentication'})")
    flower_mod.run(settings, port=port, address=address, auth=auth, broker_api=broker_api)
