"""The errors of the PIT store.

They derive from the project hierarchy (:class:`~qcelery.errors.QceleryError`) and
from the builtin a Qlib user already catches: Qlib raises ``ValueError`` for a field
without ``_q``/``_a``, ``AssertionError`` for a future reference and
``FileNotFoundError`` for missing files, and reads corrupt files silently.
"""

from __future__ import annotations

from ..errors import QceleryError, TaskDefinitionError


class PITQueryError(TaskDefinitionError):
    """A field name, period, operator or statement table is not acceptable.

    Raised before anything is read or written. A ``ValueError`` (through
    :class:`~qcelery.errors.TaskDefinitionError`).
    """


class PITFormatError(QceleryError, ValueError):
    """A ``.data``/``.index`` pair is truncated or inconsistent (corrupt).

    The message names the file, the byte offset and what was expected there.
    """


class PITDataNotFoundError(QceleryError, FileNotFoundError):
    """No ``.data``/``.index`` pair exists for that instrument and field."""
