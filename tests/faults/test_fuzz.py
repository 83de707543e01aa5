"""A seeded fuzz run against a live worker and beat (issue 12.7).

Fault injected: random bytes, random JSON and random well-formed-but-wrong task
messages pushed straight into the worker's Redis queue, random corruptions of some task
documents (counters, statuses and definitions of the wrong type or no meaning) and of
another batch's aggregation spec. Property proved: the worker and beat are the same
live processes afterwards; every untouched task ran to completion exactly once (the
probe's own records); every corrupted task is ``failed`` with a reason; both batches
are aggregated once; no collection was created by any of it.

The seed is fixed (set ``QCELERY_FUZZ_SEED`` to try others); every loop is bounded.
"""

from __future__ import annotations

import base64
import json
import os
import random
import uuid
from collections.abc import Callable
from typing import Any

import redis
from bson import Binary, ObjectId
from faults_support import (
    POOL,
    assert_aggregated_once,
    enqueue_probes,
    fault_settings,
    probe_defs,
    probe_runs,
    started,
    wait_batch,
    wait_for,
)

from qcelery import batch as batches
from qcelery import status as st
from qcelery.broker import REFUSED
from qcelery.celery_app import redis_list
from qcelery.manage import TaskManager
from qcelery.producer import enqueue

SEED = int(os.environ.get("QCELERY_FUZZ_SEED", "20261130"))
N_MESSAGES = 60
N_TASKS, N_CORRUPT = 12, 5


def _junk(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value."""
    kind = rng.randrange(7 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.randint(-(2**40), 2**40)
    if kind == 3:
        return rng.random() * 10 ** rng.randint(-3, 20)
    if kind == 4:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 40)))
    if kind == 5:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    # keys Mongo stores as they are (no '$' or '.')
    return {"".join(rng.choices("abkz_", k=rng.randint(1, 5))): _junk(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


def _word(rng: random.Random) -> str:
    return "".join(rng.choices("abcxyz!-", k=rng.randint(1, 6)))


def _not_a_number(rng: random.Random) -> Any:
    makers: list[Callable[[], Any]] = [lambda: _word(rng), lambda: [rng.randint(0, 3)], lambda: {"n": 1}, lambda: None, lambda: True]
    return rng.choice(makers)()


def _not_a_definition(rng: random.Random) -> Any:
    """A ``def`` that is no pickled task definition: random bytes or a bare JSON value."""
    makers: list[Callable[[], Any]] = [
        lambda: Binary(rng.randbytes(rng.randrange(1, 200))), lambda: _word(rng), lambda: rng.randint(-5, 5), lambda: [_word(rng)],
    ]  # fmt: skip
    return rng.choice(makers)()


def _envelope(queue: str, body: bytes, headers: dict | None = None) -> bytes:
    props = {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4()), "delivery_info": {"exchange": queue, "routing_key": queue}}
    doc = {"body": base64.b64encode(body).decode(), "content-encoding": "utf-8", "content-type": "application/json",
           "headers": headers or {}, "properties": props}  # fmt: skip
    return json.dumps(doc).encode()


def _random_message(rng: random.Random, queue: str) -> bytes:
    """Random bytes, random JSON, or a kombu envelope around a wrong task message."""
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 3000))
    if kind == 1:
        return json.dumps(_junk(rng)).encode()
    task = rng.choice(["qcelery.execute", "qcelery.aggregate", "qcelery.recover", "proj.add", str(_junk(rng, 3))])
    headers = {"lang": "py", "task": task, "id": str(uuid.uuid4())}
    if kind == 2:  # wrong arguments for a real task name
        args = [_junk(rng) for _ in range(rng.randrange(0, 6))]
        body = json.dumps([args, {} if rng.random() < 0.7 else _junk(rng), {}]).encode()
    else:  # ids of things that do not exist, or a well-formed one of another pool
        pool = rng.choice([POOL, "ghost_pool", "handler_cache.files", "qcelery_batches", ".."])
        body = json.dumps([[pool, str(ObjectId()), rng.choice([None, str(ObjectId())])], {}, {}]).encode()
    return _envelope(queue, body, headers)


CORRUPTIONS: list[tuple[str, Callable[[random.Random], Any]]] = [
    ("attempt", _not_a_number),
    ("status", lambda rng: rng.choice(["bogus", "", "DONE", "runing", "\x00"]) + str(rng.randint(0, 9))),
    ("def", _not_a_definition),
]


def test_random_messages_and_corrupt_documents_leave_workers_serving_and_every_task_settled(settings, tmp_path):
    rng = random.Random(SEED)
    fs = fault_settings(settings)
    tm = TaskManager(POOL, fs)
    queue = fs.default_queue
    bid = enqueue_probes(probe_defs(N_TASKS, "f", sleep=0.05), fs)
    corrupt: dict[str, tuple[str, Any]] = {}
    for key in rng.sample([f"f{i}" for i in range(N_TASKS)], N_CORRUPT):
        field, make = rng.choice(CORRUPTIONS)
        value = make(rng)
        assert tm.task_pool.update_one({"filter.key": key}, {"$set": {field: value}}).modified_count == 1
        corrupt[key] = (field, value)
    # another batch whose aggregation spec is junk: its summary must say so, once
    other = enqueue(probe_defs(2, "o"), POOL, settings=fs)
    junk_spec = rng.choice([[_junk(rng)], {"func": _word(rng)}, {"func": f"{_word(rng)}.{_word(rng)}"}, _word(rng)])
    tm.db[batches.COLLECTION].update_one({"_id": ObjectId(other)}, {"$set": {"aggregate": junk_spec}})
    collections_before = set(tm.db.list_collection_names())

    client = redis.Redis.from_url(fs.broker_url)
    with started(fs, concurrency=2) as cluster:
        worker, beat = cluster.procs
        pids = (worker.pid, beat.pid)
        for _ in range(N_MESSAGES):
            client.lpush(rng.choice([queue, redis_list(queue), "qcelery"]), _random_message(rng, queue))
        batch = wait_batch(tm, bid, timeout=180)
        other_batch = wait_batch(tm, other, timeout=180)
        wait_for(lambda: all(client.llen(q) == 0 for q in (queue, redis_list(queue))), timeout=60, what="the queues drained")
        assert worker.alive() and beat.alive() and (worker.pid, beat.pid) == pids, f"seed {SEED}"
        log = worker.log.read_text(errors="replace")
    client.close()

    statuses = {d["filter"]["key"]: d for d in tm.task_pool.find({"batch_ids": ObjectId(bid)})}
    runs = probe_runs(fs)
    for key, doc in statuses.items():
        if key in corrupt:
            assert doc["status"] == st.FAILED and doc.get("error"), (SEED, key, corrupt[key], doc.get("status"), doc.get("error"))
        else:
            assert doc["status"] == st.DONE and runs["done"][key] == 1, (SEED, key, doc["status"], runs["done"][key])
    assert_aggregated_once(fs, batch)
    assert {f["task_id"] for f in batch["summary"]["failures"]} == {str(statuses[k]["_id"]) for k in corrupt}
    assert other_batch["state"] == batches.AGGREGATED and other_batch["summary"].get("aggregate_error"), other_batch["summary"]
    assert set(tm.db.list_collection_names()) <= collections_before | {"qcelery_beat_log", "qcelery_workers", "qcelery_probe_runs",
                                                                       "qcelery_probe_aggregations", "qcelery_locks"}  # fmt: skip
    assert "Unrecoverable" not in log, f"seed {SEED}"
    assert log.count(REFUSED) >= N_MESSAGES // 2, f"seed {SEED}: only {log.count(REFUSED)} messages refused"
