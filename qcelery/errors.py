"""The exceptions qcelery raises.

Every error a user can meet derives from :class:`QceleryError`, so one ``except``
catches them all; most also derive from the builtin a Python user would expect
(``ValueError``, ``TypeError``, ``ConnectionError``) so existing handlers keep working.
"""

from __future__ import annotations


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


class UnsafePickleError(QceleryError, ValueError):
    """A pickled ``def``/``res`` refers to a global outside the allow-list."""


class DecodeError(QceleryError, ValueError):
    """A stored ``def``/``res`` could not be decoded."""


class TaskNotFoundError(QceleryError, KeyError):
    """No task (or batch) with that id exists in the pool."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""


class LeaseLostError(QceleryError):
    """A worker tried to write a task whose lease it no longer holds."""


class EmbeddedServerError(QceleryError, RuntimeError):
    """An embedded server could not be started or did not answer."""
