"""Task generation: expand task templates into tasks (Qlib's ``qlib.workflow.task.gen``).

A template is a Qlib task config (``model`` / ``dataset`` / ``record``); a
:class:`TaskGen` turns one template into several tasks and :func:`task_generator`
chains generators, each applied to every task the previous one produced.

Same as Qlib: class and argument names, the segments produced (checked case by case
against Qlib 0.9.7 by ``tests/test_gen_conformance.py``), ``handler_mod`` and
``trunc_segments``. Different from Qlib:

* every generator takes ``calendar=`` (a :class:`~qcelery.calendar.TradingCalendar`,
  an exchange code, or ``None`` for :func:`~qcelery.calendar.default_calendar`)
  instead of reading Qlib's global data provider;
* segments may be given as tuples or lists; output segments are tuples of
  ``pd.Timestamp`` as in Qlib;
* generators never mutate the caller's template, even with a shallow
  ``task_copy_func`` (the ``dataset`` -> ``kwargs`` -> ``handler`` path they write
  to is always copied);
* bad input fails before any task is returned, with a :class:`~qcelery.errors.QceleryError`
  naming the key or value, where Qlib fails late or silently. Qlib's exceptions map to:

  ================================  ==============================================
  Qlib raised                       qcelery raises
  ================================  ==============================================
  ``IndexError`` (date after the    :class:`~qcelery.calendar.OutOfCalendarError`
  calendar), ``AssertionError``     (a ``TaskDefinitionError``, ``ValueError``
  (truncation before its start),    and ``KeyError``)
  ``KeyError`` (shift past the end)
  ``KeyError`` (no test segment),   :class:`~qcelery.errors.TaskDefinitionError`
  ``TypeError`` (``None`` where a
  date is needed)
  ``NotImplementedError`` (unknown  :class:`~qcelery.errors.ConfigError` /
  ``rtype``, segment not a pair)    :class:`~qcelery.errors.TaskDefinitionError`
  ================================  ==============================================

Beyond Qlib: :class:`GridGen` (hyper-parameter grids over dotted paths),
:class:`ModelGen` (swap the ``model`` section), :class:`LabelHorizonGen` (a ready
``MultiHorizonGenBase``) and :func:`dry_run` (generate and deduplicate without
enqueueing).
"""

from __future__ import annotations

import abc
import copy
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import pandas as pd

from .calendar import OutOfCalendarError, TimeAdjuster, TradingCalendar, format_day
from .canonical import filter_hash, normalize
from .errors import ConfigError, TaskDefinitionError, TaskTypeError

log = logging.getLogger(__name__)

__all__ = [
    "TaskGen",
    "task_generator",
    "iter_tasks",
    "handler_mod",
    "trunc_segments",
    "RollingGen",
    "MultiHorizonGenBase",
    "LabelHorizonGen",
    "GridGen",
    "ModelGen",
    "dry_run",
    "validate_template",
    "set_path",
]


# -- templates ----------------------------------------------------------------------
def _segments_of(task: Mapping[str, Any]) -> Any:
    try:
        return task["dataset"]["kwargs"]["segments"]
    except (KeyError, TypeError):
        raise TaskDefinitionError(
            "the task template has no dataset.kwargs.segments; a generator needs "
            "{'dataset': {'kwargs': {'segments': {'train': [start, end], ..., 'test': [start, end]}}}}"
        ) from None


