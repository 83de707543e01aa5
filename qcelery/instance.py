"""Objects from Qlib-style configs: ``init_instance_by_config`` and its helpers.

A config is ``{"class": "LinearModel", "module_path": "qcelery.models", "kwargs": {...}}``
(``"class"`` may also be a dotted path ``"qcelery.models.LinearModel"``, or the class
object itself), a class, or an already built instance. Extra keys (such as the
``name`` that :class:`~qcelery.gen.ModelGen` writes) are ignored.

Differences from Qlib (``qlib.utils.mod``):

* a module or class that does not import raises :class:`~qcelery.errors.ConfigError`
  naming the module, the class and what the module does offer, instead of a bare
  ``ModuleNotFoundError`` / ``AttributeError``;
* ``try_kwargs`` are passed only when the callable accepts them (by signature), where
  Qlib retries without them on *any* ``TypeError``, which also hid errors raised inside
  the constructor. A callable that takes them only through ``**kwargs`` is Qlib's case
  (it may hand them on to a parent that refuses them, as Qlib's ``PortAnaRecord`` does
  with ``model`` / ``dataset``): it gets them, and on a ``TypeError`` is called again
  without them, as in Qlib;
* a string or path naming a pickle file is not loaded (pickles come from MLflow
  artifacts or the task pool, through :mod:`qcelery.serial`);
* :func:`fill_placeholder` returns a filled copy and leaves its input alone;
* task data is never code: inside :func:`allowed_imports` (where the worker and the
  trainers build a task) every class or function a config names must be admitted by the
  allow-list (``settings.allowed_modules``, see :func:`qcelery.serial.admit_import`),
  and :func:`check_task_names` checks a whole task definition before anything is built.
  Outside that block a config is what the caller's own code wrote, imported as in Qlib.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import importlib
import inspect
import logging
import re
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import PurePath
from typing import Any

from .errors import ConfigError, ModuleNotAllowedError, TaskTypeError
from .serial import admit_import

log = logging.getLogger(__name__)

__all__ = [
    "init_instance_by_config",
    "get_callable_kwargs",
    "fill_placeholder",
    "flatten_dict",
    "accepted_kwargs",
    "allowed_imports",
    "check_task_names",
]

_PLACEHOLDER = re.compile(r"^<([^<>]+)>$")
_DOTTED_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+$")

#: the allow-list in force while task data is built (``None``: the caller's own code)
_ALLOWED: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("qcelery_allowed_imports", default=None)

#: keys whose value Qlib's ``init_instance_by_config`` resolves (a config, a dotted class
#: path, or in Qlib a ``file://`` pickle), so their plain strings name code as well
_CONFIG_SLOTS = frozenset(
    {"model", "dataset", "handler", "record", "data_loader", "processors", "infer_processors", "learn_processors", "reweighter"}
)


@contextlib.contextmanager
def allowed_imports(allowed_modules: Iterable[str]) -> Iterator[None]:
    """Within the block, every class or function a config names (here, in any task part
    qcelery builds) must be admitted by the allow-list: the defaults plus
    ``allowed_modules``; anything else raises :class:`~qcelery.errors.ModuleNotAllowedError`
    before its module is imported. The worker and the trainers build tasks inside it."""
    token = _ALLOWED.set(tuple(allowed_modules))
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def _named(target: str, module_path: Any) -> tuple[str, str] | None:
    """``(module, name)`` a config's ``class`` / ``module_path`` name, or ``None`` when
    only the building code's default module would say (that is code, not data)."""
    modname, _, name = target.rpartition(".")
    if modname:
        return modname, name
    if isinstance(module_path, types.ModuleType):
        return module_path.__name__, name
    if isinstance(module_path, str) and module_path:
        return module_path, name
    return None


