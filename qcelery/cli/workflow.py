"""A workflow file as the CLI uses it: tasks generated, every class checked, and the
few top-level keys the CLI reads (``experiment_name``, ``pool``, ``queue``, ``qlib_init``).

Everything here runs before any server is contacted, so a typo in a class name or
a YAML error is reported (naming the class, or the file and line) with nothing
enqueued.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TaskDefinitionError
from ..settings import Settings

#: the task sections whose ``class`` / ``module_path`` entries must import
CLASS_SECTIONS = ("model", "dataset", "record")
TRAINER = "qcelery.trainer.task_train"
COLLECTOR = "qcelery.collect.summarize_batch"


@dataclass
class Workflow:
    path: Path
    templates: list[dict]
    generators: list[Any]
    #: how many tasks the generators make (duplicates included)
    n_generated: int
    experiment_name: str | None
    pool: str | None
    queue: str | None
    #: the file's ``qlib_init:`` (Qlib's ``qlib.init`` arguments), sent with the batch
    qlib_init: dict[str, Any] | None = None
    max_tasks: int = 1_000_000

    def iter_tasks(self) -> Iterator[dict]:
        """The tasks, made one at a time (what ``enqueue`` streams)."""
        from ..gen import iter_tasks

        return iter_tasks(self.templates, self.generators, max_tasks=self.max_tasks)

    @functools.cached_property
    def tasks(self) -> list[dict]:
        """Every task, deduplicated, in a list: for dry runs and descriptions, not for enqueueing."""
        from ..gen import dry_run

        return dry_run(self.templates, self.generators, max_tasks=self.max_tasks)

    @property
    def default_pool(self) -> str:
        """The task pool: the file's ``pool:``, else the file's name without extension."""
        return self.pool or self.path.stem


def _optional_str(doc: Mapping[str, Any], key: str, path: Path) -> str | None:
    value = doc.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{path}: {key} must be a non-empty string, got {value!r}")
    return value


def load(path: Path, settings: Settings) -> Workflow:
    """Read ``path`` and check that every model / dataset / record class its tasks name
    imports: the tasks are generated once here, one at a time, and not kept (enqueueing
    generates them again, streaming)."""
    from ..config import load_workflow, qlib_init_of, read_yaml
    from ..gen import iter_tasks

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"workflow file {path} is a directory; give a .yaml file")
    doc = read_yaml(path)  # YAML errors name the file and line
    templates, generators = load_workflow(path, settings=settings)
    n = check_classes(iter_tasks(templates, generators, max_tasks=settings.max_tasks), path)
    if not n:
        raise ConfigError(f"{path}: the generators produced no task")
    return Workflow(
        path,
        templates,
        generators,
        n,
        _optional_str(doc, "experiment_name", path),
        _optional_str(doc, "pool", path),
        _optional_str(doc, "queue", path),
        qlib_init_of(doc, settings.allowed_modules, where=str(path)),
        settings.max_tasks,
    )


def _class_configs(task: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(where, config)`` for every ``{class: ...}`` mapping in the task's sections,
    nested ones (a dataset's handler) included."""

    def walk(node: Any, where: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
        if isinstance(node, Mapping):
            if isinstance(node.get("class"), str):
                yield where, node
            for key, value in node.items():
                if key != "class":
                    yield from walk(value, f"{where}.{key}")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                yield from walk(value, f"{where}[{i}]")

    for section in CLASS_SECTIONS:
        if section in task:
            yield from walk(task[section], section)


def _import_class(cfg: Mapping[str, Any]) -> Any:
    """The object a Qlib-style ``{class, module_path}`` config names (``ConfigError``
    naming the module and what it offers when it does not exist)."""
    from ..instance import get_callable_kwargs

    return get_callable_kwargs(cfg)[0]


def check_classes(tasks: Iterable[dict], path: Path | str = "workflow") -> int:
    """Raise :class:`TaskDefinitionError` naming the first class that does not import;
    the number of tasks checked."""
    seen: dict[tuple[str, Any], None] = {}
    i = -1
    for i, task in enumerate(tasks):
        for where, cfg in _class_configs(task):
            key = (cfg["class"], cfg.get("module_path"))
            if not isinstance(key[1], (str, type(None))) or key in seen:
                continue
            try:
                _import_class(cfg)
            except ConfigError as exc:
                module = cfg.get("module_path") or cfg["class"].rpartition(".")[0] or "?"
                reason = str(exc)
                raise TaskDefinitionError(
                    f"{path}: task #{i} {where}: class {cfg['class']!r} from module {module!r} cannot be "
                    f"imported ({reason}); nothing was enqueued"
                ) from None
            seen[key] = None
    return i + 1


def accepts(func_path: str, name: str) -> bool:
    """Whether the function at ``func_path`` takes keyword ``name``."""
    from ..worker import resolve

    try:
        params = inspect.signature(resolve(func_path)).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def aggregate_spec(task_func: str, experiment_name: str) -> dict | None:
    """The batch collector: qcelery.collect's summary of the trainer's recorders when
    the tasks are trainings; the built-in counts-and-failures summary otherwise."""
    if task_func != TRAINER:
        return None
    kwargs = {"experiment_name": experiment_name} if accepts(COLLECTOR, "experiment_name") else {}
    return {"func": COLLECTOR, "kwargs": kwargs}


def describe(task: Mapping[str, Any]) -> tuple[str, str, str]:
    """(model, train segment, test segment) of a task, for tables."""
    model = task.get("model")
    if not isinstance(model, Mapping):
        model = {}
    label = str(model.get("name") or model.get("class") or "?")
    try:
        segments = task["dataset"]["kwargs"]["segments"]
    except (KeyError, TypeError):
        segments = {}

    def seg(key: str) -> str:
        value = segments.get(key) if isinstance(segments, Mapping) else None
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            return ""
        return " .. ".join(_day(v) for v in value)

    return label, seg("train"), seg("test")


def _day(value: Any) -> str:
    if value is None:
        return "open"
    text = str(value)
    return text[:10] if len(text) >= 10 and text[4] == "-" else text
