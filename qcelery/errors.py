"""The exceptions qcelery raises.

Every error a user can meet derives from :class:`QceleryError`, so one ``except``
catches them all; most also derive from the builtin a Python user would expect
(``ValueError``, ``TypeError``, ``ConnectionError``) so existing handlers keep working.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .exp import Recorder


def _plain_message(self: BaseException) -> str:
    """``__str__`` for the errors that are also ``KeyError``: KeyError quotes its
    argument, and these carry a sentence, not a key."""
    return str(self.args[0]) if self.args else ""


class QceleryError(Exception):
    """Base class of every qcelery error."""


class ConfigError(QceleryError, ValueError):
    """Settings, a workflow file or a template are malformed."""


class TaskDefinitionError(QceleryError, ValueError):
    """A task definition or a query is not acceptable; nothing was written."""


class TaskTypeError(QceleryError, TypeError):
    """An argument has the wrong type; nothing was written."""


class UnknownStatusError(QceleryError, ValueError):
    """A status string is not one of the pool's statuses."""


class StoreUnavailableError(QceleryError, ConnectionError):
    """MongoDB (or the embedded SecantusDB) did not answer."""


class BrokerUnavailableError(QceleryError, ConnectionError):
    """The Celery broker or result backend did not answer."""


class PermanentTaskError(QceleryError):
    """Running the task again cannot help (a refused name, an undecodable definition or
    document, a result that cannot be pickled): a worker fails the task at once, without
    spending its remaining attempts."""


class UnsafePickleError(PermanentTaskError, ValueError):
    """A pickled ``def``/``res`` refers to a global outside the allow-list."""


class ModuleNotAllowedError(TaskDefinitionError, PermanentTaskError):
    """A task definition or batch names a class or function of a module outside the
    allow-list (``QCELERY_ALLOWED_MODULES`` / ``settings.allowed_modules``)."""


class ResultEncodeError(TaskTypeError, PermanentTaskError):
    """A task's result cannot be pickled (so it cannot be stored); nothing was written."""


class CorruptTaskError(PermanentTaskError, ValueError):
    """A task document's own fields (``attempt``, ``status``...) hold values qcelery
    never writes; the task is failed with this reason rather than retried or skipped."""


class DecodeError(QceleryError, ValueError):
    """A stored ``def``/``res`` could not be decoded."""


class TaskNotFoundError(QceleryError, KeyError):
    """No task (or batch) with that id exists in the pool."""

    __str__ = _plain_message


class UnknownPoolError(TaskNotFoundError):
    """No task pool of that name is registered (created or adopted by qcelery)."""


class ForeignCollectionError(TaskDefinitionError):
    """A collection holds documents qcelery did not write; it is not taken for a pool."""


class LeaseLostError(QceleryError):
    """A worker tried to write a task whose lease it no longer holds."""


class EmbeddedServerError(QceleryError, RuntimeError):
    """An embedded server could not be started or did not answer."""


class TrackingUnavailableError(QceleryError, ConnectionError):
    """The MLflow tracking server did not answer."""


# ------------------------------------------------------------------ task definitions
class OutOfCalendarError(TaskDefinitionError, KeyError):
    """A date or a shifted segment falls outside the trading calendar.

    It is a ``KeyError`` too, because Qlib's ``TimeAdjuster.shift`` signals the end of
    the calendar with ``KeyError`` and rolling code catches that.
    """

    __str__ = _plain_message


class SerializableConfigError(ConfigError, KeyError):
    """``Serializable.config`` got an option it does not know (a ``KeyError`` as in Qlib)."""

    __str__ = _plain_message


# ------------------------------------------------------------------ experiments and training
class LoadObjectError(QceleryError, LookupError):
    """An artifact could not be downloaded or decoded (Qlib's ``LoadObjectError``).

    Raised through :func:`load_object_error`: in a process that imported Qlib it is also an
    instance of Qlib's own ``qlib.utils.exceptions.LoadObjectError``."""


def load_object_error(message: str) -> LoadObjectError:
    """A :class:`LoadObjectError` saying ``message``. When this process imported Qlib, it is
    also Qlib's ``qlib.utils.exceptions.LoadObjectError``: Qlib's records catch that type
    (``RecordTemp.load`` looks for ``pred.pkl`` under the record's own folder first and falls
    back to the record it depends on only on Qlib's type), so they work on qcelery's
    recorder. Without Qlib imported no handler can name Qlib's type, and nothing is imported."""
    qlib_errors = sys.modules.get("qlib.utils.exceptions")
    qlib_type = getattr(qlib_errors, "LoadObjectError", None)
    if isinstance(qlib_type, type) and issubclass(qlib_type, Exception):
        return _also_qlibs(qlib_type)(message)
    return LoadObjectError(message)


_ALSO_QLIBS: dict[type[Exception], type[LoadObjectError]] = {}


def _also_qlibs(qlib_type: type[Exception]) -> type[LoadObjectError]:
    if qlib_type not in _ALSO_QLIBS:
        # named and placed like the base, so a pickled one (a traceback, a Celery result) decodes as qcelery's
        _ALSO_QLIBS[qlib_type] = type(
            "LoadObjectError", (LoadObjectError, qlib_type), {"__module__": __name__, "__doc__": LoadObjectError.__doc__}
        )
    return _ALSO_QLIBS[qlib_type]


class RecordError(QceleryError, RuntimeError):
    """A record of a task raised while generating; the message names the record and task."""


class TrainingFailedError(QceleryError, RuntimeError):
    """Some tasks of a trainer's batch failed. ``failures`` lists ``{task_id, error}``;
    ``recorders`` maps the other tasks' ids to their recorders."""

    def __init__(self, message: str, failures: list[dict], recorders: dict[str, Recorder]):
        super().__init__(message)
        self.failures = failures
        self.recorders = recorders


# ------------------------------------------------------------------ the PIT store
# They also derive from the builtin a Qlib user already catches: Qlib raises
# ``ValueError`` for a field without ``_q``/``_a`` and ``FileNotFoundError`` for
# missing files, and reads corrupt files silently.
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
