"""Serialization: Qlib's ``Serializable`` and the allow-listing unpickler.

Task definitions (``def``) and results (``res``) are stored pickled, as Qlib stores
them, so a Qlib pool can be read by qcelery and back. They are only ever decoded
through :func:`restricted_loads`, which resolves globals from an allow-list of
modules; anything else (``os.system``, ``subprocess.Popen``, ``builtins.eval``...)
is refused before it can run.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Iterable

from .errors import UnsafePickleError

#: module prefixes every decode accepts; a prefix admits its sub-modules too
DEFAULT_ALLOWED_MODULES: tuple[str, ...] = (
    "qcelery", "numpy", "pandas", "datetime", "collections", "builtins", "copyreg",
    "decimal", "fractions", "uuid", "pathlib", "bson", "zoneinfo", "pytz", "dateutil",
    "_codecs", "enum",
)

#: names in builtins that would let a pickle run code or touch the system
_FORBIDDEN_BUILTINS = frozenset({
    "eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr",
    "globals", "locals", "vars", "input", "breakpoint", "help", "exit", "quit", "memoryview",
    "__build_class__", "__loader__", "__spec__", "classmethod", "staticmethod", "property",
    "super", "type", "object",
})
#: other callables inside allowed modules that execute arbitrary code
_FORBIDDEN_GLOBALS = frozenset({
    ("pandas.io.pickle", "read_pickle"),
    ("numpy", "load"), ("numpy", "loadtxt"), ("numpy.lib.npyio", "load"), ("pandas", "eval"),
    ("pandas", "read_pickle"), ("pandas.core.computation.eval", "eval"), ("numpy.testing", "run_module_suite"),
})


def _allowed(module: str, name: str, allowed: tuple[str, ...]) -> bool:
    if (module, name) in _FORBIDDEN_GLOBALS:
        return False
    if module == "builtins":
        return name not in _FORBIDDEN_BUILTINS and not name.startswith("_")
    if module == "copyreg":  # helpers pickle uses to rebuild plain objects
        return name in {"_reconstructor", "__newobj__", "__newobj_ex__"}
    # a nested loader or a shell inside an allowed module would escape the allow-list
    if name in {"loads", "load", "system", "popen", "eval", "exec", "read_pickle"}:
        return False
    return any(module == p or module.startswith(p + ".") for p in allowed)


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves globals only from allowed modules."""

    def __init__(self, file: io.BufferedIOBase, allowed_modules: Iterable[str] = (), context: str = "pickle"):
        super().__init__(file)
        self.allowed = tuple(DEFAULT_ALLOWED_MODULES) + tuple(allowed_modules)
        self.context = context

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name, self.allowed):
            raise UnsafePickleError(
                f"{self.context}: refusing to load global {module}.{name}: module not in the allow-list "
                f"(add it to settings.allowed_modules / QCELERY_ALLOWED_MODULES if you trust it)"
            )
        return super().find_class(module, name)


def restricted_loads(data: bytes, allowed_modules: Iterable[str] = (), context: str = "pickle") -> Any:
    """Unpickle ``data`` through :class:`RestrictedUnpickler`.

    ``context`` names what is decoded (e.g. ``"task 65f... res"``) for error messages.
    """
    return RestrictedUnpickler(io.BytesIO(data), allowed_modules, context).load()


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` the way Qlib stores ``def``/``res`` (highest protocol)."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
