"""The happy path with RabbitMQ as broker and Redis as result backend: a batch runs
on a worker and a beat talking AMQP, each task once, one aggregation.

Each test gets a RabbitMQ virtual host of its own (the control queue has a fixed name,
so parallel runs on one server would otherwise take each other's messages)."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import pytest
from kombu import Connection

from qcelery.celery_app import CONTROL_QUEUE
from qcelery.embedded import port_open
from qcelery.manage import TaskManager
from qcelery.producer import enqueue

from faults_support import POOL, assert_exactly_once, fault_settings, probe_defs, started, wait_batch

HOST, PORT = "127.0.0.1", 5672


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def rabbitmq():
    """A RabbitMQ server on 127.0.0.1:5672: the machine's, else one started from
    Debian's package (installed with apt-get when missing)."""
    if not port_open(HOST, PORT):
        if shutil.which("rabbitmq-server") is None:
            env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-qq", "rabbitmq-server"], check=True, env=env, timeout=600)
        subprocess.run(["rabbitmq-server", "-detached"], check=True, timeout=60)
        deadline = time.monotonic() + 90
        while not port_open(HOST, PORT):
            assert time.monotonic() < deadline, "rabbitmq-server did not listen on 5672 within 90 s"
            time.sleep(0.5)
    return f"amqp://guest:guest@{HOST}:{PORT}"


@pytest.fixture
def vhost(rabbitmq):
    name = f"qcelery-test-{uuid.uuid4().hex[:8]}"
    _ctl("add_vhost", name)
    _ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield f"{rabbitmq}/{name}"
    _ctl("delete_vhost", name)


def test_batch_on_rabbitmq_with_redis_results_runs_each_task_once(settings, servers, vhost):
    fs = fault_settings(settings, broker_url=vhost, result_backend=servers.broker_url)
    tm = TaskManager(POOL, fs)
    with started(fs) as cluster:
        bid = enqueue(probe_defs(12, sleep=0.05), POOL, settings=fs)

        batch = wait_batch(tm, bid)

        assert_exactly_once(fs, tm, batch)
        # the messages went through RabbitMQ: both queues live in the test's vhost, drained
        with Connection(vhost) as conn:
            for name in (fs.default_queue, CONTROL_QUEUE):
                _, messages, consumers = conn.default_channel.queue_declare(queue=name, passive=True)
                assert consumers == 1
                assert name != fs.default_queue or messages == 0
