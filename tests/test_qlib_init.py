"""A workflow's ``qlib_init`` (issue 13.1), with real pyqlib on a provider directory the
test writes (Qlib's binary layout, no download).

* it travels with its batch: every Celery worker process calls ``qlib.init`` once before
  its first task of the batch, and again only for a batch naming another config, and the
  task function reads the provider's data through ``qlib.data.D``;
* the in-process trainers do the same;
* a refused or malformed ``qlib_init`` is one clear error before anything is written;
* with ``qlib_init`` and no ``calendar:``, the generators roll on the provider's own
  trading calendar (``day.txt`` plus ``day_future.txt``), not on an exchange's.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from qlib_support import INSTRUMENT, PROBE, write_provider

from qcelery import batch as batches
from qcelery.celery_app import app_for
from qcelery.cluster import Cluster
from qcelery.config import load_workflow
from qcelery.errors import ConfigError, ModuleNotAllowedError, TaskTypeError
from qcelery.exp import get_experiment
from qcelery.gen import task_generator
from qcelery.manage import TaskManager
from qcelery.producer import enqueue
from qcelery.qlib_bridge import init_count
from qcelery.trainer import DelayTrainerR, DelayTrainerRM, TrainerR, TrainerRM

TESTS = Path(__file__).resolve().parent


def _provider(root: Path, n_days: int, close_start: float) -> dict:
    """``qlib_init`` of a provider of ``n_days`` business days from 2020-01-01."""
    write_provider(root, pd.bdate_range("2020-01-01", periods=n_days), close_start=close_start)
    return {"provider_uri": str(root), "region": "cn"}


@pytest.fixture
def qlib_settings(settings):
    """The test's settings running the probe: its module allowed, a queue of its own."""
    return settings.model_copy(
        update={"allowed_modules": ["qlib_support"], "task_func": PROBE, "default_queue": f"qlib-{uuid.uuid4().hex[:8]}"}
    )


@pytest.fixture
def one_worker(qlib_settings):
    """One worker with one pool process, so every task of the test runs in the same process."""
    cluster = Cluster(qlib_settings, extra_env={"PYTHONPATH": str(TESTS)})
    try:
        cluster.start_worker(qlib_settings.default_queue, concurrency=1)
        cluster.wait_ready(app_for(qlib_settings), timeout=120)
        yield cluster
    finally:
        for proc in reversed(cluster.procs):
            proc.stop(timeout=20)
        cluster.procs.clear()


def _run_batch(tm: TaskManager, settings, keys: list[str], qlib_init: dict | None) -> list[dict]:
    """Enqueue one probe task per key as a batch with ``qlib_init``; their results, in key order."""
    bid = enqueue([{"key": k} for k in keys], tm.name, settings=settings, qlib_init=qlib_init)
    deadline = time.monotonic() + 180
    while batches.outstanding(tm, batches.load(tm.db, bid)):
        assert time.monotonic() < deadline, f"batch {bid} not done within 180 s: {batches.progress(tm, batches.load(tm.db, bid))}"
        time.sleep(0.2)
    done = {t["def"]["key"]: t for t in tm.query({"batch_ids": batches.load(tm.db, bid)["_id"]})}
    assert {t["status"] for t in done.values()} == {"done"}, {k: t.get("error") for k, t in done.items()}
    return [done[k]["res"] for k in keys]


def test_worker_initialises_qlib_once_per_process_and_config(qlib_settings, one_worker, tmp_path):
    tm = TaskManager("qlib_probe", qlib_settings)
    a = _provider(tmp_path / "provider_a", 30, close_start=10.0)
    b = _provider(tmp_path / "provider_b", 45, close_start=100.0)

    first = _run_batch(tm, qlib_settings, ["a0", "a1"], a)
    # the task function reads provider a through Qlib's D: its calendar and its data
    assert [r["calendar"] for r in first] == [30, 30]
    assert [r["last_close"] for r in first] == [39.0, 39.0]
    assert {r["provider"] for r in first} == {a["provider_uri"]}
    # one process ran both, and initialised Qlib once for them
    assert first[0]["pid"] == first[1]["pid"]
    assert [r["inits"] for r in first] == [1, 1]

    # another config: initialised again, in the same process, before its first task
    second = _run_batch(tm, qlib_settings, ["b0", "b1"], b)
    assert [r["calendar"] for r in second] == [45, 45]
    assert [r["last_close"] for r in second] == [144.0, 144.0]
    assert {r["pid"] for r in second} == {first[0]["pid"]}
    assert [r["inits"] for r in second] == [2, 2]

    # the same config as the last: nothing to do
    third = _run_batch(tm, qlib_settings, ["b2"], dict(b))
    assert third[0]["calendar"] == 45 and third[0]["inits"] == 2


