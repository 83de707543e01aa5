"""Point-in-time (PIT) financial data: Qlib's file format and its ``P``/``PRef`` operators.

Financial statements are published after their period ends and revised later; a
backtest that reads the latest revision uses the future. A PIT store keeps every
revision with its publication day and answers "what was known on day t":

* :mod:`~qcelery.pit.fileformat` - the ``.data``/``.index`` pair, byte-compatible with
  Qlib's ``scripts/dump_pit.py`` (files are interchangeable both ways);
* :class:`PITStore` - ``write``/``read`` statements, ``P``/``PRef`` over a range of days,
  vectorised over all days at once (Qlib evaluates day by day);
* :mod:`~qcelery.pit.expr` - calls by name, ``"P(Mean($$roewa_q, 4))"`` or
  ``("P", "roewa_q", {"window": 4, "how": "mean"})``;
* :func:`pit_panel` - PIT columns on a ``(datetime, instrument)`` panel for a data handler;
* :func:`synthetic_statements` - statements with late publication and revisions, and
  :func:`synthetic_pit_panel` - PIT columns over them, for a synthetic data handler.
"""

from .errors import PITDataNotFoundError, PITFormatError, PITQueryError
from .expr import PITCall, parse_call
from .fileformat import NO_RECORD, RECORD_DTYPE, PITFile
from .panel import pit_panel
from .store import PITStore
from .synthetic import synthetic_pit_panel, synthetic_statements, write_synthetic_statements

__all__ = [
    "NO_RECORD",
    "RECORD_DTYPE",
    "PITCall",
    "PITDataNotFoundError",
    "PITFile",
    "PITFormatError",
    "PITQueryError",
    "PITStore",
    "parse_call",
    "pit_panel",
    "synthetic_pit_panel",
    "synthetic_statements",
    "write_synthetic_statements",
]
