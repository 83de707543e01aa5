"""Workflow files: task templates and generators from YAML.

A workflow file is shaped like Qlib's ``workflow_config_*.yaml`` (anchors such as
``&data_handler_config`` and merge keys ``<<: *...`` work) with two additions: a
``generators:`` list and an optional ``calendar:``. See :func:`load_workflow`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .calendar import TradingCalendar, default_calendar, resolve_calendar
from .errors import ConfigError, QceleryError, TaskTypeError
from .gen import GridGen, LabelHorizonGen, ModelGen, RollingGen, TaskGen, validate_template
from .instance import check_task_names
from .qlib_bridge import check_qlib_init, provider_calendar

log = logging.getLogger(__name__)

__all__ = ["load_workflow", "qlib_init_of", "read_yaml", "build_generators", "GENERATOR_NAMES"]


class _WorkflowLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (PyYAML keeps the last one silently).

    Keys brought in by a merge (``<<: *anchor``) may still be overridden explicitly.
    """

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # called once per mapping before its merge keys are expanded; check the keys
        # written in this mapping itself
        if id(node) not in self._checked:
            self._checked.add(id(node))
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key; PyYAML reports it itself
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                        key_node.start_mark,
                    )
        super().flatten_mapping(node)

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        # `2024-13-45` matches YAML's date pattern, and PyYAML then raises a bare
        # ValueError with no line; report it like any other YAML error
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(None, None, f"{node.value!r} is not a valid date: {exc}", node.start_mark) from None


