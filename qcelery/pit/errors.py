"""The errors of the PIT store (defined in :mod:`qcelery.errors`, importable from here too).

They derive from the project hierarchy (:class:`~qcelery.errors.QceleryError`) and
from the builtin a Qlib user already catches: Qlib raises ``ValueError`` for a field
without ``_q``/``_a``, ``AssertionError`` for a future reference and
``FileNotFoundError`` for missing files, and reads corrupt files silently.
"""

from __future__ import annotations

from ..errors import PITDataNotFoundError, PITFormatError, PITQueryError

__all__ = ["PITQueryError", "PITFormatError", "PITDataNotFoundError"]