def validate_template(task: Any, test_key: str | None = "test") -> None:
    """Check what generators rely on; raise naming the offending key or value.

    ``dataset.kwargs.segments`` must be a mapping holding ``test_key`` (not checked when
    ``test_key`` is None); every segment a ``[start, end]`` pair of dates or ``None``
    (open bound) with start <= end; the test segment needs a start. Qlib checks none of
    this and fails later (or not at all).
    """
    if not isinstance(task, Mapping):
        raise TaskTypeError(f"a task template must be a dict, got {type(task).__name__}")
    segments = _segments_of(task)
    if not isinstance(segments, Mapping):
        raise TaskDefinitionError(f"dataset.kwargs.segments must map names to [start, end], got {type(segments).__name__}")
    if test_key is not None and test_key not in segments:
        raise TaskDefinitionError(
            f"dataset.kwargs.segments has no {test_key!r} segment (keys: {', '.join(map(str, segments)) or 'none'}); "
            f"add it or pass test_key="
        )
    for key, seg in segments.items():
        where = f"dataset.kwargs.segments.{key}"
        if not isinstance(seg, (tuple, list)) or len(seg) != 2:
            raise TaskDefinitionError(f"{where} must be a [start, end] pair, got {seg!r}")
        bounds: list[pd.Timestamp | None] = []
        for bound in seg:
            if bound is None:
                bounds.append(None)
                continue
            try:
                bounds.append(pd.Timestamp(bound))
            except (ValueError, TypeError):
                raise TaskDefinitionError(f"{where}: {bound!r} is not a date") from None
            if isinstance(bound, (bool, int, float)) or pd.isna(bounds[-1]):
                raise TaskDefinitionError(f"{where}: {bound!r} is not a date")
        if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
            raise TaskDefinitionError(f"{where}: start {format_day(seg[0])} is after end {format_day(seg[1])}")
    if test_key is not None and segments[test_key][0] is None:
        raise TaskDefinitionError(f"dataset.kwargs.segments.{test_key} needs a start date, got None")


def _detached_copy(task: Mapping[str, Any], copy_func: Callable[[Any], Any]) -> dict:
    """``copy_func(task)`` whose dataset -> kwargs -> handler -> kwargs path is fresh.

    Generators write segments and the handler's ``end_time`` along that path; copying
    it keeps the template intact whatever ``copy_func`` shares.
    """
    t: dict = copy.copy(copy_func(task))
    dataset = t["dataset"] = copy.copy(t["dataset"])
    kwargs = dataset["kwargs"] = copy.copy(dataset["kwargs"])
    handler = kwargs.get("handler")
    if isinstance(handler, Mapping):
        handler = kwargs["handler"] = copy.copy(handler)
        if isinstance(handler.get("kwargs"), Mapping):
            kwargs["handler"]["kwargs"] = copy.copy(handler["kwargs"])  # (kwargs["handler"] is handler's fresh copy)
    return t


# -- generators -----------------------------------------------------------------------
#: the most tasks one ``task_generator`` call makes unless told otherwise (settings.max_tasks)
DEFAULT_MAX_TASKS = 1_000_000


class TaskGen(metaclass=abc.ABCMeta):
    """Base class of generators: ``generate(template) -> list of tasks`` (as in Qlib)."""

    @abc.abstractmethod
    def generate(self, task: dict) -> list[dict]:
        """Return the tasks generated from one template (the template is left unchanged)."""

    def __call__(self, *args: Any, **kwargs: Any) -> list[dict]:
        return self.generate(*args, **kwargs)

    def count(self, task: dict) -> int:
        """How many tasks :meth:`generate` makes from ``task``; generators whose count
        does not need the tasks (grids, model lists, horizons) answer without building them."""
        return len(self.generate(task))

    def first(self, task: dict) -> dict | None:
        """The first task :meth:`generate` makes from ``task`` (``None`` if none): what the
        next generator sees, for counting."""
        generated = self.generate(task)
        return generated[0] if generated else None


def count_tasks(tasks: dict | Sequence[dict], generators: TaskGen | Sequence[TaskGen]) -> tuple[int, list[int]]:
    """How many tasks :func:`task_generator` would make, without making them: per
    template the product of each generator's count on the first task of the stage
    before (exact when a generator makes the same number from every task it is given,
    as grids, models and horizons do; rolling windows follow the template's segments).
    Returns the total and, for the message, each generator's count on the first template."""
    task_list = [tasks] if isinstance(tasks, Mapping) else list(tasks)
    gens = [generators] if isinstance(generators, TaskGen) else list(generators)
    total, factors = 0, []
    for i, template in enumerate(task_list):
        n, current = 1, dict(template)
        for gen in gens:
            k = gen.count(current)
            if i == 0:
                factors.append(k)
            n *= k
            nxt = gen.first(current) if k else None
            if nxt is None:
                break
            current = nxt
        total += n
    return total, factors


