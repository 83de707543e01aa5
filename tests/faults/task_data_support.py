"""A task function of the user's own (outside qcelery), for tests/faults/test_task_data.py.

Workers import it as ``tests.faults.task_data_support`` (the worker's path holds the
repository root), once the test has added that module to ``allowed_modules``.
"""

from __future__ import annotations

import threading
from typing import Any

from qcelery.probes import counted
from qcelery.settings import Settings


class RaisesWhenPickled:
    """A result whose own pickling code raises, as a half-closed resource's might."""

    def __reduce__(self) -> Any:
        raise RuntimeError("this result refuses to be pickled")


def run(task_def: dict, settings: Settings, tags: dict | None = None) -> Any:
    """``qcelery.probes.counted`` (each start and completion recorded in Mongo), then the
    result ``task_def['result']`` asks for: ``"lock"`` (cannot be pickled), ``"raises"``
    (its pickling raises) or the probe's own."""
    out = counted(task_def, settings, tags)
    kind = task_def.get("result")
    if kind == "lock":
        return {"key": task_def["key"], "lock": threading.Lock()}
    if kind == "raises":
        return RaisesWhenPickled()
    return out
