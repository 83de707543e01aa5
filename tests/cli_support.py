"""Helpers of the CLI tests: run ``qcelery`` through its console script, write small
workflow files, and check that processes are gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import yaml

from qcelery.cli.rundir import group_members
from qcelery.settings import Settings

_SCRIPT = Path(sys.executable).parent / "qcelery"
#: the real entry point: the installed console script, else the module
QCELERY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "qcelery.cli.main"]
PROBE = "qcelery.probes.counted"


def cli_env(settings: Settings | None = None, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: no qcelery, Flower or MLflow variables from
    the test process, plus ``settings`` as QCELERY_* variables when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QCELERY_", "FLOWER_", "MLFLOW_"))}
    if settings is not None:
        env.update(settings.to_env())
        env["MLFLOW_TRACKING_URI"] = settings.effective_tracking_uri
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def qcelery(*args: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``qcelery ARGS`` and return the completed process (text output)."""
    return subprocess.run([*QCELERY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def qcelery_many(commands: list[list[str]], *, cwd: Path, env: dict[str, str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Run several ``qcelery`` commands at once (independent ones: saves the start-up time)."""
    procs = [
        subprocess.Popen(
            [*QCELERY, *args], cwd=cwd, env=env, text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for args in commands
    ]
    done = []
    for args, p in zip(commands, procs, strict=True):
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess([*QCELERY, *args], p.returncode, out, err))
    return done


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def probe_workflow(
    path: Path, *, windows: int = 3, sleep: float = 0.0, fail: bool = False, experiment: str = "probes", extra: dict | None = None
) -> Path:
    """A workflow of ``windows`` rolling windows for the ``counted`` probe task. The
    probe ignores model and dataset; they name importable classes so the workflow
    passes the class check like a real one."""
    test_days = 20 * windows
    doc = {
        "experiment_name": experiment,
        "pool": experiment,
        "calendar": "XSHG",
        "task": {
            "model": {"class": "OrderedDict", "module_path": "collections"},
            "dataset": {
                "class": "OrderedDict",
                "module_path": "collections",
                "kwargs": {"segments": {"train": ["2020-01-02", "2020-06-30"], "test": ["2020-07-01", None]}},
            },
            "sleep": sleep,
            "fail": fail,
            **(extra or {}),
        },
        "generators": [{"rolling": {"step": 20}}],
    }
    # an end date that gives exactly `windows` windows of 20 trading days
    from qcelery.calendar import default_calendar

    cal = default_calendar("XSHG")
    days = [d for d in cal.dates if str(d)[:10] >= "2020-07-01"]
    doc["task"]["dataset"]["kwargs"]["segments"]["test"][1] = str(days[test_days - 1])[:10]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the rich tables in ``text``, as lists of cell texts."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in text.splitlines() if line.startswith("│")]


def batch_id_from(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout.strip().splitlines()
    assert out, proc.stderr
    return out[0].split()[-1]


def state_pids(run_dir: Path) -> list[int]:
    data = json.loads((run_dir / "state.json").read_text())
    return [p["pid"] for p in data["processes"]]


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def alive_groups(pids: Iterable[int]) -> list[int]:
    """The process groups among ``pids`` that still have a live (non-zombie) member."""
    return [p for p in pids if group_members(p)]
