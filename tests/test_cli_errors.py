"""What a user sees when something is wrong: one ``error:`` line and exit code 2.

Every command runs through the installed ``qcelery`` console script, against the
session's real SecantusDB and redis-server (or ports where nothing listens).
"""

from __future__ import annotations

import subprocess

from bson import ObjectId
from cli_support import PROBE, cli_env, error_lines, probe_workflow, qcelery, qcelery_many
from typer.testing import CliRunner

from qcelery.cli.main import app
from qcelery.embedded import free_port

COMMANDS = {
    "up": ["--workers", "--flower", "--foreground"],
    "down": ["--timeout"],
    "demo": ["--config", "--workers"],
    "enqueue": ["--pool", "--queue", "--priority", "--dry-run"],
    "status": ["--pool", "--batch"],
    "wait": ["--batch", "--timeout"],
    "collect": ["--batch", "--json"],
    "recover": ["--pool"],
    "reset-waiting": ["--pool", "--batch"],
    "retry-failed": ["--pool", "--batch"],
    "prioritize": ["--pool", "--batch"],
    "remove": ["--pool", "--batch", "--yes"],
    "pools": [],
    "adopt": [],
    "qlib-data": ["--overwrite"],
    "worker": ["--pool", "--autoscale", "--concurrency"],
    "beat": ["--schedule"],
    "flower": ["--port", "--address", "--no-auth"],
}


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = error_lines(proc)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_every_command_has_a_useful_help(tmp_path):
    top = qcelery("--help", cwd=tmp_path, env=cli_env())
    assert top.returncode == 0, top.stderr
    # each command's help in-process (the same click objects the console script runs)
    runner = CliRunner()
    for name, options in COMMANDS.items():
        assert name in top.stdout
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        for option in options:
            assert option in result.output, f"{name} --help does not mention {option}"


