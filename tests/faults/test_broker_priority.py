"""Broker message priority, on Redis and on RabbitMQ: with a backlog queued before the
only worker (one process) starts, a batch enqueued with ``priority`` runs before an
older batch of priority 0, and tasks raised by ``qcelery prioritize`` (re-published at
their new priority) run before both. Order is read from the task function's own
records (a file), each task completes once, and both batches aggregate."""

from __future__ import annotations

import pytest
from cli_support import cli_env, qcelery
from faults_support import POOL, assert_aggregated_once, counted_aggregation, fault_settings, running, wait_batch
from side_effects import FILE_COUNTED, file_runs, start_order

from qcelery.celery_app import app_for
from qcelery.manage import TaskManager
from qcelery.producer import enqueue


def defs(prefix: str, n: int) -> list[dict]:
    return [{"key": f"{prefix}{i}", "sleep": 0.05} for i in range(n)]


@pytest.fixture(params=["redis", "rabbitmq"])
def bsettings(request, settings, servers):
    """Fault settings on the test's broker (RabbitMQ: a virtual host of its own, Redis
    results); no sweep within the test, so every message is one the test sent."""
    broker = {}
    if request.param == "rabbitmq":
        broker = {"broker_url": request.getfixturevalue("vhost"), "result_backend": servers.broker_url}
    return fault_settings(settings, **FILE_COUNTED, sweep_after=3600.0, **broker)


def test_higher_priority_runs_first_from_a_backlog(bsettings, tmp_path):
    """Injects a backlog of mixed priorities ahead of a single worker process; proves the
    broker hands out enqueue and prioritize priorities highest first."""
    fs = bsettings
    tm = TaskManager(POOL, fs)
    with running(fs) as cluster:
        low = enqueue(defs("low", 8), POOL, settings=fs, aggregate=counted_aggregation())
        high = enqueue(defs("high", 3), POOL, settings=fs, priority=5, aggregate=counted_aggregation())
        raised = [str(t["_id"]) for t in tm.query({"filter.key": {"$in": ["low6", "low7"]}}, decode=False)]
        r = qcelery("prioritize", "8", *raised, "--pool", POOL, cwd=tmp_path, env=cli_env(fs))
        assert r.returncode == 0, r.stderr
        assert "2 waiting re-published" in r.stdout

        cluster.start_worker(fs.default_queue, concurrency=1)
        cluster.wait_ready(app_for(fs))
        for bid in (low, high):
            assert_aggregated_once(fs, wait_batch(tm, bid))

    order = start_order(fs)
    assert len(order) == 11, order
    assert set(order[:2]) == {"low6", "low7"}, order
    assert set(order[2:5]) == {"high0", "high1", "high2"}, order
    assert set(order[5:]) == {f"low{i}" for i in range(6)}, order
    assert set(file_runs(fs)["done"].values()) == {1}
