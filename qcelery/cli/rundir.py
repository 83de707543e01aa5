"""What ``qcelery up`` leaves in its run directory, and how ``down`` finds it again.

``<run_dir>/qcelery.toml`` holds the live URLs (Mongo, broker, MLflow) so that every
other command finds the servers; after ``qcelery up --listen ADDR``, ``<run_dir>/join.toml``
holds the same URLs (passwords included, 0600) without this host's run directory, for
workers and producers on other hosts (``QCELERY_CONFIG=join.toml``); ``<run_dir>/state.json`` lists each process that
``up`` started: its pid (which is also its process group: every process is started
in its own session) and its start time, so a pid reused by an unrelated program after
a reboot or a crash is never signalled. The state is written after each start, so a
``qcelery up`` killed half-way still leaves ``down`` everything it needs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..settings import Settings

CONFIG_FILE = "qcelery.toml"
JOIN_FILE = "join.toml"
STATE_FILE = "state.json"
#: settings ``up`` writes for the other commands: where the live servers are
LIVE_KEYS = ("run_dir", "mongo_url", "mongo_db", "broker_url", "result_backend", "mlflow_tracking_uri")

_PROC = Path("/proc")


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, process group, start time in clock ticks) of ``pid``, ``None`` if gone."""
    if not _PROC.is_dir():  # not Linux: no start times, only "does it exist"
        try:
            os.kill(pid, 0)
            return ("R", os.getpgid(pid), -1)
        except (ProcessLookupError, PermissionError):
            return None
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces
    return fields[0], int(fields[2]), int(fields[19])


def start_ticks(pid: int) -> int | None:
    info = _proc_stat(pid)
    return info[2] if info else None


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    if not _PROC.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    out = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        info = _proc_stat(int(entry.name))
        if info and info[1] == pgid and info[0] not in ("Z", "X"):
            out.append(int(entry.name))
    return out


@dataclass
class ProcessRecord:
    """One process ``up`` started (its pid is also its process group id)."""

    name: str
    pid: int
    start_ticks: int | None
    kind: str  # "server" (stopped last) or "service" (workers, beat, flower)
    log: str | None = None
    detail: str = ""

    def alive(self) -> bool:
        """Whether the group still holds our processes (and not a stranger that got the pid)."""
        info = _proc_stat(self.pid)
        if info is not None and info[0] not in ("Z", "X"):
            return self.start_ticks is None or info[2] == self.start_ticks or info[2] == -1
        # leader gone: a pid in use as a process group is never handed out again, so
        # members left in the group are the leader's children, i.e. ours
        return bool(group_members(self.pid))


@dataclass
class RunState:
    """The ``state.json`` of a run directory."""

    run_dir: Path
    processes: list[ProcessRecord] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)  # masked, for display
    up_pid: int | None = None
    started_at: str = ""

    @property
    def path(self) -> Path:
        return self.run_dir / STATE_FILE

    @property
    def config_path(self) -> Path:
        return self.run_dir / CONFIG_FILE

    @classmethod
    def load(cls, run_dir: Path) -> RunState | None:
        path = Path(run_dir) / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # a state file cut short by a crash: nothing in it can be trusted, start clean
            return cls(Path(run_dir))
        return cls(
            run_dir=Path(run_dir),
            processes=[ProcessRecord(**p) for p in data.get("processes", [])],
            urls=data.get("urls", {}),
            up_pid=data.get("up_pid"),
            started_at=data.get("started_at", ""),
        )

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "run_dir": str(self.run_dir),
            "up_pid": self.up_pid,
            "started_at": self.started_at,
            "urls": self.urls,
            "processes": [asdict(p) for p in self.processes],
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)  # atomic: a crash never leaves half a file

    def add(self, name: str, pid: int, kind: str, log: Path | str | None = None, detail: str = "") -> ProcessRecord:
        rec = ProcessRecord(name, pid, start_ticks(pid), kind, str(log) if log else None, detail)
        self.processes.append(rec)
        self.save()
        return rec

    def alive(self) -> list[ProcessRecord]:
        return [p for p in self.processes if p.alive()]

    @property
    def join_path(self) -> Path:
        return self.run_dir / JOIN_FILE

    def write_config(self, settings: Settings) -> Path:
        """Write the live settings to ``qcelery.toml`` (readable by the owner only: it may
        hold the passwords of external servers)."""
        header = "# written by `qcelery up`; removed by `qcelery down`\n"
        return self._write_settings(self.config_path, settings, LIVE_KEYS, header)

    def write_join(self, settings: Settings) -> Path:
        """Write ``join.toml``: the servers' URLs with their passwords (0600), for the
        operator to copy to the other hosts. Without ``run_dir``: each host keeps its own."""
        header = (
            f"# written by `qcelery up --listen` in {self.run_dir}; removed by `qcelery down`.\n"
            "# Holds passwords: copy it to the other hosts readable by their owner only (chmod 600) and\n"
            "# run there with QCELERY_CONFIG=join.toml (qcelery worker, qcelery enqueue, ...).\n"
        )
        return self._write_settings(self.join_path, settings, tuple(k for k in LIVE_KEYS if k != "run_dir"), header)

    def _write_settings(self, path: Path, settings: Settings, keys: tuple[str, ...], header: str) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        values = settings.model_dump(mode="json")
        lines = [header]
        for key in keys:
            if values.get(key) is not None:
                # JSON strings are valid TOML basic strings
                lines.append(f"{key} = {json.dumps(str(values[key]))}\n")
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.writelines(lines)
        os.replace(tmp, path)
        return path

    def clear(self) -> None:
        for path in (self.path, self.config_path, self.join_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def stop_groups(records: Iterable[ProcessRecord], timeout: float) -> tuple[int, int]:
    """SIGTERM the process group of every record still ours, wait up to ``timeout``
    seconds, then SIGKILL what is left. Returns (groups signalled, groups killed)."""
    todo = [r for r in records if r.alive()]
    for r in todo:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(r.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(group_members(r.pid) for r in todo):
        time.sleep(0.1)
    killed = 0
    for r in todo:
        if group_members(r.pid):
            killed += 1
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(r.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(group_members(r.pid) for r in todo):
        time.sleep(0.05)
    return len(todo), killed
