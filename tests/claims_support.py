"""The claim paths of the pool, for its contract tests (``test_manage*``,
``test_status_machine``).

``qcelery.lease`` claims with ``find_one_and_update`` (real MongoDB under ``auto``) or in
two steps (SecantusDB under ``auto``). A contract test decorated with
:data:`each_claim_path` runs once per path, forced through ``claim_strategy`` whatever
server the suite talks to; the other tests of those modules take
:data:`DEFAULT_CLAIM_PATH`, the path production MongoDB takes, so it is the one the
suite runs most.
"""

from __future__ import annotations

import pytest

from qcelery.settings import Settings

CLAIM_PATHS = ("find_one_and_update", "two_step")
DEFAULT_CLAIM_PATH = "find_one_and_update"

#: run the decorated test once per claim path (the ``claim_strategy`` fixture's value)
each_claim_path = pytest.mark.parametrize("claim_strategy", CLAIM_PATHS)


def with_claim_path(settings: Settings, claim_strategy: str) -> Settings:
    """``settings`` forcing ``claim_strategy`` (validated like any settings object)."""
    return Settings(**{**settings.model_dump(), "claim_strategy": claim_strategy})
