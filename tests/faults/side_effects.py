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
#: the settings a batch of it needs: the task function, and the allow-list naming it
FILE_COUNTED = {"task_func": TASK_FUNC, "allowed_modules": ["tests.faults.side_effects:file_counted"]}


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
    """Record a start, sleep ``task_def['sleep']`` seconds (``task_def['first_sleep']``
    instead on the key's first run), record a completion."""
    key = str(task_def["key"])
    first = file_runs(settings)["start"][key] == 0
    _record(settings, "start", key)
    time.sleep(float(task_def.get("first_sleep" if first and "first_sleep" in task_def else "sleep", 0)))
    _record(settings, "done", key)
    return {"key": key}


def _events(settings: Settings) -> list[tuple[str, str]]:
    path = runs_file(settings)
    if not path.exists():
        return []
    return [(event, key) for event, key, _ in (line.split(" ") for line in path.read_text().splitlines())]


def file_runs(settings: Settings) -> dict[str, Counter]:
    """Per event (``start``/``done``), how many times each key ran."""
    out: dict[str, Counter] = {"start": Counter(), "done": Counter()}
    for event, key in _events(settings):
        out[event][key] += 1
    return out


def start_order(settings: Settings) -> list[str]:
    """The keys in the order their runs started (exact for one worker process)."""
    return [key for event, key in _events(settings) if event == "start"]