def check_task_names(task: Any, allowed_modules: Iterable[str], *, load: bool = False, where: str = "task definition") -> None:
    """Raise :class:`~qcelery.errors.ModuleNotAllowedError` for the first class or function
    ``task`` names (a ``class`` / ``func`` entry at any depth, a dotted path or ``file://``
    string in a config slot) that the allow-list does not admit.

    With ``load=False`` (producers) only the names are judged and nothing is imported;
    with ``load=True`` (workers) the admitted ones are imported and checked for where
    they really come from. A module that does not import is left for the build to
    report, as before. ``where`` starts the message (``"task 65f... in pool 'p'"``).
    """
    allowed = tuple(allowed_modules)

    def admit(module: str, name: str, what: str) -> None:
        # a module or class that does not exist is no refusal: the build reports it as before
        with contextlib.suppress(ImportError, AttributeError):
            admit_import(module, name, allowed, what=f"{where}: {what}", load=load)

    def walk(node: Any, path: str, slot: bool) -> None:
        if isinstance(node, Mapping):
            for key in ("class", "func"):
                target = node.get(key)
                if isinstance(target, str):
                    named = _named(target, node.get("module_path"))
                    if named:
                        admit(*named, f"{path} {key} {target!r}")
            for key, value in node.items():
                if key not in ("class", "func", "module_path"):
                    walk(value, f"{path}.{key}" if path else str(key), key in _CONFIG_SLOTS)
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]", slot)
        elif slot and isinstance(node, PurePath):
            raise ModuleNotAllowedError(f"{where}: {path} is a path ({str(node)!r}); Qlib would unpickle that file, so task data may not")
        elif slot and isinstance(node, str):
            if node.strip().lower().startswith("file:"):
                raise ModuleNotAllowedError(f"{where}: {path} is {node!r}; Qlib would unpickle that file, so task data may not name one")
            if _DOTTED_PATH.match(node):
                module, _, name = node.rpartition(".")
                admit(module, name, f"{path} {node!r}")

    walk(task, "", False)


def _import_module(module_path: Any, name: str) -> types.ModuleType:
    if isinstance(module_path, types.ModuleType):
        return module_path
    if not isinstance(module_path, str) or not module_path:
        raise ConfigError(
            f"class {name!r} has no module: give 'module_path' (e.g. 'qcelery.models') or a dotted 'class' such as 'qcelery.models.{name}'"
        )
    try:
        return importlib.import_module(module_path)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_path!r} for class {name!r}: {type(exc).__name__}: {exc}") from exc


def _public_names(module: types.ModuleType) -> str:
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    shown = sorted(n for n in names if isinstance(getattr(module, n, None), type) or callable(getattr(module, n, None)))
    return ", ".join(shown[:20]) + (" ..." if len(shown) > 20 else "")


def get_callable_kwargs(config: Any, default_module: str | types.ModuleType | None = None) -> tuple[Callable, dict]:
    """The class (or function) a config names and its ``kwargs`` (Qlib's ``get_callable_kwargs``).

    ``config`` is a dict with ``class`` (or ``func``), optional ``module_path`` and
    ``kwargs``; or a dotted string ``"package.module.Name"``. ``default_module`` is
    used when neither gives a module.
    """
    if isinstance(config, Mapping):
        key = "class" if "class" in config else "func" if "func" in config else None
        if key is None:
            raise ConfigError(f"config {dict(config)!r} has no 'class' (or 'func') key")
        target = config[key]
        kwargs = config.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"'kwargs' of {target!r} must be a mapping, got {type(kwargs).__name__}: {kwargs!r}")
        module_path = config.get("module_path", default_module)
    elif isinstance(config, str):
        target, kwargs, module_path = config, {}, default_module
    else:
        raise TaskTypeError(
            f"cannot build an object from a {type(config).__name__}: give a dict with 'class' / 'module_path' / "
            "'kwargs', a dotted class path, a class or an instance"
        )
    if not isinstance(target, str):
        if not callable(target):
            raise TaskTypeError(f"'class' must be a class name or a class, got {target!r}")
        return target, dict(kwargs)
    modname, _, name = target.rpartition(".")
    allowed = _ALLOWED.get()
    named = _named(target, module_path)
    if allowed is not None and named:  # judged by name before its module is imported
        admit_import(*named, allowed, what=f"class {target!r}", load=False)
    module = _import_module(modname or module_path, name)
    try:
        obj = getattr(module, name)
    except AttributeError:
        raise ConfigError(f"module {module.__name__!r} has no class {name!r} (it offers: {_public_names(module)})") from None
    if not callable(obj):
        raise ConfigError(f"{module.__name__}.{name} is not a class or function")
    if allowed is not None:  # and by what it really is
        admit_import(module.__name__, name, allowed, what=f"class {target!r}")
    return obj, dict(kwargs)


