"""Whatever bytes reach a worker's queue, the worker stays up and keeps serving.

Malformed bytes, foreign messages (another Celery app's task, a plain JSON object),
task messages with wrong arguments and multi-megabyte bodies are pushed straight into
the queue of a running worker, on Redis (raw list entries and kombu envelopes) and on
RabbitMQ (raw AMQP bodies with any content type), plus malformed broadcast messages
(remote control, worker events). Each is refused with one log line (no traceback) and
dropped; then a real batch runs each task once and aggregates once, served by the same
worker process.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

import amqp
import pytest
import redis
from faults_support import POOL, assert_exactly_once, fault_settings, probe_defs, started, wait_batch, wait_for
from kombu import Exchange, Producer

from qcelery.broker import MAX_MESSAGE_BYTES, REFUSED
from qcelery.celery_app import app_for
from qcelery.manage import TaskManager
from qcelery.producer import enqueue
from qcelery.settings import Settings

MB = 1024 * 1024


@dataclass
class Published:
    """A message as kombu's Producer sends it: ``body`` bytes with a content type and headers."""

    what: str
    body: bytes
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    headers: dict = field(default_factory=dict)


def _task_headers(task: str, **extra: object) -> dict:
    return {"lang": "py", "task": task, "id": str(uuid.uuid4()), "root_id": None, "parent_id": None, "group": None, **extra}


def _task_body(args: object, kwargs: object = None, embed: object = None) -> bytes:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None} if embed is None else embed
    return json.dumps([args, kwargs if kwargs is not None else {}, embed]).encode()


PUBLISHED = [
    Published("not JSON", b"this is {not json"),
    Published("not JSON, task header", b"this is {not json", headers=_task_headers("qcelery.execute")),
    Published("not UTF-8", b"\xff\xfe\x00\x81 binary", headers=_task_headers("qcelery.execute")),
    Published("plain JSON object", b'{"hello": "world"}'),
    Published("plain JSON object, task header", b'{"hello": "world"}', headers=_task_headers("qcelery.execute")),
    Published("another app's task", _task_body([1, 2]), headers=_task_headers("proj.tasks.add")),
    Published("another app's task, no id", _task_body([1, 2]), headers={"task": "proj.tasks.add"}),
    Published("execute without arguments", _task_body([]), headers=_task_headers("qcelery.execute")),
    Published("execute with wrong types", _task_body([123, {"x": 1}, None]), headers=_task_headers("qcelery.execute")),
    Published("aggregate with five arguments", _task_body(["a", "b", "c", "d", "e"]), headers=_task_headers("qcelery.aggregate")),
    Published("execute with an unknown keyword", _task_body(["p", "t"], {"nope": 1}), headers=_task_headers("qcelery.execute")),
    Published("body not [args, kwargs, embed]", b'"just a string"', headers=_task_headers("qcelery.execute")),
    Published("bad time limit header", _task_body(["p", "t"]), headers=_task_headers("qcelery.execute", timelimit="soon")),
    Published("pickle", b"\x80\x04K\x01.", content_type="application/x-python-serialize", headers=_task_headers("qcelery.execute")),
    Published("text/plain", b"hello", content_type="text/plain", headers=_task_headers("qcelery.execute")),
    Published("oversized", _task_body(["p", "x" * (5 * MB)]), headers=_task_headers("qcelery.execute")),
]


def _envelope(queue: str, body: str, **props: object) -> dict:
    properties = {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4()), "delivery_info": {"exchange": queue, "routing_key": queue}}
    properties.update(props)
    return {"body": body, "content-encoding": "utf-8", "content-type": "application/json", "headers": {}, "properties": properties}


def _redis_raw(queue: str) -> list[tuple[str, bytes]]:
    """List entries that are not kombu envelopes at all (only Redis has that layer)."""
    good_body = base64.b64encode(_task_body(["p", "t"])).decode()
    return [
        ("raw: not JSON", b"this is {not json"),
        ("raw: not UTF-8", b"\xff\xfe{\x81"),
        ("raw: plain JSON object", b'{"hello": "world"}'),
        ("raw: JSON list", b"[1, 2, 3]"),
        ("raw: envelope without delivery_info", json.dumps(_envelope(queue, good_body, delivery_info=None)).encode()),
        ("raw: body not base64", json.dumps(_envelope(queue, "!!! not base64 ***")).encode()),
        ("raw: oversized", b"{" + b"x" * (4 * MB)),
    ]


