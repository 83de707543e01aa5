"""Fixtures of the fault tests: settings with short leases and a queue of their own,
and a started cluster (one worker with two processes, one beat). Helpers live in
``faults_support``."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("faults_support")

from faults_support import fault_settings, started  # noqa: E402


@pytest.fixture
def fsettings(settings):
    return fault_settings(settings)


@pytest.fixture
def cluster(fsettings):
    """One worker (concurrency 2) on the test's queue and one beat, started and ready;
    every process is stopped (with its process group) when the test ends."""
    with started(fsettings) as c:
        yield c
