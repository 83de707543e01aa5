"""A task that holds its RabbitMQ message longer than the server's ``consumer_timeout``.

RabbitMQ closes the channel of a consumer whose unacknowledged delivery outlives
``consumer_timeout`` (30 minutes by default), and a worker acknowledges a message only
when its task ends (``acks_late``): a long training run trips it. Celery stops the
worker on that channel error ("Unrecoverable error: PreconditionFailed") unless
``broker_channel_error_retry`` is on. With qcelery's settings the worker reconnects, the
task keeps running under its Mongo lease and commits once, the redelivered message finds
it running and does nothing, and the batch aggregates once.

The server's timeout is shortened here to 3 s, checked every 0.5 s (``rabbitmqctl
eval``, as RabbitMQ's own tests do), and restored afterwards."""

from __future__ import annotations

import pytest
from faults_support import POOL, assert_exactly_once, enqueue_probes, fault_settings, probe_defs, rabbitmqctl, started, wait_batch

from qcelery.manage import TaskManager

TIMEOUT_MS = 3000


def _env(key: str) -> str:
    return rabbitmqctl("eval", f"application:get_env(rabbit, {key}).").strip()


def _restore(key: str, saved: str) -> None:
    if saved.startswith("{ok,"):
        rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {saved[4:-1]}).")
    else:
        rabbitmqctl("eval", f"application:unset_env(rabbit, {key}).")


@pytest.fixture
def short_consumer_timeout(rabbitmq):
    saved = {k: _env(k) for k in ("consumer_timeout", "channel_tick_interval")}
    rabbitmqctl("eval", f"application:set_env(rabbit, consumer_timeout, {TIMEOUT_MS}).")
    rabbitmqctl("eval", "application:set_env(rabbit, channel_tick_interval, 500).")
    try:
        yield TIMEOUT_MS
    finally:
        for key, value in saved.items():
            _restore(key, value)


def test_a_task_outliving_the_consumer_timeout_runs_once_and_the_worker_stays(settings, servers, vhost, short_consumer_timeout):
    """Fault: RabbitMQ closes the worker's channel because a task holds its message past the
    consumer timeout (3 s here). Proves: the task and the aggregation complete exactly once
    and the worker reconnects and keeps serving the queue instead of stopping."""
    fs = fault_settings(settings, broker_url=vhost, result_backend=servers.broker_url)
    tm = TaskManager(POOL, fs)
    with started(fs) as cluster:
        worker = next(p for p in cluster.procs if p.name.startswith("worker"))
        # one task holds its message 4x the timeout; the others are quick
        bid = enqueue_probes(probe_defs(1, prefix="long", sleep=4 * TIMEOUT_MS / 1000) + probe_defs(4, prefix="short"), fs)
        batch = wait_batch(tm, bid, timeout=120)
        assert_exactly_once(fs, tm, batch)

        log = worker.log.read_text(errors="replace")
        assert "delivery acknowledgement on channel" in log and "timed out" in log  # the timeout did fire
        assert "Unrecoverable error" not in log
        assert worker.alive()

        # the reconnected worker keeps serving the queue
        again = enqueue_probes(probe_defs(3, prefix="after"), fs)
        assert_exactly_once(fs, tm, wait_batch(tm, again))
