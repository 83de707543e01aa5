"""Several processes on one pool at once: each task claimed exactly once, each task
created exactly once.

Every process is started with the 'spawn' context (a fresh interpreter, no inherited
sockets) and builds its own ``TaskManager`` from the same ``Settings``; a barrier
makes them start their loops together. The claim races run once per claim path.
"""

from __future__ import annotations

import multiprocessing as mp
import random
from collections import Counter

import pytest
from claims_support import DEFAULT_CLAIM_PATH, each_claim_path, with_claim_path

from qcelery.manage import TaskManager
from qcelery.settings import Settings

N_TASKS = 1_000
#: tasks of the fetch_task race per claim path: SecantusDB reads the whole pool to answer
#: each sorted findAndModify, so that path races over fewer tasks (real MongoDB reads one)
N_FETCHED = {"two_step": N_TASKS, "find_one_and_update": 300}
N_WORKERS = 4
CTX = mp.get_context("spawn")


def make_defs(n: int) -> list[dict]:
    return [{"model": {"class": "LGBModel", "kwargs": {"num_leaves": 32 + i % 7}}, "window": i} for i in range(n)]


@pytest.fixture
def claim_strategy() -> str:
    return DEFAULT_CLAIM_PATH


@pytest.fixture
def settings(settings, claim_strategy):
    return with_claim_path(settings, claim_strategy)


# ---------------------------------------------------------- child process bodies
def claim_by_id(settings: dict, pool: str, ids: list, seed: int, barrier, out) -> None:
    tm = TaskManager(pool, Settings(**settings))
    order = list(ids)
    random.Random(seed).shuffle(order)
    me = f"worker-{seed}"
    barrier.wait()
    won = [str(i) for i in order if tm.claim(i, worker=me, decode=False) is not None]
    out.put((me, won))


def claim_by_fetch(settings: dict, pool: str, seed: int, barrier, out) -> None:
    tm = TaskManager(pool, Settings(**settings))
    barrier.wait()
    won = []
    while (task := tm.fetch_task()) is not None:
        won.append(str(task["_id"]))
    out.put((f"worker-{seed}", won))


def produce(settings: dict, pool: str, n: int, barrier, out) -> None:
    tm = TaskManager(pool, Settings(**settings))
    defs = make_defs(n)
    barrier.wait()
    out.put([str(i) for i in tm.create_task(defs)])


def run_children(target, args_of, n: int) -> list:
    barrier, out = CTX.Barrier(n), CTX.Queue()
    procs = [CTX.Process(target=target, args=(*args_of(k), barrier, out)) for k in range(n)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


def child_settings(settings: Settings) -> dict:
    return settings.model_dump()


# --------------------------------------------------------------------------- tests
@each_claim_path
@pytest.mark.timeout(300)
def test_four_processes_claiming_by_id_in_shuffled_order_claim_each_task_once(settings, mongo_db):
    tm = TaskManager("pool", settings)
    ids = tm.create_task(make_defs(N_TASKS))
    s = child_settings(settings)
    results = run_children(claim_by_id, lambda k: (s, "pool", [str(i) for i in ids], k), N_WORKERS)

    claims = Counter(i for _, won in results for i in won)
    assert len(claims) == N_TASKS and set(claims.values()) == {1}
    assert set(claims) == {str(i) for i in ids}
    owner = {i: me for me, won in results for i in won}
    for d in tm.task_pool.find({}, {"status": 1, "attempt": 1, "worker": 1}):
        assert d["status"] == "running" and d["attempt"] == 1
        assert d["worker"] == owner[str(d["_id"])]


@each_claim_path
@pytest.mark.timeout(300)
def test_four_processes_in_fetch_task_loops_claim_each_task_once(settings, mongo_db, claim_strategy):
    n = N_FETCHED[claim_strategy]
    tm = TaskManager("pool", settings)
    ids = tm.create_task(make_defs(n))
    s = child_settings(settings)
    results = run_children(claim_by_fetch, lambda k: (s, "pool", k), N_WORKERS)

    claims = Counter(i for _, won in results for i in won)
    assert len(claims) == n and set(claims.values()) == {1}
    assert set(claims) == {str(i) for i in ids}
    assert tm.task_stat() == {"running": n}
    assert tm.task_pool.count_documents({"attempt": 1}) == n


@pytest.mark.timeout(300)
def test_two_producers_creating_the_same_tasks_at_once_make_one_document_each(settings, mongo_db):
    tm = TaskManager("pool", settings)
    s = child_settings(settings)
    first, second = run_children(produce, lambda k: (s, "pool", N_TASKS), 2)

    assert first == second
    assert len(set(first)) == N_TASKS
    assert tm.task_pool.count_documents({}) == N_TASKS
    # both lists are in input order: the i-th id is the i-th definition's task
    windows = {str(d["_id"]): d["filter"]["window"] for d in tm.task_pool.find({}, {"filter.window": 1})}
    assert [windows[i] for i in first] == list(range(N_TASKS))
