"""``DatasetH``: named segments of days over a handler (Qlib's ``DatasetH``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, overload

import pandas as pd

from ..errors import ConfigError
from ..serial import Serializable

__all__ = ["DatasetH"]


def _segment(name: str, value: Any) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
    if isinstance(value, slice):
        value = (value.start, value.stop)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(f"segment {name!r} must be a (start, end) pair of days, got {value!r}")
    out: list[pd.Timestamp | None] = []
    for bound in value:
        if bound is None:
            out.append(None)
            continue
        try:
            out.append(pd.Timestamp(bound))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"segment {name!r}: {bound!r} is not a date ({exc})") from None
    start, end = out
    if start is not None and end is not None and start > end:
        raise ConfigError(f"segment {name!r} starts {start.date()} after it ends {end.date()}")
    return start, end


class DatasetH(Serializable):
    """A handler plus named ``segments`` (``train``, ``valid``, ``test``...).

    ``handler`` is a handler or its config (built through the in-process handler cache;
    :func:`qcelery.trainer.task_train` passes an already built, GridFS-cached one).
    ``prepare(segments, col_set, data_key)`` returns, as in Qlib, one DataFrame indexed
    by (datetime, instrument) for a segment name, and a list for a list of names.

    Differences from Qlib: segment bounds are validated at construction (a segment
    starting after it ends, or a name ``prepare`` does not know, raises
    :class:`~qcelery.errors.ConfigError` naming it); pickling keeps the handler's
    config and drops its data (Qlib needs ``config(dump_all=False, recursive=True)``).
    """

    def __init__(self, handler: Any, segments: Mapping[str, Any], **kwargs: Any):
        super().__init__()
        if kwargs:
            raise ConfigError(f"DatasetH got unknown argument(s) {sorted(kwargs)}; it takes handler and segments")
        if isinstance(handler, Mapping):
            from .cache import HandlerCache

            handler = HandlerCache().get(handler)
        if not hasattr(handler, "fetch"):
            raise ConfigError(f"DatasetH handler must be a handler (with fetch) or its config, got {type(handler).__name__}")
        if not isinstance(segments, Mapping) or not segments:
            raise ConfigError(f"DatasetH segments must be a mapping such as {{'train': (start, end), ...}}, got {segments!r}")
        self.handler = handler
        self.segments = {str(k): _segment(str(k), v) for k, v in segments.items()}

    def __repr__(self) -> str:
        segs = ", ".join(f"{k}={s and s.date()}..{e and e.date()}" for k, (s, e) in self.segments.items())
        return f"DatasetH({self.handler!r}, {segs})"

    def _bounds(self, name: Any) -> tuple[Any, Any]:
        if isinstance(name, str):
            if name not in self.segments:
                raise ConfigError(f"unknown segment {name!r}; this dataset has {sorted(self.segments)}")
            return self.segments[name]
        if isinstance(name, slice):
            return name.start, name.stop
        raise ConfigError(f"a segment is a name ({sorted(self.segments)}) or a slice of days, got {name!r}")

    @overload
    def prepare(self, segments: str | slice, col_set: str | list[str] = ..., data_key: str = ..., **kwargs: Any) -> pd.DataFrame: ...
    @overload
    def prepare(
        self, segments: Iterable[str | slice], col_set: str | list[str] = ..., data_key: str = ..., **kwargs: Any
    ) -> list[pd.DataFrame]: ...
    def prepare(
        self,
        segments: str | slice | Iterable[str | slice],
        col_set: str | list[str] = "__all",
        data_key: str = "infer",
        **kwargs: Any,
    ) -> pd.DataFrame | list[pd.DataFrame]:
        """The data of ``segments`` (a name, a slice of days, or a list/tuple of them).

        ``col_set``: ``"feature"``, ``"label"`` (plain columns), ``["feature", "label"]``
        or ``"__all"`` (two-level columns); ``data_key``: ``"raw"``, ``"infer"`` or
        ``"learn"`` (the handler's ``DK_R`` / ``DK_I`` / ``DK_L``).
        """
        if kwargs:
            raise ConfigError(f"DatasetH.prepare got unknown argument(s) {sorted(kwargs)}")
        if isinstance(segments, (str, slice)):
            start, end = self._bounds(segments)
            frame: pd.DataFrame = self.handler.fetch(slice(start, end), col_set=col_set, data_key=data_key)
            return frame
        return [self.prepare(s, col_set=col_set, data_key=data_key) for s in segments]