def _check_size(task_list: list, gens: list[TaskGen], max_tasks: int) -> None:
    n, factors = count_tasks(task_list, gens)
    if n > max_tasks:
        shape = " x ".join([f"{len(task_list)} template(s)", *(f"{k:,} ({type(g).__name__})" for g, k in zip(gens, factors, strict=True))])
        raise TaskDefinitionError(
            f"the generators would make {n:,} tasks ({shape}), above the limit of {max_tasks:,}; "
            "nothing was generated. Shrink the grid, or raise the limit (max_tasks / QCELERY_MAX_TASKS) if you mean it"
        )


def _checked(tasks: dict | Sequence[dict], generators: TaskGen | Sequence[TaskGen], max_tasks: int) -> tuple[list, list[TaskGen]]:
    """The templates and generators as lists, type-checked, and the count they would make
    checked against ``max_tasks``: what both ways of generating do before the first task."""
    task_list = [tasks] if isinstance(tasks, Mapping) else list(tasks)
    gens = [generators] if isinstance(generators, TaskGen) else list(generators)
    for i, gen in enumerate(gens):
        if not isinstance(gen, TaskGen):
            raise TaskTypeError(f"generators[{i}] is a {type(gen).__name__}, not a TaskGen")
    for i, task in enumerate(task_list):
        if not isinstance(task, Mapping):
            raise TaskTypeError(f"tasks[{i}] is a {type(task).__name__}, not a task template dict")
    _check_size(task_list, gens, max_tasks)
    return task_list, gens


def task_generator(tasks: dict | Sequence[dict], generators: TaskGen | Sequence[TaskGen], max_tasks: int = DEFAULT_MAX_TASKS) -> list[dict]:
    """Apply ``generators`` in order, each to every task produced so far (as in Qlib).

    With templates ``[a, b]`` and generators ``[A, B]`` yielding 2 and 3 tasks per input,
    the result holds 2 * 2 * 3 = 12 tasks, ordered template by template, then A's
    outputs, then B's. The whole list is built before returning, so bad input raises
    before anything could be enqueued. Unlike Qlib, more than ``max_tasks`` tasks are
    refused before any is built, with the count they would have made.
    """
    task_list, gens = _checked(tasks, generators, max_tasks)
    for gen in gens:
        task_list = [new for task in task_list for new in gen.generate(task)]
    return task_list


def iter_tasks(tasks: dict | Sequence[dict], generators: TaskGen | Sequence[TaskGen], max_tasks: int = DEFAULT_MAX_TASKS) -> Iterator[dict]:
    """:func:`task_generator`'s tasks, in its order, made one at a time: what a producer
    streams into a batch, holding one task (and the generators' state) at once. The same
    checks run before the first task is made."""
    task_list, gens = _checked(tasks, generators, max_tasks)

    def walk(task: dict, level: int) -> Iterator[dict]:
        if level == len(gens):
            yield task
            return
        for new in gens[level].generate(task):
            yield from walk(new, level + 1)

    for task in task_list:
        yield from walk(task, 0)


def handler_mod(task: dict, rolling_gen: RollingGen) -> None:
    """Extend the handler's ``end_time`` to cover the task's test segment (as Qlib does).

    When the test segment ends after ``end_time``, ``end_time`` becomes the test end. A
    handler that is a string (a pickled handler's path), has no ``kwargs`` or an open
    ``end_time`` is left alone, and so is one whose test segment is open-ended: Qlib 0.9.7
    computes the interval to ``None``, catches the ``TypeError`` and keeps the end time the
    task was copied with (a rolling window's copy of the first window).
    """
    handler = task.get("dataset", {}).get("kwargs", {}).get("handler")
    if not isinstance(handler, Mapping) or not isinstance(handler.get("kwargs"), Mapping):
        return
    handler_kwargs = handler["kwargs"]
    test_end = task["dataset"]["kwargs"]["segments"][rolling_gen.test_key][1]
    if test_end is None:
        return
    handler_end = handler_kwargs.get("end_time")
    # Qlib computes the interval on None and swallows the TypeError: an open end stays open
    if handler_end is not None and rolling_gen.ta.cal_interval(handler_end, test_end) < 0:
        handler_kwargs["end_time"] = copy.deepcopy(test_end)


