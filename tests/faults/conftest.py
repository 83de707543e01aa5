"""Fixtures of the fault tests: settings with short leases and a queue of their own,
a started cluster (one worker with two processes, one beat), and a RabbitMQ server with
a virtual host per test. Helpers live in ``faults_support``."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import pytest

from qcelery.embedded import EmbeddedMongo, free_port, port_open

pytest.register_assert_rewrite("faults_support")

from faults_support import fault_settings, rabbitmqctl, started  # noqa: E402 - after its assert rewrite is registered


@pytest.fixture
def fsettings(settings):
    return fault_settings(settings)


@pytest.fixture
def own_mongo(tmp_path):
    """A SecantusDB of the test's own, which the test may stop, kill and start again."""
    server = EmbeddedMongo(tmp_path / "mongo", port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def cluster(fsettings):
    """One worker (concurrency 2) on the test's queue and one beat, started and ready;
    every process is stopped (with its process group) when the test ends."""
    with started(fsettings) as c:
        yield c


HOST, PORT = "127.0.0.1", 5672


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
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield f"{rabbitmq}/{name}"
    rabbitmqctl("delete_vhost", name)