def _redis_broadcast(settings: Settings) -> int:
    """Messages PUBLISHed on the Redis channels of Celery's broadcast exchanges: remote
    control (``celery.pidbox``, read by every worker) and the workers' events
    (``celeryev``: read by Celery's gossip, which stopped the worker on an event that is
    not an object; qcelery workers no longer read them, so those make no line). Returns
    how many make a refusal line."""
    db = urlsplit(settings.broker_url).path.strip("/") or "0"
    body_list = base64.b64encode(b"[1, 2]").decode()
    pidbox, events = f"/{db}.celery.pidbox", f"/{db}.celeryev/worker.heartbeat"
    client = redis.Redis.from_url(settings.broker_url)
    try:
        for data in (b'{"hello": "world"}', json.dumps(_envelope("celery.pidbox", body_list)).encode()):
            assert client.publish(pidbox, data) >= 1, f"nobody listens on {pidbox}"
        client.publish(events, json.dumps(_envelope("celeryev", body_list)).encode())
    finally:
        client.close()
    return 2


def _amqp_raw(settings: Settings, queue: str) -> int:
    """AMQP messages kombu's Producer would not send: no content type, header values of
    AMQP's own types (bytes, a timestamp), a body of random bytes. Published with
    py-amqp to the default exchange, straight into the queue. Returns how many."""
    parts = urlsplit(settings.broker_url)
    conn = amqp.Connection(f"{parts.hostname}:{parts.port}", userid=parts.username, password=parts.password, virtual_host=parts.path[1:])
    conn.connect()
    try:
        channel = conn.channel()
        messages = [
            amqp.Message(b"no content type at all"),
            amqp.Message(b"\x00\x01\x02" * 1000, application_headers={"task": b"qcelery.execute", "id": 7}),
            amqp.Message(
                _task_body(["p", "t"]),
                content_type="application/json",
                application_headers={"task": "qcelery.execute", "id": datetime.now()},
            ),
        ]
        for m in messages:
            channel.basic_publish(m, exchange="", routing_key=queue)
        # a worker event that is not an object, to every worker (no refusal line: no
        # qcelery worker reads events; before, Celery's gossip did and stopped on it)
        channel.basic_publish(amqp.Message(b"[1, 2]", content_type="application/json"), exchange="celeryev", routing_key="worker.heartbeat")
        channel.close()
    finally:
        conn.close()
    return len(messages)


def _publish(settings: Settings, queue: str, messages: list[Published]) -> None:
    # the app's connection: its Redis transport options (key separator, priorities)
    with app_for(settings).connection_for_write() as conn:
        producer = Producer(conn.default_channel)
        for m in messages:
            producer.publish(
                m.body,
                exchange=Exchange(queue, type="direct"),
                routing_key=queue,
                content_type=m.content_type,
                content_encoding=m.content_encoding,
                headers=m.headers,
                serializer=None,
            )


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_settings(request, settings, servers) -> Settings:
    if request.param == "redis":
        return fault_settings(settings)
    vhost = request.getfixturevalue("vhost")
    return fault_settings(settings, broker_url=vhost, result_backend=servers.broker_url)


def test_worker_refuses_malformed_foreign_and_oversized_messages_and_keeps_serving(broker_settings):
    fs = broker_settings
    queue = fs.default_queue
    tm = TaskManager(POOL, fs)
    on_redis = fs.broker_url.startswith("redis://")
    with started(fs) as cluster:
        worker = next(p for p in cluster.procs if p.name.startswith("worker"))
        pid = worker.pid
        raw = _redis_raw(queue) if on_redis else []
        if raw:
            client = redis.Redis.from_url(fs.broker_url)
            for _, data in raw:
                client.lpush(queue, data)
            client.close()
        _publish(fs, queue, PUBLISHED)
        n_bad = len(raw) + len(PUBLISHED) + (_redis_broadcast(fs) if on_redis else _amqp_raw(fs, queue))

        def refusals() -> list[str]:
            log = worker.log.read_text(errors="replace")
            assert worker.alive(), f"the worker exited with {worker.popen.returncode}:\n{log[-3000:]}"
            return [ln for ln in log.splitlines() if REFUSED in ln]

        wait_for(lambda: len(refusals()) >= n_bad, timeout=90, what=f"{n_bad} refusals in {worker.log}")

        bid = enqueue(probe_defs(8, sleep=0.05), POOL, settings=fs)
        batch = wait_batch(tm, bid)

        assert_exactly_once(fs, tm, batch)
        assert worker.alive() and worker.pid == pid
        lines = refusals()
        assert len(lines) == n_bad, "\n".join(lines)
        assert all(f"queue {queue!r}" in ln or "'celery.pidbox'" in ln for ln in lines), "\n".join(lines)
        log = worker.log.read_text(errors="replace")
        assert "Traceback" not in log and "Unrecoverable" not in log
        # one line each, short even for the multi-megabyte bodies
        assert max(len(ln) for ln in lines) < 600
        assert any(f"more than {MAX_MESSAGE_BYTES} bytes" in ln for ln in lines)