def trunc_segments(ta: TimeAdjuster, segments: dict, days: int, test_key: str = "test") -> None:
    """Cut every non-test segment to end ``days`` trading days before the test start.

    Changes ``segments`` in place (as in Qlib) and avoids leaking the labels of the
    test period into training.
    """
    test_bounds = [t for t in segments[test_key] if t is not None]
    if not test_bounds:
        raise TaskDefinitionError(f"segment {test_key!r} is open on both ends; truncation needs a test start")
    test_start = min(test_bounds)
    for key in list(segments):
        if key != test_key:
            segments[key] = ta.truncate(segments[key], test_start, days)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskTypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{name} must be a positive number of trading days, got {value}")
    return value


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskTypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ConfigError(f"{name} must be >= 0 trading days, got {value}")
    return value


class RollingGen(TaskGen):
    """Rolling windows over the test period (Qlib's ``RollingGen``).

    The first task's test segment is ``step`` trading days from the aligned test start;
    each following task shifts every segment by ``step`` days — the train segment only
    at its end for ``rtype=ROLL_EX`` (expanding), every bound for ``ROLL_SD`` (sliding) —
    until the test start passes the template's test end (or the last known trading day
    when the test end is open). Works on the calendar's future part, as Qlib does, so the
    last window may reach beyond the last known day.

    Differences from Qlib: ``calendar=``; ``step``/``rtype``/``trunc_days`` validated at
    construction; rolling stops (instead of failing with ``TypeError``) when the next test
    start would lie exactly one day past the future calendar.
    """

    ROLL_EX = TimeAdjuster.SHIFT_EX  # fixed start date, expanding end date
    ROLL_SD = TimeAdjuster.SHIFT_SD  # fixed segment sizes, sliding

    def __init__(
        self,
        step: int = 40,
        rtype: str = ROLL_EX,
        ds_extra_mod_func: Callable[[dict, RollingGen], None] | None = handler_mod,
        test_key: str = "test",
        train_key: str = "train",
        trunc_days: int | None = None,
        task_copy_func: Callable[[Any], Any] = copy.deepcopy,
        *,
        calendar: TradingCalendar | str | None = None,
    ):
        self.step = _positive_int(step, "step")
        if rtype not in (self.ROLL_EX, self.ROLL_SD):
            raise ConfigError(f"rtype must be {self.ROLL_EX!r} or {self.ROLL_SD!r}, got {rtype!r}")
        self.rtype = rtype
        if ds_extra_mod_func is not None and not callable(ds_extra_mod_func):
            raise TaskTypeError(f"ds_extra_mod_func must be callable or None, got {ds_extra_mod_func!r}")
        if not callable(task_copy_func):
            raise TaskTypeError(f"task_copy_func must be callable, got {task_copy_func!r}")
        self.ds_extra_mod_func = ds_extra_mod_func
        self.ta = TimeAdjuster(future=True, calendar=calendar)
        self.test_key = test_key
        self.train_key = train_key
        self.trunc_days = None if trunc_days is None else _non_negative_int(trunc_days, "trunc_days")
        self.task_copy_func = task_copy_func

    def __repr__(self) -> str:
        return f"RollingGen(step={self.step}, rtype={self.rtype!r}, trunc_days={self.trunc_days})"

    def _update_task_segs(self, task: dict, segs: dict) -> None:
        task["dataset"]["kwargs"]["segments"] = copy.deepcopy(segs)
        if self.ds_extra_mod_func is not None:
            self.ds_extra_mod_func(task, self)

    def _test_end(self, aligned_end: pd.Timestamp | None) -> pd.Timestamp:
        # Qlib's transform_end_date: an open or too-late end means the last known
        # (non-future) trading day
        last = self.ta.calendar.end
        if aligned_end is None or aligned_end > last:
            log.info("test segment ends at %s: rolling up to the last known trading day %s", format_day(aligned_end), last.date())
            return last
        return aligned_end

    def gen_following_tasks(self, task: dict, test_end: pd.Timestamp) -> Iterator[dict]:
        """Yield the tasks after ``task`` (excluded) until a test segment starts after ``test_end``."""
        prev_seg = task["dataset"]["kwargs"]["segments"]
        while True:
            try:
                segments = {}
                for key, seg in prev_seg.items():
                    # only the train segment expands; valid and test keep their size
                    how = self.ta.SHIFT_EX if key == self.train_key and self.rtype == self.ROLL_EX else self.ta.SHIFT_SD
                    segments[key] = self.ta.shift(seg, step=self.step, rtype=how)
            except OutOfCalendarError:
                return  # the calendar (with its future part) is exhausted
            if segments[self.test_key][0] > test_end:
                return
            prev_seg = segments
            t = _detached_copy(task, self.task_copy_func)
            self._update_task_segs(t, segments)
            yield t

    def generate(self, task: dict) -> list[dict]:
        """Turn one template into its rolling tasks (see the class docstring)."""
        validate_template(task, self.test_key)
        t = _detached_copy(task, self.task_copy_func)
        segments = self.ta.align_seg(t["dataset"]["kwargs"]["segments"])
        test_end = self._test_end(segments[self.test_key][1])
        test_start_idx = self.ta.align_idx(segments[self.test_key][0])
        if test_start_idx is None:  # validate_template refused an open test start already
            raise TaskDefinitionError(f"dataset.kwargs.segments.{self.test_key} needs a start date, got None")
        segments[self.test_key] = (self.ta.get(test_start_idx), self.ta.get(test_start_idx + self.step - 1))
        if self.trunc_days is not None:
            trunc_segments(self.ta, segments, self.trunc_days, self.test_key)
        self._update_task_segs(t, segments)
        return [t, *self.gen_following_tasks(t, test_end)]


