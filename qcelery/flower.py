"""Flower, the Celery dashboard, on qcelery's app and with basic auth.

Credentials come from Flower's own variable ``FLOWER_BASIC_AUTH=user:password``
(several pairs separated by commas). Without them Flower is refused, unless the
caller asks for no authentication *and* binds a loopback address: an open dashboard
can revoke tasks and shut workers down. The password is never logged or printed.
Flower serves ``/metrics`` (Prometheus) without authentication; qcelery puts it behind
the same basic auth (Prometheus' scrape config has ``basic_auth``), since it names every
task and worker. ``/healthcheck`` stays open for liveness probes: it answers ``OK`` and
nothing else.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping

from .errors import ConfigError
from .settings import Settings

logger = logging.getLogger(__name__)

AUTH_VARIABLE = "FLOWER_BASIC_AUTH"


def is_loopback(address: str) -> bool:
    """Whether ``address`` (a host name or IP) only accepts local connections."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def basic_auth_from_env(environ: Mapping[str, str] | None = None, *, no_auth: bool = False, address: str = "127.0.0.1") -> str | None:
    """The ``user:password[,user2:password2]`` Flower should require, or ``None`` when
    ``no_auth`` is allowed (loopback only). Raises :class:`ConfigError` otherwise."""
    environ = os.environ if environ is None else environ
    if no_auth:
        if not is_loopback(address):
            raise ConfigError(
                f"--no-auth is only allowed on a loopback address, not {address!r}: "
                f"set {AUTH_VARIABLE}=user:password to serve Flower on other interfaces"
            )
        return None
    value = (environ.get(AUTH_VARIABLE) or "").strip()
    if not value:
        raise ConfigError(
            f"Flower needs credentials: set {AUTH_VARIABLE}=user:password "
            "(or pass --no-auth to serve it on localhost only, without authentication)"
        )
    for i, pair in enumerate(value.split(",")):
        user, sep, password = pair.partition(":")
        if not sep or not user.strip() or not password:
            # never echo the value: it holds a password
            raise ConfigError(f"{AUTH_VARIABLE} entry #{i + 1} is not user:password with both parts non-empty")
    return value


def _metrics_behind_auth() -> None:
    """Make Flower's ``/metrics`` handler ask for the dashboard's credentials too (Flower
    checks them in ``get_current_user``, which its other pages reach through
    ``tornado.web.authenticated``; its metrics handler is not so decorated)."""
    import tornado.web
    from flower.views import monitor

    if not getattr(monitor.Metrics.get, "_qcelery_authenticated", False):
        guarded = tornado.web.authenticated(monitor.Metrics.get)
        guarded._qcelery_authenticated = True  # type: ignore[attr-defined]  # marks the patch: applied once
        monitor.Metrics.get = guarded


def run(
    settings: Settings,
    *,
    port: int = 5555,
    address: str = "127.0.0.1",
    auth: str | None = None,
    broker_api: str | None = None,
    extra_args: list[str] | None = None,
) -> int | None:
    """Run Flower in this process until it is stopped (SIGTERM or Ctrl-C).

    ``auth`` is handed to Flower through its environment variable, not its command
    line, so it never shows in a process listing. ``broker_api`` is RabbitMQ's
    management API URL, for queue lengths."""
    from .celery_app import make_app

    if auth:
        os.environ[AUTH_VARIABLE] = auth
    else:
        os.environ.pop(AUTH_VARIABLE, None)
    if auth:
        _metrics_behind_auth()
    app = make_app(settings)
    argv = ["flower", f"--port={port}", f"--address={address}"]
    if broker_api:
        argv.append(f"--broker-api={broker_api}")
    argv += list(extra_args or [])
    logger.info("flower on %s:%s, %s", address, port, "basic auth" if auth else "no authentication")
    return app.start(argv)
