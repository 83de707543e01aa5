"""``python -m qcelery.supervise --name NAME -- COMMAND...``: keep one process running.

``qcelery up`` starts each worker and beat under one of these: when the process
exits for any reason other than being told to stop (killed, crashed, out of memory),
it is started again after a pause that doubles with each quick failure (1 s, 2 s, ...
up to :data:`MAX_BACKOFF`). A run that lasted :data:`STEADY_AFTER` seconds resets the
pause; :data:`GIVE_UP_AFTER` quick failures in a row mean the command cannot start
(bad settings, a server that refuses us), and the supervisor exits with its code so
``up`` reports it.

The supervisor and its process share one process group (the supervisor's own session,
as ``Cluster`` starts it): ``qcelery down`` signals the group, so the worker gets its
SIGTERM (warm shutdown) and the supervisor, which got it too, stops restarting and
exits when the worker has; a SIGKILL after ``down``'s timeout ends them all.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
import time

logger = logging.getLogger("qcelery.supervise")

MAX_BACKOFF = 30.0
STEADY_AFTER = 30.0
GIVE_UP_AFTER = 5


class Supervisor:
    """Runs ``argv``, restarting it when it exits, until :meth:`request_stop`."""

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.argv = argv
        self.child: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.starts = 0

    def request_stop(self, signum: int, _frame: object = None) -> None:
        self.stopping.set()
        child = self.child
        if signum == signal.SIGTERM and child is not None and child.poll() is None:
            # a SIGTERM sent to the supervisor alone is passed on; from `down` (the whole
            # group) the worker gets it twice, which Celery takes as one warm shutdown.
            # SIGINT/SIGQUIT come from a terminal to the whole group: passing them on
            # would make a second one, a cold shutdown
            child.send_signal(signum)

    def run(self) -> int:
        quick_failures = 0
        while True:
            self.child = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL)
            if self.stopping.is_set():  # told to stop while starting it
                self.child.terminate()
            self.starts += 1
            started = time.monotonic()
            if self.starts > 1:
                logger.warning("supervisor: %s restarted (start %d, pid %d)", self.name, self.starts, self.child.pid)
            code = self.child.wait()
            if self.stopping.is_set():
                return code
            ran = time.monotonic() - started
            quick_failures = 0 if ran >= STEADY_AFTER else quick_failures + 1
            if quick_failures >= GIVE_UP_AFTER:
                logger.error(
                    "supervisor: %s exited with %s %d times in a row within %gs of starting; giving up",
                    self.name,
                    code,
                    quick_failures,
                    STEADY_AFTER,
                )
                return code or 1
            pause = min(2.0 ** max(quick_failures - 1, 0), MAX_BACKOFF)
            logger.warning(
                "supervisor: %s (pid %d) exited with %s after %.0fs; restarting in %gs", self.name, self.child.pid, code, ran, pause
            )
            if self.stopping.wait(pause):
                return code


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qcelery.supervise", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="shown in the log lines")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        p.error("no command to supervise")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s: %(levelname)s/supervisor] %(message)s")
    sup = Supervisor(a.name, command)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, sup.request_stop)
    sys.exit(sup.run())


if __name__ == "__main__":
    main()