class MultiHorizonGenBase(TaskGen):
    """One task per prediction horizon (Qlib's ``MultiHorizonGenBase``).

    Subclasses implement :meth:`set_horizon`; ``generate`` then aligns the segments and
    truncates every non-test segment ``hr + label_leak_n`` trading days before the test
    start. Like Qlib, the calendar used is the future one (Qlib's ``TimeAdjuster()``
    default). Differences: ``calendar=``, ``test_key=``, a tuple default for ``horizon``,
    and horizons validated at construction.
    """

    def __init__(
        self,
        horizon: Sequence[int] = (5,),
        label_leak_n: int = 2,
        *,
        calendar: TradingCalendar | str | None = None,
        test_key: str = "test",
    ):
        if isinstance(horizon, (str, bytes)) or not isinstance(horizon, Iterable):
            raise TaskTypeError(f"horizon must be a list of ints, got {horizon!r}")
        self.horizon = [_non_negative_int(h, "horizon") for h in horizon]
        if not self.horizon:
            raise ConfigError("horizon is empty: give at least one horizon, e.g. [5]")
        self.label_leak_n = _non_negative_int(label_leak_n, "label_leak_n")
        self.ta = TimeAdjuster(future=True, calendar=calendar)
        self.test_key = test_key

    @abc.abstractmethod
    def set_horizon(self, task: dict, hr: int) -> None:
        """Change ``task`` in place for horizon ``hr`` (e.g. its label)."""

    def generate(self, task: dict) -> list[dict]:
        validate_template(task, self.test_key)
        res = []
        for hr in self.horizon:
            t = copy.deepcopy(task)
            self.set_horizon(t, hr)
            segments = self.ta.align_seg(_segments_of(t))
            trunc_segments(self.ta, segments, days=hr + self.label_leak_n, test_key=self.test_key)
            t["dataset"]["kwargs"]["segments"] = segments
            res.append(t)
        return res


class LabelHorizonGen(MultiHorizonGenBase):
    """A :class:`MultiHorizonGenBase` that writes a label expression per horizon.

    ``label`` (a string or a list of strings) is formatted with ``hr`` and
    ``hr_plus_1`` and written at the dotted ``label_path``. The default writes Qlib's
    usual return label ``Ref($close, -(hr+1)) / Ref($close, -1) - 1`` into the handler's
    ``label`` kwarg — the handler must accept that kwarg.
    """

    DEFAULT_LABEL = "Ref($close, -{hr_plus_1}) / Ref($close, -1) - 1"

    def __init__(
        self,
        horizon: Sequence[int] = (5,),
        label_leak_n: int = 2,
        *,
        label: str | Sequence[str] = DEFAULT_LABEL,
        label_path: str = "dataset.kwargs.handler.kwargs.label",
        calendar: TradingCalendar | str | None = None,
        test_key: str = "test",
    ):
        super().__init__(horizon, label_leak_n, calendar=calendar, test_key=test_key)
        labels = [label] if isinstance(label, str) else list(label)
        if not labels or not all(isinstance(x, str) for x in labels):
            raise ConfigError(f"label must be a string or a list of strings, got {label!r}")
        for text in labels:
            try:
                text.format(hr=0, hr_plus_1=1)
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"label {text!r} may only use {{hr}} and {{hr_plus_1}}: {exc!r}") from None
        self.labels = labels
        self.label_path = _parse_path(label_path)

    def set_horizon(self, task: dict, hr: int) -> None:
        set_path(task, self.label_path, [x.format(hr=hr, hr_plus_1=hr + 1) for x in self.labels])


