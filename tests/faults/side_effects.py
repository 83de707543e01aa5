"""A task function whose runs are counted in a file, outside every server a fault test
may kill: ``qcelery.probes.counted`` keeps its records in Mongo, so a test that kills
the Mongo server could lose the very records that would show a second run.

Workers import it as ``tests.faults.side_effects.file_counted`` (the project root is on
their path; ``tests`` and ``tests.faults`` are namespace packages).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from qcelery.settings import Settings

TASK_FUNC = "tests.faults.side_effects.file_counted"


def runs_file(settings: Settings) -> Path:
    return Path(settings.run_dir).resolve() / "task_runs.log"


def _record(settings: Settings, event: str, key: str) -> None:
    # one short O_APPEND write per line: lines of concurrent processes never interleave
    path = runs_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{event} {key} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def file_counted(task_def: dict, settings: Settings) -> dict:
    """Record a start, sleep ``task_def['sleep']`` seconds, record a completion."""
    key = str(task_def["key"])
    _record(settings, "start", key)
    time.sleep(float(task_def.get("sleep", 0)))
    _record(settings, "done", key)
    return {"key": key}


def file_runs(settings: Settings) -> dict[str, Counter]:
    """Per event (``start``/``done``), how many times each key ran."""
    out: dict[str, Counter] = {"start": Counter(), "done": Counter()}
    path = runs_file(settings)
    if path.exists():
        for line in path.read_text().splitlines():
            event, key, _ = line.split(" ")
            out[event][key] += 1
    return out
