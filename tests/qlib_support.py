"""Helpers of the Qlib bridge tests: a tiny Qlib provider directory written by the test
(Qlib's binary layout, no download) and a probe task function that reports what Qlib
sees in the worker process. Imported by the tests as ``qlib_support`` and, by module
name, by the workers (the tests put this directory on the workers' ``PYTHONPATH`` and
``qlib_support`` on the allow-list).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qcelery.models import LinearModel

#: the probe task function, as a batch names it
PROBE = "qlib_support.qlib_probe"
INSTRUMENT = "SH600000"


def write_provider(root: Path, days: Iterable[Any], future_days: Iterable[Any] = (), *, close_start: float = 10.0) -> Path:
    """A Qlib provider directory at ``root`` with trading calendar ``days`` (plus
    ``calendars/day_future.txt`` holding ``days`` and ``future_days`` when given) and one
    instrument whose ``$close`` rises by 1 a day from ``close_start``.

    Qlib's layout: ``calendars/day.txt`` (one day a line), ``instruments/all.txt``
    (``code<TAB>start<TAB>end``), ``features/<code lower>/close.day.bin`` (little-endian
    float32: the index of the first value in the calendar, then the values)."""
    cal = [pd.Timestamp(d) for d in days]
    fut = [pd.Timestamp(d) for d in future_days]
    (root / "calendars").mkdir(parents=True)
    (root / "calendars" / "day.txt").write_text("".join(f"{d:%Y-%m-%d}\n" for d in cal))
    if fut:
        (root / "calendars" / "day_future.txt").write_text("".join(f"{d:%Y-%m-%d}\n" for d in [*cal, *fut]))
    (root / "instruments").mkdir()
    (root / "instruments" / "all.txt").write_text(f"{INSTRUMENT}\t{cal[0]:%Y-%m-%d}\t{cal[-1]:%Y-%m-%d}\n")
    features = root / "features" / INSTRUMENT.lower()
    features.mkdir(parents=True)
    close = close_start + np.arange(len(cal), dtype=np.float64)
    np.hstack([[0], close]).astype("<f").tofile(features / "close.day.bin")
    return root


def qlib_probe(task_def: dict, **_: Any) -> dict:
    """What Qlib shows this worker process: its calendar's length, the instrument's last
    close, and how often qcelery initialised Qlib here."""
    from qlib.config import C
    from qlib.data import D

    from qcelery.qlib_bridge import init_count

    features = D.features([INSTRUMENT], ["$close"])
    return {
        "key": task_def.get("key"),
        "pid": os.getpid(),
        "calendar": len(D.calendar()),
        "last_close": float(features["$close"].iloc[-1]),
        "provider": str(C.dpm.get_data_uri("day")),
        "inits": init_count(),
    }


#: the metric a :class:`QlibLoggingModel` logs through Qlib's ``R``
R_METRIC = "qlib_r_probe"


class QlibLoggingModel(LinearModel):
    """qcelery's ridge model whose ``fit`` also logs a metric through Qlib's ``R``, as
    Qlib's models (LightGBM's ``l2.train`` curves) do."""

    def fit(self, dataset: Any, **kwargs: Any) -> Any:
        from qlib.workflow import R

        fitted = super().fit(dataset, **kwargs)
        R.log_metrics(**{R_METRIC: 0.5})
        return fitted


class QlibRecorderProbe:
    """A record that asks Qlib's ``R`` for its recorder, as Qlib's records do, and tags the
    task's run with what it got (so the test sees whether the two are the same run)."""

    def __init__(self, recorder: Any, **_: Any):
        self.recorder = recorder

    def generate(self) -> None:
        from qlib.workflow import R

        qrec = R.get_recorder()
        self.recorder.set_tags(qlib_recorder_id=qrec.id, qlib_experiment_id=str(qrec.experiment_id), qlib_uri=str(qrec.uri))


def r_task(seed: int = 0) -> dict:
    """A small synthetic task trained by :class:`QlibLoggingModel`, recorded by :class:`QlibRecorderProbe`."""
    handler = {
        "class": "SyntheticAlphaHandler",
        "module_path": "qcelery.data",
        "kwargs": {"instruments": 8, "start_time": "2024-01-02", "end_time": "2024-06-28", "seed": seed},
    }
    return {
        "model": {"class": "QlibLoggingModel", "module_path": "qlib_support"},
        "dataset": {
            "class": "DatasetH",
            "module_path": "qcelery.data",
            "kwargs": {"handler": handler, "segments": {"train": ["2024-01-02", "2024-04-30"], "test": ["2024-05-06", "2024-06-28"]}},
        },
        "record": [{"class": "QlibRecorderProbe", "module_path": "qlib_support"}],
    }


def seed_task(task_def: dict, **_: Any) -> dict:
    """A task function that trains nothing: the seed of the task's model, and who ran it
    (the pool tests need tasks served, not models)."""
    return {"seed": task_def["model"]["kwargs"]["seed"], "pid": os.getpid()}


def qlib_pool_task(seed: int) -> dict:
    """A task definition as a Qlib script puts it in Qlib's TaskManager (plain values only:
    Qlib stores it as the queryable ``filter`` too)."""
    return {
        "model": {"class": "LGBModel", "module_path": "qlib.contrib.model.gbdt", "kwargs": {"loss": "mse", "seed": seed}},
        "dataset": {
            "class": "DatasetH",
            "module_path": "qlib.data.dataset",
            "kwargs": {"segments": {"test": ["2023-01-03", "2023-03-31"]}},
        },
    }


class SlowCountingHandler:
    """A handler that appends a line (its pid) to ``count_file`` on every construction, then
    takes as many seconds to build as ``delay_file`` says (read at construction, so a test can
    shorten a build that is not started yet without changing the handler's config)."""

    def __init__(self, count_file: str, delay_file: str):
        with open(count_file, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(float(Path(delay_file).read_text()))
        self.value = 42