def test_refused_qlib_init_writes_nothing(qlib_settings, tmp_path):
    tm = TaskManager("qlib_refused", qlib_settings)
    hostile = {"provider_uri": str(tmp_path), "exp_manager": {"class": "system", "module_path": "os", "kwargs": {}}}
    with pytest.raises(ModuleNotAllowedError, match=r"exp_manager.*'os'"):
        enqueue([{"key": "x"}], tm.name, settings=qlib_settings, qlib_init=hostile)
    with pytest.raises(TaskTypeError, match=r"qlib_init must be a mapping.*got '/data/cn'"):
        enqueue([{"key": "x"}], tm.name, settings=qlib_settings, qlib_init="/data/cn")  # type: ignore[arg-type]
    assert tm.task_stat() == {}
    assert tm.db[batches.COLLECTION].count_documents({"pool": tm.name}) == 0


def _calendar_probe(task: dict, experiment_name: str, recorder_name: str | None = None, *, settings=None):
    """A train function that trains nothing: a run tagged with what Qlib shows this process."""
    from qlib.data import D

    rec = get_experiment(experiment_name, settings).create_recorder(recorder_name)
    rec.set_tags(qlib_calendar=str(len(D.calendar())), key=task["key"])
    rec.end_run("FINISHED")
    return rec


def test_trainer_r_initialises_qlib_in_process(settings, tmp_path):
    qlib_init = _provider(tmp_path / "provider", 25, close_start=1.0)
    before = init_count()
    recs = TrainerR("qlib_in_process", train_func=_calendar_probe, settings=settings, qlib_init=qlib_init).train(
        [{"key": "a"}, {"key": "b"}]
    )
    assert [r.list_tags()["qlib_calendar"] for r in recs] == ["25", "25"]
    assert init_count() == before + 1

    # a child process per task initialises Qlib itself
    other = _provider(tmp_path / "other", 35, close_start=1.0)
    recs = TrainerR("qlib_subproc", train_func=_calendar_probe, call_in_subproc=True, settings=settings, qlib_init=other).train(
        [{"key": "c"}]
    )
    assert recs[0].list_tags()["qlib_calendar"] == "35"


def test_delay_trainer_r_initialises_qlib_for_end_train(settings, tmp_path):
    qlib_init = _provider(tmp_path / "provider", 27, close_start=1.0)
    seen: list[int] = []

    def end(rec, experiment_name, **_):
        from qlib.data import D

        seen.append(len(D.calendar()))
        return rec

    trainer = DelayTrainerR("qlib_delay", train_func=_calendar_probe, end_train_func=end, settings=settings, qlib_init=qlib_init)
    trainer.end_train(trainer.train([{"key": "d"}]))
    assert seen == [27]


def test_pool_trainers_initialise_qlib_once_for_their_pull_loops(settings, tmp_path):
    """TrainerRM / DelayTrainerRM train in this process through the pool: Qlib is initialised
    here with their qlib_init before the first task, once for all tasks and phases."""
    qlib_init = _provider(tmp_path / "provider", 29, close_start=1.0)
    before = init_count()
    recs = TrainerRM("qlib_rm", task_pool="qlib_rm", train_func=_calendar_probe, settings=settings, qlib_init=qlib_init).train(
        [{"key": "a"}, {"key": "b"}]
    )
    assert [r.list_tags()["qlib_calendar"] for r in recs] == ["29", "29"]
    assert init_count() == before + 1

    other = _provider(tmp_path / "other", 31, close_start=1.0)
    seen: list[int] = []

    def end(rec, experiment_name, **_):
        from qlib.data import D

        seen.append(len(D.calendar()))
        return rec

    delay = DelayTrainerRM(
        "qlib_drm", task_pool="qlib_drm", train_func=_calendar_probe, end_train_func=end, settings=settings, qlib_init=other
    )
    recs = delay.train([{"key": "c"}, {"key": "d"}])
    assert [r.list_tags()["qlib_calendar"] for r in recs] == ["31", "31"]
    delay.end_train(recs)
    assert seen == [31, 31] and init_count() == before + 2

    # worker() where this process' Qlib has another config (the delay trainer's) initialises it again
    tm = TaskManager("qlib_rm", settings)
    (task_id,) = tm.create_task([{"key": "e"}])
    worker = TrainerRM("qlib_rm", task_pool="qlib_rm", train_func=_calendar_probe, settings=settings, qlib_init=qlib_init)
    assert worker.worker() == 1
    assert init_count() == before + 3
    assert tm.re_query(task_id)["res"].list_tags()["qlib_calendar"] == "29"


