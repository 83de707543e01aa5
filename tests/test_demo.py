"""``qcelery demo`` (what ``make demo`` runs) end to end, on a smaller copy of
``config/demo.yaml`` (the same two models, two rolling windows instead of eight): the
servers, a worker and beat start, the trainings run, the model comparison and the HTML
report are printed, and nothing is left running afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import yaml
from cli_support import QCELERY, alive_groups, cli_env, probe_workflow, qcelery, wait_until

from qcelery.calendar import default_calendar
from qcelery.cli.demo import prepare_run_dir

DEMO = Path(__file__).resolve().parents[1] / "config" / "demo.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_demo(path: Path, windows: int = 2) -> Path:
    """config/demo.yaml with its test span cut to ``windows`` rolling steps."""
    doc = yaml.safe_load(DEMO.read_text())
    segments = doc["task"]["dataset"]["kwargs"]["segments"]
    step = doc["generators"][0]["rolling"]["step"]
    start = str(segments["test"][0])[:10]
    days = [str(d)[:10] for d in default_calendar(doc.get("calendar", "XSHG")).dates if str(d)[:10] >= start]
    segments["test"] = [start, days[step * windows - 1]]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_demo_runs_a_small_rolling_experiment_and_stops_everything(tmp_path):
    wf = small_demo(tmp_path / "small_demo.yaml")
    run_dir = tmp_path / "demo"
    proc = subprocess.Popen(
        [*QCELERY, "--run-dir", str(run_dir), "demo", "--config", str(wf), "--workers", "1", "--poll", "0.2"],
        cwd=tmp_path,
        env=cli_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # while it runs, the run directory names every process it started
    state = run_dir / "state.json"
    seen: set[int] = set()

    def record() -> bool:
        if state.exists():
            with contextlib.suppress(ValueError):  # caught mid-write
                seen.update(p["pid"] for p in json.loads(state.read_text())["processes"])
        return proc.poll() is not None

    wait_until(record, timeout=300, interval=0.2)
    out, errout = proc.communicate(timeout=60)
    assert proc.returncode == 0, errout
    assert "4 tasks (2 model(s) x 2 rolling window(s)) on 1 worker(s); 4 new, 0 already done" in out
    assert "(pool 'small_demo'): 4 tasks, 4 done" in out
    assert "4/4" in errout  # the progress bar reached the end

    table = out[out.index("model comparison") :]
    for model in ("linear_alpha_0.1", "linear_alpha_10"):
        row = next(line for line in table.splitlines() if model in line)
        assert "│" in row and len(row.split("│")) > 5  # a row of metrics
    report = Path(next(line for line in out.splitlines() if line.startswith("report: ")).split(": ", 1)[1])
    assert report.is_file() and report.suffix == ".html" and run_dir in report.parents
    assert "<table" in report.read_text() and any(report.parent.glob("*.png"))
    assert "summary run: " in out and "demo finished in" in out
    ui = next(line for line in out.splitlines() if line.startswith("MLflow runs: ")).split(": ", 1)[1]

    assert len(seen) >= 4  # secantusdb, redis, a worker, beat
    assert wait_until(lambda: not alive_groups(seen), timeout=10), f"left running: {alive_groups(seen)}"
    assert not state.exists() and (run_dir / ".qcelery-demo").exists()

    # the printed MLflow command works as it is: the UI serves the demo's experiments
    port = free_port()
    ui_proc = subprocess.Popen(
        f"{ui} --host 127.0.0.1 --port {port}",
        shell=True,
        cwd=tmp_path,
        env={k: v for k, v in cli_env().items() if not k.startswith("MLFLOW_")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        names: list[str] = []

        def experiments() -> bool:
            assert ui_proc.poll() is None, ui_proc.stderr.read()
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=100", timeout=5
                ) as r:
                    names.extend(e["name"] for e in json.load(r)["experiments"])
                    return True
            except OSError:
                return False

        assert wait_until(experiments, timeout=120, interval=0.5), "the MLflow UI never answered"
        assert "qcelery_demo.summary" in names, names
    finally:
        os.killpg(ui_proc.pid, signal.SIGTERM)
        ui_proc.wait(timeout=30)


def test_each_demo_starts_from_a_clean_directory(tmp_path):
    run_dir = tmp_path / "demo"
    prepare_run_dir(run_dir)
    (run_dir / "mongo").mkdir()
    (run_dir / "mongo" / "collection-1.wt").write_text("last demo's data")
    prepare_run_dir(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [".qcelery-demo"]


def test_demo_refuses_a_directory_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    wf = probe_workflow(tmp_path / "small.yaml", windows=1)
    proc = qcelery("--run-dir", str(precious), "demo", "--config", str(wf), cwd=tmp_path, env=cli_env())
    assert proc.returncode == 2 and "not made by `qcelery demo`" in proc.stderr
    assert (precious / "thesis.tex").read_text() == "do not delete"
