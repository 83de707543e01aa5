"""Fixtures of the multi-host tests: hosts made of network namespaces (root needed; CI
runs as root). Helpers live in ``hosts_support``."""

from __future__ import annotations

import os

import pytest

pytest.register_assert_rewrite("hosts_support")


@pytest.fixture(autouse=True)
def _root() -> None:
    # not a skip: without root these tests cannot prove anything, so they fail loudly
    assert os.geteuid() == 0, "the multi-host tests build network namespaces and must run as root (CI does)"
