"""PIT operator calls as a data handler's config names them.

A call is written either as Qlib writes it, a string, or as a tuple (a list from
YAML works too):

======================================  ====================================================
string (Qlib's expression syntax)        tuple
======================================  ====================================================
``"P($$roewa_q)"``                       ``("P", "roewa_q")``
``"P(Mean($$roewa_q, 4))"``              ``("P", "roewa_q", {"window": 4, "how": "mean"})``
``"P(Sum($$roewa_q, 4))"``               ``("P", "roewa_q", {"window": 4, "how": "sum"})``
``"P(Ref($$roewa_q, 1))"``               ``("P", "roewa_q", {"offset": 1})``
``"P(Mean(Ref($$roewa_q, 1), 4))"``      ``("P", "roewa_q", {"window": 4, "how": "mean", "offset": 1})``
``"PRef($$roewa_q, 201904)"``            ``("PRef", "roewa_q", 201904)``
======================================  ====================================================

Inside ``P(...)`` the string form accepts ``Mean``, ``Sum`` and ``Ref`` nested in any
order with at most one ``Mean``/``Sum`` (``Ref`` of a window and a window of ``Ref``
are the same window, shifted); ``Ref``\\ s add up. Qlib accepts any expression inside
``P``; qcelery supports these, which cover windowed fundamentals, and refuses the
rest with :class:`~qcelery.pit.errors.PITQueryError` rather than guessing. Strings
are parsed, never evaluated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from .errors import PITQueryError
from .operators import check_window
from .periods import Field, check_period, parse_field

_TOKEN_RE = re.compile(r"\s*(?:(?P<field>\$\$[A-Za-z0-9_]+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<int>-?\d+)|(?P<punct>[(),]))")
_AGGREGATES = {"Mean": "mean", "Sum": "sum"}
_P_OPTIONS = ("window", "how", "offset")


@dataclass(frozen=True)
class PITCall:
    """One ``P`` or ``PRef`` call: what to compute for each observation day."""

    op: str
    field: Field
    window: int = 1
    how: str = "last"
    offset: int = 0
    period: int | None = None

    def __str__(self) -> str:
        if self.op == "PRef":
            return f"PRef({self.field}, {self.period})"
        inner = str(self.field)
        if self.offset:
            inner = f"Ref({inner}, {self.offset})"
        if self.how != "last":
            inner = f"{self.how.capitalize()}({inner}, {self.window})"
        return f"P({inner})"


def p_call(field: Any, window: Any = 1, how: Any = "last", offset: Any = 0) -> PITCall:
    """A validated ``P`` call (see :meth:`qcelery.pit.PITStore.P` for the arguments)."""
    window, how, offset = check_window(window, how, offset)
    return PITCall("P", parse_field(field), window=window, how=how, offset=offset)


def pref_call(field: Any, period: Any) -> PITCall:
    """A validated ``PRef`` call: ``period`` must exist for the field's frequency."""
    f = parse_field(field)
    check_period(period, f)
    return PITCall("PRef", f, period=int(period))


def parse_call(spec: Any, name: str = "spec") -> PITCall:
    """A :class:`PITCall` from a string expression or a tuple/list (see the module doc)."""
    if isinstance(spec, PITCall):
        return spec
    if isinstance(spec, str):
        return _Parser(spec, name).parse()
    if isinstance(spec, (tuple, list)) and spec and spec[0] in ("P", "PRef"):
        op, args = spec[0], list(spec[1:])
        if op == "PRef" and len(args) != 2:
            raise PITQueryError(f"{name}: ('PRef', field, period) takes a field and a period, got {spec!r}")
        options: Mapping[str, Any] = {}
        if op == "P":
            if len(args) == 2 and isinstance(args[1], Mapping):
                options = args[1]
            elif len(args) != 1:
                raise PITQueryError(f"{name}: ('P', field[, {{window, how, offset}}]) expected, got {spec!r}")
            unknown = sorted(set(options) - set(_P_OPTIONS))
            if unknown:
                raise PITQueryError(f"{name}: unknown P option(s) {unknown}; the options are {', '.join(_P_OPTIONS)}")
        try:
            return pref_call(*args) if op == "PRef" else p_call(args[0], **options)
        except PITQueryError as exc:
            raise PITQueryError(f"{name}: {exc}") from exc
    raise PITQueryError(
        f"{name}: {spec!r} is not a PIT call; write 'P($$roewa_q)', 'P(Mean($$roewa_q, 4))', "
        f"'PRef($$roewa_q, 201904)' or a tuple such as ('P', 'roewa_q', {{'window': 4, 'how': 'mean'}})"
    )


class _Parser:
    """Recursive descent over the tokens of one expression string."""

    def __init__(self, text: str, name: str) -> None:
        self.text, self.name = text, name
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        stripped = text.rstrip()
        while pos < len(stripped):
            m = _TOKEN_RE.match(stripped, pos)
            if not m:
                self.fail(f"unexpected character {stripped[pos:].lstrip()[:1]!r}", pos)
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()
        self.i = 0

    def fail(self, what: str, pos: int | None = None) -> NoReturn:
        at = f" at character {pos}" if pos is not None else ""
        raise PITQueryError(
            f"{self.name}: cannot parse {self.text!r}{at}: {what}; supported: P($$f), P(Mean($$f, k)), "
            f"P(Sum($$f, k)), P(Ref($$f, k)) and their nesting, PRef($$f, period)"
        )

    def next(self, kind: str, value: str | None = None) -> str:
        if self.i >= len(self.tokens):
            self.fail(f"expected {value or kind}, found the end")
        k, v, pos = self.tokens[self.i]
        if k != kind or (value is not None and v != value):
            self.fail(f"expected {value or kind}, found {v!r}", pos)
        self.i += 1
        return v

    def parse(self) -> PITCall:
        op = self.next("name")
        if op not in ("P", "PRef"):
            self.fail(f"the outer operator must be P or PRef, not {op!r}", self.tokens[0][2])
        self.next("punct", "(")
        if op == "PRef":
            field = self.next("field")
            self.next("punct", ",")
            args: tuple[Any, ...] = (field, int(self.next("int")))
        else:
            args = self.inner()
        try:
            call = pref_call(*args) if op == "PRef" else p_call(*args)
        except PITQueryError as exc:
            raise PITQueryError(f"{self.name}: {self.text!r}: {exc}") from exc
        self.next("punct", ")")
        if self.i != len(self.tokens):
            self.fail("unexpected text after the call", self.tokens[self.i][2])
        return call

    def inner(self) -> tuple[str, int, str, int]:
        if self.i < len(self.tokens) and self.tokens[self.i][0] == "field":
            return self.next("field"), 1, "last", 0
        op = self.next("name")
        if op not in ("Ref", *_AGGREGATES):
            self.fail(f"operator {op!r} is not supported inside P", self.tokens[self.i - 1][2])
        self.next("punct", "(")
        field, window, how, offset = self.inner()
        self.next("punct", ",")
        n = int(self.next("int"))
        self.next("punct", ")")
        if op == "Ref":
            if n < 0:
                raise PITQueryError(
                    f"{self.name}: {self.text!r}: Ref(..., {n}) refers to a future period; "
                    f"the PIT operators only look back (Qlib refuses it too)"
                )
            return field, window, how, offset + n
        if how != "last":
            self.fail(f"{op} over another Mean/Sum is not supported")
        return field, n, _AGGREGATES[op], offset
