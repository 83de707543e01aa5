"""Redis stopped in the middle of a batch (its queue and the chord's counter are lost)
and started again on the same port: workers and beat reconnect, the sweep re-publishes
the tasks whose messages were lost, the batch is re-checked by beat (its chord can no
longer fire), and every task still runs to completion exactly once."""

from __future__ import annotations

import time

import pytest
from faults_support import POOL, assert_exactly_once, enqueue_probes, fault_settings, probe_defs, started, wait_batch, wait_for

from qcelery.beat import BEAT_LOG
from qcelery.embedded import EmbeddedRedis, free_port
from qcelery.manage import TaskManager


@pytest.fixture
def own_redis(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", port=free_port()).start()
    yield server
    server.stop()


def test_redis_restart_mid_batch_loses_the_queue_and_the_sweep_republishes(settings, own_redis, tmp_path):
    """Fault: Redis (no persistence) is stopped mid-batch, losing the queued messages and the
    chord's counter, and started again. Proves: beat's sweep re-publishes the lost tasks and
    re-checks the batch, each task and the aggregation complete exactly once."""
    fs = fault_settings(settings, broker_url=own_redis.url)
    tm = TaskManager(POOL, fs)
    with started(fs) as cluster:
        bid = enqueue_probes(probe_defs(20, sleep=0.3), fs)
        wait_for(lambda: tm.task_stat().get("done", 0) >= 4, what="4 tasks done")

        own_redis.stop()  # no persistence: the queued messages and the chord counter are gone
        waiting_when_stopped = tm.task_stat().get("waiting", 0)
        time.sleep(1.0)
        own_redis.start()

        batch = wait_batch(tm, bid, timeout=90)

        assert waiting_when_stopped > 0
        assert_exactly_once(fs, tm, batch)
        assert tm.db[BEAT_LOG].count_documents({"job": "sweep", "republished": {"$gte": 1}}) >= 1
        assert all(p.alive() for p in cluster.procs)  # reconnected, not restarted
