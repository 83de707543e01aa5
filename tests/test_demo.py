"""``qcelery demo`` (what ``make demo`` runs) end to end with a small workflow: servers,
workers and beat start, the batch runs with a progress bar, the summary is printed,
and nothing is left running afterwards."""

from __future__ import annotations

import json
import subprocess

from cli_support import PROBE, QCELERY, alive_groups, cli_env, probe_workflow, qcelery, wait_until
from qcelery.cli.demo import prepare_run_dir


def test_demo_runs_a_small_rolling_experiment_and_stops_everything(tmp_path):
    wf = probe_workflow(tmp_path / "small.yaml", windows=3, sleep=0.2, experiment="demo_small")
    run_dir = tmp_path / "demo"
    env = cli_env(QCELERY_TASK_FUNC=PROBE)
    proc = subprocess.Popen([*QCELERY, "--run-dir", str(run_dir), "demo", "--config", str(wf), "--workers", "1",
                             "--poll", "0.2"],
                            cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # while it runs, the run directory names every process it started
    state = run_dir / "state.json"
    seen: set[int] = set()

    def record() -> bool:
        if state.exists():
            try:
                seen.update(p["pid"] for p in json.loads(state.read_text())["processes"])
            except ValueError:
                pass
        return proc.poll() is not None

    wait_until(record, timeout=300, interval=0.2)
    out, errout = proc.communicate(timeout=60)
    assert proc.returncode == 0, errout
    assert "3 tasks (1 model(s) x 3 rolling window(s)) on 1 worker(s); 3 new, 0 already done" in out
    assert "(pool 'demo_small'): 3 tasks, 3 done" in out
    assert "demo finished in" in out
    assert "3/3" in errout  # the progress bar reached the end
    assert len(seen) >= 4  # secantusdb, redis, a worker, beat
    assert wait_until(lambda: not alive_groups(seen), timeout=10), f"left running: {alive_groups(seen)}"
    assert not state.exists() and (run_dir / ".qcelery-demo").exists()

    assert (run_dir / "logs" / "worker-cpu-1.log").exists()  # kept for a look afterwards


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
