"""Task statuses and the transitions between them, in one place.

The strings are Qlib's (``waiting``, ``running``, ``part_done``, ``done``) plus
``failed`` for a task whose attempts are exhausted. Every change of status in the
pool is one conditional update whose filter names the status it expects, and the
pair (expected, new) must be listed in :data:`TRANSITIONS`.
"""

from __future__ import annotations

from .errors import UnknownStatusError

WAITING = "waiting"
RUNNING = "running"
PART_DONE = "part_done"
DONE = "done"
FAILED = "failed"

ALL: tuple[str, ...] = (WAITING, RUNNING, PART_DONE, DONE, FAILED)
#: statuses a worker may claim a task from
CLAIMABLE: tuple[str, ...] = (WAITING, PART_DONE)
#: statuses that end a batch's interest in a task (aggregation may run)
FINAL: tuple[str, ...] = (DONE, FAILED)
#: statuses that still need a worker
UNDONE: tuple[str, ...] = (WAITING, RUNNING, PART_DONE)

#: (from, to) pairs the pool's own operations perform; admin resets (``reset_status``)
#: may move any task to any status, as Qlib allows.
TRANSITIONS: frozenset[tuple[str, str]] = frozenset(
    {
        (WAITING, RUNNING),  # claim / fetch_task
        (PART_DONE, RUNNING),  # claim of the second phase
        (RUNNING, DONE),  # commit
        (RUNNING, PART_DONE),  # commit of the first phase
        (RUNNING, WAITING),  # fail with attempts left, lease recovered, return_task
        (RUNNING, FAILED),  # attempts exhausted
        (FAILED, WAITING),  # retry-failed
        (FAILED, PART_DONE),  # retry-failed of a second-phase failure
        (WAITING, FAILED),  # a document whose attempt is corrupt: no claim can take it
        (PART_DONE, FAILED),  # the same, in its second phase
    }
)


def check(status: str, what: str = "status") -> str:
    """Return ``status`` if it is one of :data:`ALL`, else raise :class:`UnknownStatusError`."""
    if status not in ALL:
        raise UnknownStatusError(f"unknown {what} {status!r}; expected one of {', '.join(ALL)}")
    return status
