"""The happy path with RabbitMQ as broker and Redis as result backend: a batch runs
on a worker and a beat talking AMQP, each task once, one aggregation. (The RabbitMQ
server and the test's own virtual host come from the ``rabbitmq``/``vhost`` fixtures.)"""

from __future__ import annotations

from faults_support import POOL, assert_exactly_once, enqueue_probes, fault_settings, probe_defs, started, wait_batch
from kombu import Connection

from qcelery.celery_app import CONTROL_QUEUE
from qcelery.manage import TaskManager


def test_batch_on_rabbitmq_with_redis_results_runs_each_task_once(settings, servers, vhost):
    """Fault: none (the broker is RabbitMQ, results in Redis). Proves: the messages go through
    the AMQP queues of the test's vhost and each task and the aggregation complete once."""
    fs = fault_settings(settings, broker_url=vhost, result_backend=servers.broker_url)
    tm = TaskManager(POOL, fs)
    with started(fs):
        bid = enqueue_probes(probe_defs(12, sleep=0.05), fs)

        batch = wait_batch(tm, bid)

        assert_exactly_once(fs, tm, batch)
        # the messages went through RabbitMQ: both queues live in the test's vhost, drained
        with Connection(vhost) as conn:
            for name in (fs.default_queue, CONTROL_QUEUE):
                _, messages, consumers = conn.default_channel.queue_declare(queue=name, passive=True)
                assert consumers == 1
                assert name != fs.default_queue or messages == 0