_WorkflowLoader.add_constructor("tag:yaml.org,2002:timestamp", _WorkflowLoader.construct_yaml_timestamp)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; errors become :class:`ConfigError` naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"workflow file {path} does not exist") from None
    try:
        return yaml.load(text, Loader=_WorkflowLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        what = " ".join(x for x in (exc.context, exc.problem) if x)
        raise ConfigError(f"{where}: YAML error: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML error: {exc}") from None


def _params(spec: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a mapping of parameters, got {spec!r}")
    unknown = sorted(set(map(str, spec)) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown parameter {unknown[0]!r}; known: {', '.join(sorted(allowed))}")
    return dict(spec)


def _rolling(spec: Any, where: str, calendar: TradingCalendar) -> TaskGen:
    p = _params(spec, where, {"step", "rtype", "trunc_days", "test_key", "train_key"})
    return RollingGen(calendar=calendar, **p)


def _horizon(spec: Any, where: str, calendar: TradingCalendar) -> TaskGen:
    if isinstance(spec, list):
        spec = {"horizon": spec}
    p = _params(spec, where, {"horizon", "label_leak_n", "label", "label_path", "test_key"})
    if "horizon" not in p:
        raise ConfigError(f"{where} needs 'horizon': a list of horizons in trading days, e.g. [1, 5, 10]")
    return LabelHorizonGen(calendar=calendar, **p)


def _grid(spec: Any, where: str, calendar: TradingCalendar) -> TaskGen:
    return GridGen(spec)


def _models(spec: Any, where: str, calendar: TradingCalendar) -> TaskGen:
    return ModelGen(spec)


#: generator names a ``generators:`` item may use, in the order of the docs
GENERATOR_NAMES: dict[str, Callable[[Any, str, TradingCalendar], TaskGen]] = {
    "rolling": _rolling,
    "horizon": _horizon,
    "grid": _grid,
    "models": _models,
}


def build_generators(specs: Any, calendar: TradingCalendar | str | None = None) -> list[TaskGen]:
    """Build generators from a ``generators:`` list (format in :func:`load_workflow`)."""
    if specs is None:
        return []
    if not isinstance(specs, list):
        raise ConfigError(f"generators must be a list such as [{{rolling: {{step: 40}}}}], got {specs!r}")
    cal = resolve_calendar(calendar)
    gens = []
    for i, item in enumerate(specs):
        where = f"generators[{i}]"
        if not isinstance(item, Mapping) or len(item) != 1:
            raise ConfigError(f"{where} must be a mapping with exactly one generator name, got {item!r}")
        ((name, spec),) = item.items()
        factory = GENERATOR_NAMES.get(name)
        if factory is None:
            raise ConfigError(f"{where}: unknown generator {name!r}; known: {', '.join(GENERATOR_NAMES)}")
        where = f"{where}.{name}"
        try:
            gens.append(factory(spec, where, cal))
        except ConfigError as exc:
            if str(exc).startswith(where):
                raise
            raise ConfigError(f"{where}: {exc}") from None
        except QceleryError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return gens


def _templates(doc: Mapping[str, Any], path: Path) -> list[dict]:
    if "task" in doc and "tasks" in doc:
        raise ConfigError(f"{path}: give either 'task' (one template) or 'tasks' (a list), not both")
    if "task" in doc:
        raw, names = [doc["task"]], ["task"]
    elif "tasks" in doc:
        if not isinstance(doc["tasks"], list) or not doc["tasks"]:
            raise ConfigError(f"{path}: 'tasks' must be a non-empty list of task templates")
        raw, names = doc["tasks"], [f"tasks[{i}]" for i in range(len(doc["tasks"]))]
    else:
        raise ConfigError(f"{path}: no 'task' section (a template with model, dataset and record)")
    for name, tpl in zip(names, raw, strict=True):
        if not isinstance(tpl, Mapping):
            raise ConfigError(f"{path}: {name} must be a mapping with model, dataset and record, got {tpl!r}")
    return [_unshared(t) for t in raw]


def _unshared(value: Any) -> Any:
    """A plain tree: YAML aliases make one object appear at several places; a task must
    not carry such hidden links (a change to one handler would change the other)."""
    if isinstance(value, Mapping):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def _check_template(tpl: Mapping[str, Any], name: str, path: Path, needs_model: bool, test_keys: set[str]) -> None:
    sections = ["dataset", "model"] if needs_model else ["dataset"]
    for section in sections:
        if section not in tpl:
            raise ConfigError(f"{path}: {name} has no '{section}' section")
        cfg = tpl[section]
        if not isinstance(cfg, Mapping) or "class" not in cfg:
            raise ConfigError(f"{path}: {name}.{section} must be a mapping with a 'class', got {cfg!r}")
    record = tpl.get("record")
    if record is not None:
        records = record if isinstance(record, list) else [record]
        for i, rec in enumerate(records):
            if not isinstance(rec, Mapping) or "class" not in rec:
                raise ConfigError(f"{path}: {name}.record[{i}] must be a mapping with a 'class', got {rec!r}")
    has_segments = isinstance(tpl.get("dataset"), Mapping) and "segments" in (tpl["dataset"].get("kwargs") or {})
    # segments are checked whenever present; the test segment only if a generator needs it
    for test_key in test_keys or ([None] if has_segments else []):
        try:
            validate_template(tpl, test_key)
        except QceleryError as exc:
            raise ConfigError(f"{path}: {name}: {exc}") from None


def qlib_init_of(doc: Any, allowed_modules: list[str] | None, *, where: str = "workflow") -> dict[str, Any] | None:
    """A parsed workflow's ``qlib_init:`` (the keyword arguments of ``qlib.init``), checked
    against the allow-list, or ``None`` when it has none."""
    if not isinstance(doc, Mapping) or doc.get("qlib_init") is None:
        return None
    return check_qlib_init(doc["qlib_init"], allowed_modules, where=where)


def load_workflow(
    path: str | Path,
    *,
    calendar: TradingCalendar | str | None = None,
    settings: Any = None,
) -> tuple[list[dict], list[TaskGen]]:
    """Load a workflow file into ``(templates, generators)`` for :func:`~qcelery.gen.task_generator`.

    The file is Qlib's workflow YAML (``task:`` with ``model``, ``dataset``, ``record``;
    other top-level keys such as ``qlib_init``, ``market`` or ``data_handler_config``
    are free, e.g. to hold anchors) plus::

        calendar: XSHG            # optional exchange code for the generators
        tasks: [...]              # instead of task:, several templates
        generators:               # optional, applied in order (cartesian expansion)
          - rolling: {step: 40, rtype: expanding, trunc_days: 2}   # RollingGen (also test_key, train_key)
          - horizon: {horizon: [1, 5], label_leak_n: 2}           # LabelHorizonGen (also label, label_path)
          - models:                                               # ModelGen: list, or name -> config
              linear_a1: {class: LinearModel, module_path: qcelery.models, kwargs: {alpha: 1.0}}
          - grid: {model.kwargs.alpha: [0.1, 1.0]}                # GridGen: path -> values, or a list of points

    The generators' calendar is ``calendar`` if given, else the file's ``calendar:``,
    else, when the file has ``qlib_init:``, its provider's own trading calendar
    (``<provider_uri>/calendars/day.txt`` and ``day_future.txt``, as Qlib's ``RollingGen``),
    else ``settings.calendar`` (when ``settings`` is given), else XSHG. ``qlib_init``
    itself (read by :func:`qlib_init_of`) travels with the batch to the workers. Errors (YAML
    syntax with its line, unknown generator names or parameters, templates without a
    test segment, start after end...) raise :class:`~qcelery.errors.ConfigError` before
    any task exists; with ``settings``, a class of a module outside its allow-list raises
    :class:`~qcelery.errors.ModuleNotAllowedError` (naming the module and
    ``QCELERY_ALLOWED_MODULES``) before any module is imported.
    """
    path = Path(path)
    doc = read_yaml(path)
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{path}: a workflow file must be a mapping with a 'task' section, got {type(doc).__name__}")
    templates = _templates(doc, path)

    qlib_init = doc.get("qlib_init")
    if qlib_init is not None:  # task data: refused by name before the provider is read
        qlib_init = check_qlib_init(qlib_init, settings.allowed_modules if settings is not None else None, where=str(path))
    if calendar is None and qlib_init is not None and doc.get("calendar") is None:
        # as Qlib's RollingGen: roll on the provider's own calendar, not an exchange's
        calendar = provider_calendar(qlib_init, where=str(path))
    if calendar is None:
        code = doc.get("calendar", getattr(settings, "calendar", None))
        if code is not None and not isinstance(code, str):
            raise ConfigError(f"{path}: calendar must be an exchange code such as XSHG, got {code!r}")
        try:
            calendar = default_calendar(code) if code else default_calendar()
        except (ConfigError, TaskTypeError) as exc:
            raise ConfigError(f"{path}: calendar {code!r}: {exc}") from None
    try:
        generators = build_generators(doc.get("generators"), calendar)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None

    needs_model = not any(isinstance(g, ModelGen) for g in generators)
    test_keys = {g.test_key for g in generators if isinstance(g, (RollingGen, LabelHorizonGen))}
    for i, tpl in enumerate(templates):
        name = "task" if "task" in doc else f"tasks[{i}]"
        _check_template(tpl, name, path, needs_model, test_keys)
        if settings is not None:  # task data is never code: refused by name, before anything is imported
            check_task_names(tpl, settings.allowed_modules, where=f"{path}: {name}")
    if settings is not None:
        check_task_names(doc.get("generators"), settings.allowed_modules, where=f"{path}: generators")
    log.debug("loaded %s: %d template(s), generators %s", path, len(templates), generators)
    return templates, generators
