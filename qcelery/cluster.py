"""Start and stop worker and beat processes (``qcelery up``, tests, benchmarks).

Each process runs in its own session with the settings passed as ``QCELERY_*``
environment variables, logs to a file in the run directory, and is stopped with its
whole process group, so no orphan survives a ``down``, an exception or a failed test.
A ``supervised`` cluster (``qcelery up``) starts each worker and beat under
``qcelery.supervise``, which restarts it when it dies; the process group is then the
supervisor's, and stopping it stops both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EmbeddedServerError
from .settings import Settings


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        else:  # children of a dead leader may linger in its group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode

    def children(self) -> list[int]:
        """Pids of the direct children (the prefork pool processes of a worker)."""
        try:
            out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True).stdout
        except FileNotFoundError:
            return []
        return [int(x) for x in out.split()]


@dataclass
class Cluster:
    """Worker and beat processes for one settings object."""

    settings: Settings
    procs: list[Proc] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    #: run every process under this command prefix, e.g. ``ip netns exec NS`` (tests of
    #: hosts made of network namespaces)
    launcher: list[str] = field(default_factory=list)
    #: run workers and beat under a supervisor that restarts them (``qcelery.supervise``)
    supervised: bool = False

    @property
    def log_dir(self) -> Path:
        d = Path(self.settings.run_dir) / "logs"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QCELERY_")}
        env.update(self.settings.to_env())
        env.update(self.extra_env)
        # the project root on the path, so task functions in the checkout import
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
        return env

    def _spawn(self, name: str, argv: list[str], supervised: bool = False) -> Proc:
        log = self.log_dir / f"{name}.log"
        if supervised:
            argv = [sys.executable, "-m", "qcelery.supervise", "--name", name, "--", *argv]
        with open(log, "ab") as fh:  # the child keeps its own descriptor
            p = subprocess.Popen(
                [*self.launcher, *argv],
                env=self._env(),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Proc(name, p, log)
        self.procs.append(proc)
        return proc

    def start_worker(
        self,
        pool: str = "cpu",
        *,
        concurrency: int | None = None,
        autoscale: str | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        name: str | None = None,
        loglevel: str = "INFO",
        max_tasks_per_child: int | None = None,
    ) -> Proc:
        n = sum(1 for p in self.procs if p.name.startswith(f"worker-{pool}"))
        name = name or f"worker-{pool}-{n + 1}"
        argv = [sys.executable, "-m", "workers", pool, "--loglevel", loglevel, "--hostname", f"{name}@%h"]
        if autoscale:
            argv += ["--autoscale", autoscale]
        elif concurrency:
            argv += ["--concurrency", str(concurrency)]
        if time_limit:
            argv += ["--time-limit", str(time_limit)]
        if soft_time_limit:
            argv += ["--soft-time-limit", str(soft_time_limit)]
        if max_tasks_per_child:
            argv += ["--max-tasks-per-child", str(max_tasks_per_child)]
        return self._spawn(name, argv, self.supervised)

    def start_beat(self, name: str | None = None, loglevel: str = "INFO") -> Proc:
        n = sum(1 for p in self.procs if p.name.startswith("beat"))
        name = name or f"beat-{n + 1}"
        schedule = Path(self.settings.run_dir) / f"{name}-schedule"
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "qcelery.worker",
            "beat",
            "--loglevel",
            loglevel,
            "-s",
            str(schedule),
            "--max-interval",
            "1",
        ]
        return self._spawn(name, argv, self.supervised)

    def wait_ready(self, app, n_workers: int | None = None, timeout: float = 60.0) -> list[str]:
        """Wait until ``n_workers`` workers (default: all started) answer a ping."""
        want = n_workers if n_workers is not None else sum(1 for p in self.procs if p.name.startswith("worker"))
        deadline = time.monotonic() + timeout
        replies: list = []
        while time.monotonic() < deadline:
            for p in self.procs:
                if not p.alive():
                    raise EmbeddedServerError(
                        f"{p.name} exited with {p.popen.returncode}; log {p.log}:\n{p.log.read_text(errors='replace')[-3000:]}"
                    )
            replies = app.control.ping(timeout=1.0) or []
            if len(replies) >= want:
                return [next(iter(r)) for r in replies]
        raise EmbeddedServerError(f"only {len(replies)} of {want} workers answered within {timeout:.0f}s; logs in {self.log_dir}")

    def stop(self, timeout: float = 20.0) -> None:
        for p in reversed(self.procs):
            p.stop(timeout)
        self.procs.clear()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