# -- beyond Qlib: grids and model swaps ---------------------------------------------------
def _parse_path(path: Any) -> str:
    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise ConfigError(f"a config path must be dotted keys such as 'model.kwargs.learning_rate', got {path!r}")
    return path


def _resolve_parent(task: Any, path: str, create: bool) -> tuple[Any, str | int]:
    parts = path.split(".")
    node = task
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, Mapping):
            if part not in node:
                # a model or handler given without kwargs gets an empty one; anything else
                # missing is most likely a typo, which silently adding a key would hide
                if part == "kwargs" and create and isinstance(node, MutableMapping):
                    node[part] = {}
                else:
                    keys = ", ".join(map(str, node)) or "none"
                    raise ConfigError(f"config path {path!r}: {here!r} does not exist (keys there: {keys})")
            node = node[part]
        elif isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise ConfigError(f"config path {path!r}: {here!r} is not an index of a list of {len(node)}")
            node = node[int(part)]
        else:
            raise ConfigError(f"config path {path!r}: {here!r} is a {type(node).__name__}, not a dict or list")
    last = parts[-1]
    if isinstance(node, Mapping):
        return node, last
    if isinstance(node, list):
        if not last.lstrip("-").isdigit() or not -len(node) <= int(last) < len(node):
            raise ConfigError(f"config path {path!r}: {last!r} is not an index of a list of {len(node)}")
        return node, int(last)
    raise ConfigError(f"config path {path!r}: its parent is a {type(node).__name__}, not a dict or list")


def set_path(task: dict, path: str, value: Any) -> None:
    """Set ``value`` at dotted ``path`` in ``task`` (in place).

    Keys along the way must exist (a missing ``kwargs`` is created); list items are
    addressed by index (``record.0.kwargs.topk``).
    """
    parent, key = _resolve_parent(task, _parse_path(path), create=True)
    parent[key] = value


class GridGen(TaskGen):
    """Hyper-parameter search over dotted config paths.

    ``grid`` is either a mapping ``{path: [values]}`` — one task per combination, in the
    order of ``itertools.product`` over the keys as given — or a list of mappings
    ``[{path: value, ...}, ...]`` — one task per item. Paths look like
    ``model.kwargs.learning_rate``; see :func:`set_path`. Not in Qlib.
    """

    def __init__(self, grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]):
        # a mapping is kept as its axes: its points are made one at a time while
        # generating, so a grid of 10^9 points is counted (and refused) without being built
        self._axes: list[list[tuple[str, Any]]] | None = None
        self._points: list[dict] | None = None
        if isinstance(grid, Mapping):
            if not grid:
                raise ConfigError("grid is empty: give {path: [values, ...]}")
            axes = []
            for path, values in grid.items():
                _parse_path(path)
                if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
                    raise ConfigError(f"grid[{path!r}] must be a list of values, got {values!r}")
                values = list(values)
                if not values:
                    raise ConfigError(f"grid[{path!r}] is an empty list: it would generate no task")
                axes.append([(path, v) for v in values])
            self._axes = axes
        elif isinstance(grid, Sequence) and not isinstance(grid, (str, bytes)):
            if not grid:
                raise ConfigError("grid is an empty list: give [{path: value, ...}, ...]")
            self._points = []
            for i, point in enumerate(grid):
                if not isinstance(point, Mapping) or not point:
                    raise ConfigError(f"grid[{i}] must be a non-empty mapping {{path: value}}, got {point!r}")
                for path in point:
                    _parse_path(path)
                self._points.append(dict(point))
        else:
            raise TaskTypeError(f"grid must be a mapping {{path: [values]}} or a list of mappings, got {grid!r}")

    def __len__(self) -> int:
        if self._points is not None:
            return len(self._points)
        return math.prod(len(axis) for axis in self._axes or [])

    def _iter_points(self) -> Iterator[dict]:
        if self._points is not None:
            return iter(self._points)
        return (dict(combo) for combo in itertools.product(*(self._axes or [])))

    @property
    def points(self) -> list[dict]:
        """Every point of the grid (built on demand)."""
        return list(self._iter_points())

    def _paths(self) -> Iterable[str]:
        if self._axes is not None:
            return [axis[0][0] for axis in self._axes]
        return dict.fromkeys(p for point in self._points or [] for p in point)

    def count(self, task: dict) -> int:
        return len(self)

    def first(self, task: dict) -> dict | None:
        t = copy.deepcopy(task)
        for path, value in next(self._iter_points()).items():
            set_path(t, path, copy.deepcopy(value))
        return t

    def __repr__(self) -> str:
        return f"GridGen({len(self)} points)"

    def generate(self, task: dict) -> list[dict]:
        if not isinstance(task, Mapping):
            raise TaskTypeError(f"a task template must be a dict, got {type(task).__name__}")
        probe = copy.deepcopy(task)
        for path in self._paths():
            _resolve_parent(probe, path, create=True)  # fail before generating anything
        res = []
        for point in self._iter_points():
            t = copy.deepcopy(task)
            for path, value in point.items():
                set_path(t, path, copy.deepcopy(value))
            res.append(t)
        return res