def accepted_kwargs(func: Callable, candidates: Mapping[str, Any]) -> dict[str, Any]:
    """The items of ``candidates`` that ``func`` accepts as keyword arguments."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(candidates)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in candidates.items() if k in names}


def init_instance_by_config(
    config: Any,
    default_module: str | types.ModuleType | None = None,
    accept_types: type | tuple[type, ...] = (),
    try_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Build the object ``config`` describes (Qlib's ``init_instance_by_config``).

    ``config``: a dict (``class``, ``module_path``, ``kwargs``), a dotted class path,
    a class (called with ``kwargs``), or an instance of ``accept_types`` (returned as is).
    ``try_kwargs`` are added when the callable accepts them; ``kwargs`` always are.
    """
    if accept_types and isinstance(config, accept_types):
        return config
    klass: Callable[..., Any]
    cls_kwargs: dict[str, Any]
    if isinstance(config, type):
        klass, cls_kwargs = config, {}
    elif isinstance(config, (Mapping, str)):
        klass, cls_kwargs = get_callable_kwargs(config, default_module)
    elif not accept_types:
        return config  # an instance given where a config was expected: use it as is
    else:
        wanted = accept_types if isinstance(accept_types, tuple) else (accept_types,)
        raise TaskTypeError(
            f"expected a config dict or an instance of {', '.join(t.__name__ for t in wanted)}, got {type(config).__name__}"
        )
    extra = accepted_kwargs(klass, try_kwargs or {})
    for key in set(extra) & set(cls_kwargs):
        extra.pop(key)  # the config's own value wins, as in Qlib
    named = {k: v for k, v in extra.items() if k in _named_params(klass)}
    name = getattr(klass, "__qualname__", repr(klass))
    try:
        bound = inspect.signature(klass).bind(**cls_kwargs, **extra, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{getattr(klass, '__module__', '?')}.{name}: bad kwargs {sorted(cls_kwargs)}: {exc}") from None
    except ValueError:  # no signature (builtins): let the call report
        return klass(**cls_kwargs, **extra, **kwargs)
    if len(named) == len(extra):
        return klass(*bound.args, **bound.kwargs)
    try:
        return klass(*bound.args, **bound.kwargs)
    except TypeError:  # Qlib's rule for try_kwargs taken through **kwargs: refused further down, so again without
        log.debug("%s refused %s through **kwargs; built without them, as Qlib does", name, sorted(set(extra) - set(named)))
        return klass(**cls_kwargs, **named, **kwargs)


def _named_params(func: Callable) -> set[str]:
    """The parameters ``func`` names (those it takes by keyword), not what ``**kwargs`` takes."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _lookup(config: Any, path: str) -> Any:
    node = config
    for part in path.split("."):
        if isinstance(node, Mapping):
            node = node[part]
        elif isinstance(node, (list, tuple)):
            node = node[int(part)]
        else:
            raise KeyError(part)
    return node


def fill_placeholder(config: Any, config_extend: Mapping[str, Any]) -> Any:
    """A copy of ``config`` with placeholders replaced (Qlib's ``fill_placeholder``).

    ``"<MODEL>"`` / ``"<DATASET>"`` (any key of ``config_extend``) become the given
    objects; ``"<dataset.kwargs.segments.test.0>"`` becomes the value at that dotted
    path of ``config`` itself. Strings that look like placeholders but match nothing
    are left as they are. Objects placed by ``config_extend`` are not copied.
    """
    for key in config_extend:
        if not isinstance(key, str) or not _PLACEHOLDER.match(key):
            raise ConfigError(f"placeholder {key!r} must look like '<NAME>'")

    def fill(node: Any) -> Any:
        if isinstance(node, str):
            if node in config_extend:
                return config_extend[node]
            m = _PLACEHOLDER.match(node)
            if m:
                try:
                    return copy.deepcopy(_lookup(config, m.group(1)))
                except (KeyError, IndexError, ValueError):
                    log.debug("%s looks like a placeholder but matches nothing; left as is", node)
            return node
        if isinstance(node, Mapping):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        if isinstance(node, tuple):
            return tuple(fill(v) for v in node)
        return node

    return fill(config)


def flatten_dict(d: Mapping[str, Any], parent_key: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (Qlib's ``flatten_dict``; lists stay values)."""
    items: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{parent_key}{sep}{k}" if parent_key else str(k)
        if isinstance(v, Mapping):
            items.update(flatten_dict(v, key, sep=sep))
        else:
            items[key] = v
    return items
