"""Everything ``qcelery up`` (and ``qcelery demo``) starts, and how it is stopped.

The embedded servers stand in for whatever is not configured: SecantusDB unless
``mongo_url`` is set, redis-server unless ``broker_url`` is set, and a local MLflow
store under the run directory unless ``MLFLOW_TRACKING_URI`` is set. Then N workers of
one pool, beat, and optionally Flower. With ``listen`` (``qcelery up --listen ADDR``) the
embedded servers and Flower bind ADDR for other hosts, each behind a password (see
``qcelery.embedded``), and ``join.toml`` in the run directory holds the URLs that workers
and producers elsewhere use (``QCELERY_CONFIG=join.toml``). Each process runs in its own session and is
recorded in ``state.json`` as soon as it starts. Workers and beat run under
``qcelery.supervise``, which restarts one that dies (with a growing pause); what is
recorded is the supervisor, whose process group holds the worker, so ``down`` stops both.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..cluster import Cluster, Proc
from ..embedded import EmbeddedMlflow, EmbeddedMongo, EmbeddedRedis, free_port, port_open
from ..errors import ConfigError, EmbeddedServerError
from ..settings import Settings, mask_url
from . import checks
from .rundir import RunState, now_iso, stop_groups

logger = logging.getLogger(__name__)

DEFAULT_FLOWER_PORT = 5555


@dataclass
class StackOptions:
    workers: int = 2
    pool: str | None = None  # worker pool (queue); default settings.default_queue
    concurrency: int | None = 1
    autoscale: str | None = None
    beat: bool = True
    flower: bool = False
    flower_port: int | None = None
    flower_address: str = "127.0.0.1"
    flower_no_auth: bool = False
    ready_timeout: float = 90.0
    #: start the embedded servers even where settings name real ones (``qcelery demo``)
    embedded_only: bool = False
    #: the address the embedded servers (and Flower) bind for other hosts, with passwords;
    #: ``None``: 127.0.0.1
    listen: str | None = None


@dataclass
class Stack:
    """The processes of one run directory."""

    base: Settings
    options: StackOptions = field(default_factory=StackOptions)
    mongo: EmbeddedMongo | None = None
    redis: EmbeddedRedis | None = None
    mlflow: EmbeddedMlflow | None = None
    cluster: Cluster | None = None
    settings: Settings | None = None  # the live settings, once started
    flower_url: str | None = None
    state: RunState | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.base.run_dir).resolve()

    def claim_run_dir(self) -> None:
        """Refuse a run directory where an earlier ``up`` still runs; forget a dead one."""
        old = RunState.load(self.run_dir)
        if old is None:
            return
        alive = old.alive()
        if alive:
            names = ", ".join(f"{p.name} (pid {p.pid})" for p in alive)
            raise ConfigError(f"qcelery is already up in {self.run_dir}: {names}; run `qcelery down` first")
        old.clear()

    def start(self, step: Callable[[str], None] = lambda _msg: None) -> Settings:
        """Start everything; on any error (or Ctrl-C) stop what was started and re-raise."""
        self.claim_run_dir()
        self.state = RunState(self.run_dir, started_at=now_iso(), up_pid=os.getpid())
        try:
            self._start(step)
        except BaseException:
            self.stop()
            raise
        if self.settings is None:  # _start sets it
            raise RuntimeError("Stack._start returned without settings")
        return self.settings

    def _start(self, step: Callable[[str], None]) -> None:
        opts, base, state = self.options, self.base, self.state
        if state is None:  # start() sets it
            raise RuntimeError("Stack._start runs from Stack.start() only")
        update: dict = {"run_dir": self.run_dir}
        configured = set() if opts.embedded_only else base.model_fields_set
        host = opts.listen or "127.0.0.1"
        auth = opts.listen is not None  # reachable from other hosts: every server asks for a password
        if "mlflow_tracking_uri" not in configured:
            # first: it takes longest to come up, and boots while the rest starts
            step("starting embedded MLflow tracking server")
            self.mlflow = EmbeddedMlflow(self.run_dir, host=host, auth=auth).launch()
            state.add("mlflow", self.mlflow.pid, "server", self.mlflow.log_path, mask_url(self.mlflow.url))
            update["mlflow_tracking_uri"] = self.mlflow.url
        if "mongo_url" in configured:
            step(f"MongoDB {mask_url(base.mongo_url)} (configured)")
            checks.check_mongo(base)
        else:
            step("starting embedded SecantusDB")
            self.mongo = EmbeddedMongo(self.run_dir, host=host, auth=auth).start(timeout=60)
            state.add("secantusdb", self.mongo.pid, "server", self.mongo.log_path, mask_url(self.mongo.url))
            update["mongo_url"] = self.mongo.url
        if "broker_url" in configured:
            step(f"broker {mask_url(base.broker_url)} (configured)")
            checks.check_broker(base)
        else:
            step("starting embedded redis-server")
            self.redis = EmbeddedRedis(self.run_dir, host=host).start()
            state.add("redis", self.redis.pid, "server", self.redis.log_path, mask_url(self.redis.url))
            update["broker_url"] = self.redis.url
            if "result_backend" not in configured:
                update["result_backend"] = None
        settings = base.model_copy(update=update)
        settings = settings.model_copy(update={"mlflow_tracking_uri": settings.effective_tracking_uri})
        if self.mlflow is None:
            checks.check_tracking(settings)
        self.settings = settings
        state.urls = {
            "mongo": mask_url(settings.mongo_url),
            "broker": mask_url(settings.broker_url),
            "mlflow": mask_url(settings.mlflow_tracking_uri),
        }
        state.write_config(settings)
        if opts.listen is not None:
            state.write_join(settings)
        state.save()

        # workers and beat restart when they die (qcelery.supervise); `down` stops both
        self.cluster = Cluster(settings, supervised=True)
        pool = opts.pool or settings.default_queue
        for _ in range(opts.workers):
            p = self.cluster.start_worker(pool, concurrency=None if opts.autoscale else opts.concurrency, autoscale=opts.autoscale)
            self._record(p, f"{p.name}@{socket.gethostname()}")
        if opts.beat:
            self._record(self.cluster.start_beat(), "celery beat, qcelery.beat:LockedScheduler")
        if opts.flower:
            self._start_flower()
        if opts.workers:
            step(f"waiting for {opts.workers} worker(s) of pool {pool!r}")
            from ..celery_app import app_for

            self.cluster.wait_ready(app_for(settings), opts.workers, timeout=opts.ready_timeout)
        if opts.flower:
            self._wait_flower()
        if self.mlflow is not None:
            step("waiting for the MLflow tracking server")
            self.mlflow.wait_ready(timeout=opts.ready_timeout + 120)

    def _record(self, proc: Proc, detail: str) -> None:
        if self.state is None:  # start() sets it before anything runs
            raise RuntimeError(f"Stack: {proc.name} started outside Stack.start()")
        self.state.add(proc.name, proc.pid, "service", proc.log, detail)

    def _start_flower(self) -> None:
        opts = self.options
        host = "127.0.0.1" if opts.flower_address in ("", "0.0.0.0") else opts.flower_address
        port = opts.flower_port
        if port is None:
            port = DEFAULT_FLOWER_PORT if not port_open(host, DEFAULT_FLOWER_PORT) else free_port()
        elif port_open(host, port):
            raise ConfigError(f"port {port} for Flower is in use: pick another with --flower-port")
        argv = [sys.executable, "-m", "qcelery.cli.main", "flower", "--port", str(port), "--address", opts.flower_address]
        if opts.flower_no_auth:
            argv.append("--no-auth")
        if self.cluster is None:  # _start makes it before Flower
            raise RuntimeError("Stack: Flower started outside Stack.start()")
        proc = self.cluster._spawn("flower", argv)  # same env and log directory as workers and beat
        self.flower_url = f"http://{host}:{port}/"
        self._flower = (proc, host, port)
        self._record(proc, self.flower_url)

    def _wait_flower(self, timeout: float = 60.0) -> None:
        proc, host, port = self._flower
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                tail = proc.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                raise EmbeddedServerError(f"flower exited with code {proc.popen.returncode}: {tail[0]} (log {proc.log})")
            if port_open(host, port):
                return
            time.sleep(0.1)
        raise EmbeddedServerError(f"flower did not answer on {host}:{port} within {timeout:.0f}s; log {proc.log}")

    def detach(self) -> None:
        """Leave everything running after this process exits (``qcelery up``)."""
        for server in (self.mongo, self.redis, self.mlflow):
            if server is not None:
                server.detach()
        self.cluster = None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop workers, beat and Flower (warm shutdown first), then the servers."""
        if self.cluster is not None:
            self.cluster.stop(timeout)
            self.cluster = None
        for server in (self.redis, self.mongo, self.mlflow):
            if server is not None:
                server.stop()
        if self.state is not None:
            # anything recorded but not stopped above (e.g. started by an interrupted call)
            stop_groups(self.state.processes, timeout=5)
            self.state.clear()