class ModelGen(TaskGen):
    """One task per model config, replacing the template's ``model`` section.

    ``models`` is a list of model configs (``{"class": ..., "module_path": ..., "kwargs": ...}``)
    or a mapping ``{name: config}``; a name is written into the config as ``"name"`` so
    the tasks (and their filters, ``filter.model.name``) tell the models apart — Qlib-style
    model factories ignore the extra key. Not in Qlib.
    """

    def __init__(self, models: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]):
        items: list[tuple[str | None, Mapping[str, Any]]]
        if isinstance(models, Mapping):
            items = [(str(name), cfg) for name, cfg in models.items()]
        elif isinstance(models, Sequence) and not isinstance(models, (str, bytes)):
            items = [(None, cfg) for cfg in models]
        else:
            raise TaskTypeError(f"models must be a list of model configs or a mapping name -> config, got {models!r}")
        if not items:
            raise ConfigError("models is empty: give at least one model config")
        self.models = []
        for i, (name, cfg) in enumerate(items):
            label = f"models[{name or i}]"
            if not isinstance(cfg, Mapping):
                raise ConfigError(f"{label} must be a model config dict, got {cfg!r}")
            if "class" not in cfg:
                raise ConfigError(f"{label} has no 'class' (keys: {', '.join(map(str, cfg)) or 'none'})")
            model = copy.deepcopy(dict(cfg))
            if name is not None:
                model["name"] = name
            self.models.append(model)

    def __repr__(self) -> str:
        return f"ModelGen({[m.get('name', m['class']) for m in self.models]})"

    def generate(self, task: dict) -> list[dict]:
        if not isinstance(task, Mapping):
            raise TaskTypeError(f"a task template must be a dict, got {type(task).__name__}")
        res = []
        for cfg in self.models:
            # keep the template's key order so tasks read like the template
            t = {k: copy.deepcopy(cfg if k == "model" else v) for k, v in task.items()}
            t.setdefault("model", copy.deepcopy(cfg))
            res.append(t)
        return res


def dry_run(templates: dict | Sequence[dict], generators: TaskGen | Sequence[TaskGen], max_tasks: int = DEFAULT_MAX_TASKS) -> list[dict]:
    """The tasks :func:`task_generator` would produce, deduplicated, without enqueueing.

    Two tasks are duplicates when their canonical filters (:func:`qcelery.canonical.normalize`,
    the form the task pool deduplicates on) are equal; the first one is kept, order is
    preserved. Errors in templates or generators raise here, as they would on enqueue.
    """
    tasks = task_generator(templates, generators, max_tasks=max_tasks)
    seen: set[str] = set()
    unique = []
    for task in tasks:
        h = filter_hash(normalize(task))
        if h not in seen:
            seen.add(h)
            unique.append(task)
    if len(unique) < len(tasks):
        log.info("dry run: %d tasks generated, %d after removing duplicates", len(tasks), len(unique))
    return unique
