"""Flower as a user sees it: ``qcelery up --flower`` with basic auth, a batch running,
and headless Chromium (Debian's ``chromium``; ``make test`` installs it) looking at
the dashboard and the task list. The screenshot is kept for inspection in the test's
directory and in ``bench/out/flower.png``; ``/metrics`` is scraped like Prometheus does,
with the dashboard's credentials."""

from __future__ import annotations

import base64
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cli_support import PROBE, alive_groups, batch_id_from, cli_env, probe_workflow, qcelery, state_pids, wait_until

from qcelery.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "quant", "flower-test-pw"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed: `make test` installs it (apt-get install chromium chromium-driver)"
    return exe


def browse(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run on ``url`` with a fresh profile; JavaScript gets a few
    seconds of virtual time so the pages' AJAX tables are filled."""
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=8000", *args, url],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


@pytest.fixture
def flower_up(tmp_path):
    port = free_port()
    env = cli_env(FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}", QCELERY_TASK_FUNC=PROBE)
    up = qcelery("up", "--workers", "1", "--no-beat", "--flower", "--flower-port", str(port), cwd=tmp_path, env=env)
    assert up.returncode == 0, up.stderr
    assert PASSWORD not in up.stdout + up.stderr
    pids = state_pids(tmp_path / ".qcelery")
    try:
        yield tmp_path, env, port
    finally:
        down = qcelery("down", cwd=tmp_path, env=env)
        assert down.returncode == 0, down.stderr
        assert wait_until(lambda: not alive_groups(pids), timeout=10)


def test_flower_shows_the_worker_and_the_tasks_of_a_running_batch(flower_up):
    cwd, env, port = flower_up
    base = f"http://127.0.0.1:{port}"
    wf = probe_workflow(cwd / "wf.yaml", windows=4, sleep=0.5, experiment="flowerbatch")
    bid = batch_id_from(qcelery("enqueue", str(wf), "-q", cwd=cwd, env=env))

    assert get(base + "/")[0] == 401  # basic auth is required
    assert get(base + "/", ("intruder", "guess"))[0] == 401
    # the dashboard knows the worker once its first events arrived
    assert wait_until(lambda: "worker-cpu-1@" in get(base + "/", (USER, PASSWORD))[1], timeout=30)

    authed = f"http://{USER}:{PASSWORD}@127.0.0.1:{port}"
    shot = cwd / "flower.png"
    taken = browse(authed + "/", cwd / "profile-shot", "--window-size=1400,900", f"--screenshot={shot}")
    assert shot.exists(), taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, out / "flower.png")

    dashboard = browse(authed + "/", cwd / "profile-dash", "--dump-dom")
    assert "worker-cpu-1@" in dashboard.stdout and "Online" in dashboard.stdout

    done = qcelery("wait", "--batch", bid, "--timeout", "120", cwd=cwd, env=env, timeout=150)
    assert done.returncode == 0, done.stderr
    # Prometheus' view: the executed tasks are counted (events reach Flower asynchronously)
    assert wait_until(lambda: succeeded_executions(get(base + "/metrics", (USER, PASSWORD))) >= 4, timeout=30)
    # it names every task and worker: behind the dashboard's login, as Prometheus' basic_auth scrapes it
    assert get(base + "/metrics")[0] == 401
    assert get(base + "/healthcheck") == (200, "OK")  # liveness probes need no login; it says nothing else

    tasks = browse(authed + "/tasks", cwd / "profile-tasks", "--dump-dom")
    assert tasks.stdout.count("qcelery.execute") >= 4, tasks.stdout[-3000:]
    assert "SUCCESS" in tasks.stdout


def succeeded_executions(response: tuple[int, str]) -> float:
    status, metrics = response
    assert status == 200
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("flower_events_total{") and 'task="qcelery.execute"' in line and 'type="task-succeeded"' in line
    )
