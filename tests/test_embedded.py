"""Embedded servers: they answer when started and leave no process behind, whatever
way their owner ends (stop, exception, normal exit, Ctrl-C, SIGTERM, dropped object)."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pymongo
import pytest
import redis as redis_lib

from qcelery.embedded import EmbeddedMongo, EmbeddedRedis, port_open

ROOT = Path(__file__).resolve().parents[1]


def gone(pid: int, timeout: float = 15.0) -> bool:
    """Whether process ``pid`` has exited (a zombie awaiting its parent counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def closed(port: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_open("127.0.0.1", port):
            return True
        time.sleep(0.05)
    return False


def redis_ping(port: int, password: str | None = None) -> bytes:
    """PING over a raw socket (after AUTH when ``password`` is given): the last reply line."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        if password is not None:
            s.sendall(b"AUTH " + password.encode() + b"\r\n")
            assert s.recv(64).startswith(b"+OK")
        s.sendall(b"PING\r\n")
        return s.recv(64)


# ----------------------------------------------------------------- in this process
def test_start_answers_and_stop_leaves_no_process(tmp_path):
    mongo, redis = EmbeddedMongo(tmp_path), EmbeddedRedis(tmp_path)
    try:
        mongo.start(timeout=60)
        redis.start()
        with pymongo.MongoClient(mongo.url, serverSelectionTimeoutMS=5000) as c:
            c.t.c.insert_one({"a": 1})
            assert c.t.c.find_one({}, {"_id": 0}) == {"a": 1}
        assert redis_ping(redis.port, redis.password) == b"+PONG\r\n"
        assert (tmp_path / "mongo").is_dir() and (tmp_path / "secantusdb.log").exists()
        pids, ports = [mongo.proc.pid, redis.proc.pid], [mongo.port, redis.port]
    finally:
        mongo.stop()
        redis.stop()
    assert all(gone(p) for p in pids) and all(closed(p) for p in ports)
    assert not mongo.running and not redis.running
    mongo.stop()  # stopping twice is harmless


def test_embedded_redis_answers_only_with_its_run_directory_password(tmp_path):
    run_dir = tmp_path / "run"
    with EmbeddedRedis(run_dir) as redis:
        # another local user (no password, or a wrong one) can neither read nor push
        assert redis_ping(redis.port).startswith(b"-NOAUTH")
        with pytest.raises(redis_lib.exceptions.AuthenticationError):
            redis_lib.Redis(port=redis.port, password="guess").ping()
        assert redis_lib.Redis.from_url(redis.url).ping()
        password, port = redis.password, redis.port
        assert redis.url == f"redis://:{password}@127.0.0.1:{port}/0" and len(password) >= 24
        # the password is on no command line (ps shows those to every user)
        assert password.encode() not in Path(f"/proc/{redis.proc.pid}/cmdline").read_bytes()
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    for name in ("redis.password", "redis.conf"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o600
    # the same run directory keeps its password (the URLs in qcelery.toml stay valid);
    # another run directory gets its own
    assert EmbeddedRedis(run_dir).password == password
    assert EmbeddedRedis(tmp_path / "other").password != password


def test_exception_inside_with_stops_the_server(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), EmbeddedMongo(tmp_path) as mongo:
        pid, port = mongo.proc.pid, mongo.port
        assert port_open("127.0.0.1", port)
        raise RuntimeError("boom")
    assert gone(pid) and closed(port)


def test_port_taken_by_another_server_is_reported_not_mistaken_for_ours(tmp_path):
    with EmbeddedRedis(tmp_path / "a") as first:
        second = EmbeddedRedis(tmp_path / "b", port=first.port)
        with pytest.raises(Exception, match="redis"):
            second.start(timeout=10)
        assert not second.running
        assert redis_ping(first.port, first.password) == b"+PONG\r\n"


# ------------------------------------------------------------- in a child process
CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    from qcelery.embedded import EmbeddedMongo, EmbeddedRedis
    run_dir, mode = sys.argv[1], sys.argv[2]
    # as in a terminal: a test runner started in the background may pass SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def report(mongo, redis):
        print(json.dumps({"pids": [mongo.proc.pid, redis.proc.pid], "ports": [mongo.port, redis.port]}), flush=True)

    if mode == "with":            # servers in a with block, the process waits to be signalled
        with EmbeddedMongo(run_dir).start(timeout=60) as mongo, EmbeddedRedis(run_dir) as redis:
            report(mongo, redis)
            time.sleep(120)
    elif mode == "plain":         # servers started without with: only the exit hooks stop them
        mongo, redis = EmbeddedMongo(run_dir).start(timeout=60), EmbeddedRedis(run_dir).start()
        report(mongo, redis)
        if sys.argv[3] == "exit":
            sys.exit(0)
        time.sleep(120)
    elif mode == "dropped":       # no reference kept to the server objects
        report(EmbeddedMongo(run_dir).start(timeout=60), EmbeddedRedis(run_dir).start())
        import gc; gc.collect()
""")


def run_child(tmp_path, *args, signal_to_send=None):
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        info = json.loads(line)
        for pid in info["pids"]:
            assert not gone(pid, timeout=0)
        if signal_to_send is not None:
            proc.send_signal(signal_to_send)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, info


def assert_nothing_left(info):
    for pid in info["pids"]:
        assert gone(pid), f"server process {pid} is still running"
    for port in info["ports"]:
        assert closed(port), f"port {port} still answers"


@pytest.mark.timeout(120)
def test_ctrl_c_in_a_process_using_with_stops_both_servers(tmp_path):
    proc, info = run_child(tmp_path, "with", signal_to_send=signal.SIGINT)
    assert "KeyboardInterrupt" in proc.stderr.read()
    assert_nothing_left(info)


@pytest.mark.timeout(120)
def test_ctrl_c_without_with_stops_both_servers_at_exit(tmp_path):
    _, info = run_child(tmp_path, "plain", "wait", signal_to_send=signal.SIGINT)
    assert_nothing_left(info)


@pytest.mark.timeout(120)
def test_normal_exit_stops_both_servers(tmp_path):
    proc, info = run_child(tmp_path, "plain", "exit")
    assert proc.returncode == 0
    assert_nothing_left(info)


@pytest.mark.timeout(120)
def test_sigterm_stops_both_servers_and_still_terminates(tmp_path):
    proc, info = run_child(tmp_path, "plain", "wait", signal_to_send=signal.SIGTERM)
    assert proc.returncode == -signal.SIGTERM  # the default outcome of SIGTERM is kept
    assert_nothing_left(info)


@pytest.mark.timeout(120)
def test_servers_whose_objects_were_dropped_are_still_stopped(tmp_path):
    proc, info = run_child(tmp_path, "dropped")
    assert proc.returncode == 0
    assert_nothing_left(info)


@pytest.mark.timeout(120)
def test_a_forked_child_exiting_does_not_stop_the_parents_servers(tmp_path):
    code = textwrap.dedent("""
        import os, sys, socket
        from qcelery.embedded import EmbeddedRedis
        with EmbeddedRedis(sys.argv[1]) as redis:
            pid = os.fork()
            if pid == 0:
                sys.exit(0)  # a normal exit runs the exit hooks in the child
            os.waitpid(pid, 0)
            with socket.create_connection(("127.0.0.1", redis.port), timeout=2) as s:
                s.sendall(b"AUTH " + redis.password.encode() + b"\\r\\nPING\\r\\n")
                reply = b""
                while not reply.endswith(b"+PONG\\r\\n") and len(reply) < 64:
                    reply += s.recv(64)
                print(reply.decode().split()[-1], redis.proc.pid, redis.port, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pong, pid, port = out.stdout.split()
    assert pong == "+PONG"
    assert gone(int(pid)) and closed(int(port))


def test_importing_installs_no_signal_handler():
    code = (
        "import signal, qcelery.embedded; "
        "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.getsignal(signal.SIGHUP) is signal.SIG_DFL)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_an_applications_own_sigterm_handler_is_left_alone(tmp_path):
    code = textwrap.dedent("""
        import signal, sys
        from qcelery.embedded import EmbeddedRedis
        def mine(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, mine)
        with EmbeddedRedis(sys.argv[1]):
            print(signal.getsignal(signal.SIGTERM) is mine)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "True"