def test_malformed_yaml_is_reported_with_its_line(tmp_path, settings):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task:\n  model: {class: X\n  dataset: 1\n")
    proc = qcelery("enqueue", str(bad), cwd=tmp_path, env=cli_env(settings))
    _assert_one_line_error(proc, "bad.yaml", "line 3")


def test_unknown_model_class_is_named_and_nothing_is_enqueued(tmp_path, settings, mongo_db):
    wf = probe_workflow(tmp_path / "typo.yaml")
    wf.write_text(wf.read_text().replace("class: OrderedDict", "class: LinearModle", 1))
    proc = qcelery("enqueue", str(wf), cwd=tmp_path, env=cli_env(settings, QCELERY_TASK_FUNC=PROBE))
    _assert_one_line_error(proc, "LinearModle", "collections", "nothing was enqueued")
    wf.write_text(wf.read_text().replace("module_path: collections", "module_path: qcelery.no_such_data"))
    proc = qcelery("enqueue", str(wf), cwd=tmp_path, env=cli_env(settings, QCELERY_TASK_FUNC=PROBE))
    _assert_one_line_error(proc, "qcelery.no_such_data", "nothing was enqueued")
    assert mongo_db.list_collection_names() == []


def test_unreachable_mongo_is_one_line_with_the_password_masked(tmp_path):
    url = f"mongodb://alice:hunter2@127.0.0.1:{free_port()}"
    wf = probe_workflow(tmp_path / "wf.yaml")
    procs = qcelery_many([["enqueue", str(wf)], ["status"], ["wait"]], cwd=tmp_path, env=cli_env(QCELERY_MONGO_URL=url), timeout=30)
    for proc in procs:
        _assert_one_line_error(proc, "MongoDB", "did not answer", "alice:***@")
        assert "hunter2" not in proc.stderr + proc.stdout


def test_unreachable_broker_is_one_line(tmp_path, settings, mongo_db):
    wf = probe_workflow(tmp_path / "wf.yaml")
    env = cli_env(settings, QCELERY_BROKER_URL=f"redis://:sesame@127.0.0.1:{free_port()}/0", QCELERY_TASK_FUNC=PROBE)
    env.pop("QCELERY_RESULT_BACKEND", None)
    proc = qcelery("enqueue", str(wf), cwd=tmp_path, env=env, timeout=30)
    _assert_one_line_error(proc, "broker", "did not answer")
    assert "sesame" not in proc.stderr
    assert mongo_db.list_collection_names() == []


def test_unreachable_mlflow_server_is_one_line(tmp_path, settings, mongo_db):
    wf = probe_workflow(tmp_path / "wf.yaml")
    env = cli_env(settings, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    env.pop("QCELERY_MLFLOW_TRACKING_URI", None)
    proc = qcelery("enqueue", str(wf), cwd=tmp_path, env=env, timeout=30)
    _assert_one_line_error(proc, "MLflow", "did not answer")


def test_a_batch_that_does_not_exist(tmp_path, settings, mongo_db):
    missing = str(ObjectId())
    commands = [[c, "--batch", missing] for c in ("status", "wait", "collect")]
    commands.append(["status", "--batch", "yesterday"])
    procs = qcelery_many(commands, cwd=tmp_path, env=cli_env(settings))
    for proc in procs[:-1]:
        _assert_one_line_error(proc, f"no batch {missing}")
    _assert_one_line_error(procs[-1], "'yesterday'", "not a task id")


def test_down_when_nothing_is_up(tmp_path):
    proc = qcelery("down", cwd=tmp_path, env=cli_env())
    _assert_one_line_error(proc, "nothing is up")


def test_an_invalid_setting_names_its_variable(tmp_path):
    proc = qcelery("pools", cwd=tmp_path, env=cli_env(QCELERY_LEASE_SECONDS="-5"))
    _assert_one_line_error(proc, "QCELERY_LEASE_SECONDS")


def test_flower_refuses_to_start_without_credentials(tmp_path, settings):
    no_auth, open_to_all = qcelery_many([["flower"], ["flower", "--no-auth", "--address", "0.0.0.0"]], cwd=tmp_path, env=cli_env(settings))
    _assert_one_line_error(no_auth, "FLOWER_BASIC_AUTH")
    _assert_one_line_error(open_to_all, "loopback")
    half = qcelery("flower", cwd=tmp_path, env=cli_env(settings, FLOWER_BASIC_AUTH="admin"))
    _assert_one_line_error(half, "user:password")
    up = qcelery("up", "--flower", cwd=tmp_path, env=cli_env())
    _assert_one_line_error(up, "FLOWER_BASIC_AUTH")
    assert not (tmp_path / ".qcelery" / "state.json").exists()


def test_dry_run_lists_the_tasks_and_writes_nothing(tmp_path, settings, mongo_db):
    wf = probe_workflow(tmp_path / "wf.yaml", windows=3)
    proc = qcelery("enqueue", str(wf), "--dry-run", cwd=tmp_path, env=cli_env(settings))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(" new ") == 3
    assert "3 tasks, 3 new" in proc.stdout and "nothing was written" in proc.stdout
    assert "2020-07-01 .. 2020-07-28" in proc.stdout
    assert mongo_db.list_collection_names() == []


def test_the_cli_priority_bound_is_the_broker_s():
    from qcelery.celery_app import MAX_PRIORITY
    from qcelery.cli import tasks

    assert tasks.MAX_PRIORITY == MAX_PRIORITY


def test_bad_dates_sizes_and_pool_names_are_one_line_and_write_nothing(tmp_path, settings, mongo_db):
    """An impossible date (named with its line), a grid of 10^9 points (refused with the
    count it would make, before building it, even with --dry-run), pool names that cannot
    be pools and queue names that cannot be queues: one line each, nothing written."""
    base = probe_workflow(tmp_path / "base.yaml")
    bad_date = tmp_path / "bad_date.yaml"
    bad_date.write_text(base.read_text().replace("2020-01-02", "2024-13-45"))
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text("task:\n  model: {class: OrderedDict, module_path: collections}\n  start: 2024-13-45\n")
    huge = tmp_path / "huge.yaml"
    axis = "[" + ", ".join(str(i) for i in range(1000)) + "]"
    huge.write_text(base.read_text() + f"- grid: {{a: {axis}, b: {axis}, c: {axis}}}\n")
    env = cli_env(settings, QCELERY_TASK_FUNC=PROBE)
    procs = qcelery_many(
        [
            ["enqueue", str(bad_date)],
            ["enqueue", str(unquoted), "--dry-run"],
            ["enqueue", str(huge), "--dry-run"],
            ["enqueue", str(base), "--pool", ".hidden"],
            ["enqueue", str(base), "--pool", "cache.files"],
            ["enqueue", str(base), "--queue", "cpu:9"],
            ["enqueue", str(base), "--queue", "qcelery"],
        ],
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    _assert_one_line_error(procs[0], "bad_date.yaml", "'2024-13-45' is not a date")
    _assert_one_line_error(procs[1], "unquoted.yaml", "line 3", "'2024-13-45' is not a valid date")
    _assert_one_line_error(procs[2], "3,000,000,000 tasks", "1,000,000,000 (GridGen)", "QCELERY_MAX_TASKS")
    _assert_one_line_error(procs[3], "invalid task pool name '.hidden'")
    _assert_one_line_error(procs[4], "invalid task pool name 'cache.files'", "GridFS")
    _assert_one_line_error(procs[5], "invalid queue name 'cpu:9'")
    _assert_one_line_error(procs[6], "'qcelery' is qcelery's control queue")
    assert mongo_db.list_collection_names() == []