def test_trainer_refuses_qlib_init_outside_allow_list(settings, tmp_path):
    hostile = {"provider_uri": str(tmp_path), "exp_manager": {"class": "posix.system", "kwargs": {}}}
    with pytest.raises(ModuleNotAllowedError, match="posix"):
        TrainerR("x", settings=settings, qlib_init=hostile)


WORKFLOW = """
qlib_init:
    provider_uri: {provider}
    region: cn
{calendar}
task:
    model: {{class: LinearModel, module_path: qcelery.models}}
    dataset:
        class: DatasetH
        module_path: qcelery.data
        kwargs:
            handler: {{class: SyntheticAlphaHandler, module_path: qcelery.data}}
            segments:
                train: [2020-01-01, 2020-01-31]
                test: [2020-02-01, 2020-02-20]
generators:
    - rolling: {{step: 5}}
"""


def _every_day_provider(root: Path) -> Path:
    """A provider that trades every calendar day (weekends too), with two known future days."""
    return write_provider(root, pd.date_range("2020-01-01", "2020-02-20"), pd.date_range("2020-02-21", "2020-02-22"))


def test_generators_roll_on_the_providers_calendar(tmp_path, settings):
    provider = _every_day_provider(tmp_path / "provider")
    path = tmp_path / "wf.yaml"
    path.write_text(WORKFLOW.format(provider=provider, calendar=""))
    tasks = task_generator(*load_workflow(path, settings=settings))
    starts = [pd.Timestamp(t["dataset"]["kwargs"]["segments"]["test"][0]) for t in tasks]
    # 20 provider days of test, 5 a step: every window starts on a provider day, weekends included
    assert starts == list(pd.date_range("2020-02-01", periods=4, freq="5D"))
    assert any(d.dayofweek >= 5 for d in starts)
    assert INSTRUMENT  # the provider's data are not read here: the calendar files are

    # an explicit calendar: wins over the provider's
    path.write_text(WORKFLOW.format(provider=provider, calendar="calendar: XSHG"))
    tasks = task_generator(*load_workflow(path, settings=settings))
    assert all(pd.Timestamp(t["dataset"]["kwargs"]["segments"]["test"][0]).dayofweek < 5 for t in tasks)


def test_workflow_with_missing_provider_is_one_clear_error(tmp_path, settings):
    path = tmp_path / "wf.yaml"
    path.write_text(WORKFLOW.format(provider=tmp_path / "nowhere", calendar=""))
    with pytest.raises(ConfigError, match=r"nowhere.*calendars/day.txt.*calendar: XSHG"):
        load_workflow(path, settings=settings)


def test_worker_refuses_a_batch_whose_qlib_init_names_code(qlib_settings, one_worker, tmp_path):
    """A batch document is data: one written around the producer's check (by hand, by an
    older client) with a class outside the allow-list in its qlib_init fails its task at
    once, naming the key, and Qlib is not initialised from it."""
    from qcelery.producer import publish

    tm = TaskManager("qlib_hostile", qlib_settings)
    hostile = {"provider_uri": str(tmp_path), "exp_manager": {"class": "system", "module_path": "os", "kwargs": {}}}
    doc, _ = batches.create(
        tm,
        [{"key": "h"}],
        queue=qlib_settings.default_queue,
        task_func=PROBE,
        task_kwargs=None,
        before_status="waiting",
        after_status="done",
        aggregate=None,
        qlib_init=hostile,
    )
    ids = batches.task_ids(tm, doc["_id"])
    publish(app_for(qlib_settings), tm.name, ids, batch_id=doc["_id"])
    deadline = time.monotonic() + 120
    while (task := tm.re_query(ids[0]))["status"] != "failed":
        assert time.monotonic() < deadline, f"task still {task['status']} after 120 s"
        time.sleep(0.2)
    assert task["attempt"] == 1  # refused for good, not retried
    assert "ModuleNotAllowedError" in task["error"] and "exp_manager" in task["error"] and "'os'" in task["error"]


def test_cli_enqueue_sends_the_workflows_qlib_init_with_the_batch(tmp_path, settings, mongo_db):
    from qcelery.cli import workflow as wfl
    from qcelery.cli.tasks import submit

    provider = _every_day_provider(tmp_path / "provider")
    path = tmp_path / "wf.yaml"
    path.write_text(WORKFLOW.format(provider=provider, calendar=""))
    sub = submit(wfl.load(path, settings), settings, check=False)
    batch = batches.load(mongo_db, sub.batch_id)
    assert batch["qlib_init"] == {"provider_uri": str(provider), "region": "cn"}
    assert batch["n_tasks"] == 4
