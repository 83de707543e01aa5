"""Experiment / Recorder over MLflow: the local file store, and a real `mlflow server`
with several worker processes writing at once."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest

from qcelery.embedded import free_port
from qcelery.exp import Experiment, LoadObjectError, Recorder, get_experiment, recorder_from_tags
from qcelery.serial import dumps, restricted_loads


def test_recorder_logs_params_tags_metrics_and_objects_and_reports_its_status(settings):
    exp = get_experiment("e1", settings)
    rec = exp.create_recorder("first", tags={"pool": "p", "task_id": "t1"})
    assert rec.status == Recorder.STATUS_R

    rec.log_params(**{"model.class": "LinearModel", "model.kwargs.alpha": 0.5})
    rec.log_metrics(IC=0.03, **{"Rank IC": 0.04})
    rec.set_tags(stage="fit")
    frame = pd.DataFrame(
        {"score": [0.1, 0.2]},
        index=pd.MultiIndex.from_tuples(
            [(pd.Timestamp("2020-01-02"), "A"), (pd.Timestamp("2020-01-02"), "B")], names=["datetime", "instrument"]
        ),
    )
    rec.save_objects(**{"pred.pkl": frame, "task": {"model": {"class": "LinearModel"}}})
    rec.save_objects(artifact_path="sig_analysis", **{"ic.pkl": pd.Series([0.1])})

    assert rec.list_params() == {"model.class": "LinearModel", "model.kwargs.alpha": "0.5"}
    assert rec.list_metrics() == {"IC": 0.03, "Rank IC": 0.04}
    assert {"pool": "p", "task_id": "t1", "stage": "fit"}.items() <= rec.list_tags().items()
    assert rec.load_object("pred.pkl").equals(frame)
    assert rec.load_object("task") == {"model": {"class": "LinearModel"}}
    assert rec.load_object("sig_analysis/ic.pkl").tolist() == [0.1]
    assert sorted(rec.list_artifacts()) == ["pred.pkl", "sig_analysis", "task"]

    rec.end_run(Recorder.STATUS_FI)
    assert rec.status == Recorder.STATUS_FI
    assert rec.info["status"] == "FINISHED" and rec.info["name"] == "first"


def test_list_recorders_filters_by_status_and_tags_and_finds_a_task_run(settings):
    exp = get_experiment("e2", settings)
    recs = [exp.create_recorder(tags={"task_id": f"t{i}"}) for i in range(3)]
    recs[0].end_run(Recorder.STATUS_FI)
    recs[1].end_run(Recorder.STATUS_FA)

    assert set(exp.list_recorders()) == {r.id for r in recs}
    assert exp.list_recorders(rtype="list", status=Recorder.STATUS_FI) == [recs[0]]
    assert exp.list_recorders(rtype="list", filter_string="tags.task_id = 't2'") == [recs[2]]
    assert recorder_from_tags(exp, task_id="t1") == [recs[1]]
    assert len(exp.list_recorders(rtype="list", max_results=2)) == 2
    assert exp.get_recorder(recorder_id=recs[0].id) == recs[0]


def test_recorder_pickles_to_ids_only_and_decodes_through_the_restricted_unpickler(settings):
    rec = get_experiment("e3", settings).create_recorder("r")
    _ = rec.status  # the live client must not leak into the pickle
    state = pickle.loads(dumps(rec)).__dict__
    assert set(state) == {"experiment_id", "id", "uri", "name"}
    back = restricted_loads(dumps(rec))
    assert back == rec and back.status == Recorder.STATUS_R
    exp = get_experiment("e3", settings)
    assert restricted_loads(dumps(exp)) == exp


def test_load_object_errors_name_the_artifact_and_refuse_unsafe_pickles(settings, tmp_path):
    rec = get_experiment("e4", settings).create_recorder()
    with pytest.raises(LoadObjectError, match="'missing.pkl'"):
        rec.load_object("missing.pkl")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    rec.save_objects(local_path=tmp_path / "evil.pkl")
    with pytest.raises(LoadObjectError, match="refusing to load global"):
        rec.load_object("evil.pkl")


def test_long_parameter_values_are_cut_to_mlflows_limit(settings):
    rec = get_experiment("e5", settings).create_recorder()
    rec.log_params(big="x" * 10_000)
    value = rec.list_params()["big"]
    assert len(value) == 6000 and value.endswith("...")


def test_a_deleted_experiment_is_reported_not_silently_recreated(settings):
    exp = get_experiment("gone", settings)
    exp.client.delete_experiment(exp.id)
    with pytest.raises(Exception, match="is deleted"):
        get_experiment("gone", settings)
    with pytest.raises(LoadObjectError, match="no experiment 'never'"):
        get_experiment("never", settings, create=False)


def _create_experiment(uri: str, out) -> None:
    out.put(get_experiment("raced", tracking_uri=uri).id)


def test_concurrent_processes_creating_one_experiment_in_a_file_store_get_the_same_one(tmp_path):
    uri = (tmp_path / "race").as_uri()
    # spawn: a forked child would inherit (and try to close) earlier tests' broker connections
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_create_experiment, args=(uri, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    ids = {out.get(timeout=5) for _ in procs}
    assert len(ids) == 1


# ------------------------------------------------------------------ mlflow server
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (file backend, served artifacts) on a free port."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}
    with open(root / "server.log", "wb") as log:  # the server keeps its own descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                (root / "store").as_uri(),
                "--artifacts-destination",
                (root / "artifacts").as_uri(),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _write_runs(uri: str, worker: int, n: int, out) -> None:
    exp = get_experiment("server_exp", tracking_uri=uri)
    ids = []
    for i in range(n):
        rec = exp.create_recorder(f"w{worker}-{i}", tags={"pool": "srv", "task_id": f"{worker}-{i}"})
        rec.log_params(worker=worker, i=i)
        rec.log_metrics(IC=worker + i / 10)
        rec.save_objects(**{"pred.pkl": pd.Series([worker, i], name="score")})
        rec.end_run(Recorder.STATUS_FI)
        ids.append(rec.id)
    out.put(ids)


def test_several_processes_write_runs_to_an_mlflow_server_at_once(mlflow_server):
    # spawn: a forked child would inherit (and try to close) earlier tests' broker connections
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_write_runs, args=(mlflow_server, w, 4, out)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    written = {rid for _ in procs for rid in out.get(timeout=5)}

    exp = get_experiment("server_exp", tracking_uri=mlflow_server, create=False)
    recs = exp.list_recorders(status=Recorder.STATUS_FI)
    assert set(recs) == written and len(written) == 12
    rec = recorder_from_tags(exp, task_id="2-3")[0]
    assert rec.load_object("pred.pkl").tolist() == [2, 3]
    assert rec.list_metrics()["IC"] == pytest.approx(2.3)
    assert restricted_loads(dumps(rec)).load_object("pred.pkl").tolist() == [2, 3]


def test_task_train_against_an_mlflow_server(settings, mongo_db, mlflow_server):
    from qcelery.collect import RecorderCollector
    from qcelery.trainer import TrainerR

    server_settings = settings.model_copy(update={"mlflow_tracking_uri": mlflow_server})
    task = {
        "model": {"class": "LinearModel", "module_path": "qcelery.models"},
        "dataset": {
            "class": "DatasetH",
            "module_path": "qcelery.data",
            "kwargs": {
                "handler": {
                    "class": "SyntheticAlphaHandler",
                    "module_path": "qcelery.data",
                    "kwargs": {
                        "instruments": 20,
                        "start_time": "2020-01-02",
                        "end_time": "2020-12-31",
                        "fit_start_time": "2020-01-02",
                        "fit_end_time": "2020-06-30",
                    },
                },
                "segments": {"train": ("2020-01-02", "2020-06-30"), "test": ("2020-07-01", "2020-12-31")},
            },
        },
        "record": [{"class": "SignalRecord", "module_path": "qcelery.records", "kwargs": {"model": "<MODEL>", "dataset": "<DATASET>"}}],
    }
    (rec,) = TrainerR("served", settings=server_settings).train([task])
    assert rec.uri == mlflow_server and rec.status == Recorder.STATUS_FI
    collected = RecorderCollector(Experiment(rec.experiment_id, "served", mlflow_server))()
    assert collected["pred"][rec.id].index.names == ["datetime", "instrument"]
