"""The Celery application, configured from :class:`~qcelery.settings.Settings`.

Messages carry ids only and are JSON; pickle is refused on the wire. Recovery is the
job of Mongo leases and beat, so the Redis visibility timeout is set far above any
lease: Redis never redelivers a message on its own within a run. Every message a
worker receives is checked first (``qcelery.broker``): one that is not a qcelery task
message is dropped with one log line instead of stopping the worker.
"""

from __future__ import annotations

import re

from celery import Celery
from celery.worker import state as worker_state
from celery.worker.autoscale import Autoscaler
from kombu import Exchange, Queue

from .errors import ConfigError
from .presence import Presence
from .settings import Settings

#: queue of the short control tasks (aggregation, beat jobs); every worker consumes it
CONTROL_QUEUE = "qcelery"
#: message priorities 0..MAX_PRIORITY (higher first), on Redis and RabbitMQ alike
MAX_PRIORITY = 9
#: Redis redelivers an unacknowledged message after this long; Mongo leases recover far sooner
VISIBILITY_TIMEOUT = 7 * 24 * 3600


def queue(name: str) -> Queue:
    """A durable direct queue for a worker pool, with message priorities enabled."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name, queue_arguments={"x-max-priority": MAX_PRIORITY})


_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


def check_queue_name(queue: object) -> str:
    """``queue`` if it can name a worker pool's queue, else :class:`ConfigError` saying why:
    letters, digits, ``_ . -`` (Redis keeps a queue's priorities in ``<queue>:<n>`` lists, so
    no ``:``), at most 200 characters, not qcelery's own control queue."""
    if not isinstance(queue, str) or not _QUEUE_NAME.fullmatch(queue):
        raise ConfigError(f"invalid queue name {queue!r}: use 1 to 200 letters, digits, '_', '.' or '-' (like cpu, gpu-a100)")
    if queue == CONTROL_QUEUE:
        raise ConfigError(f"queue name {queue!r} is qcelery's control queue; name the worker pool something else")
    return queue


def wire_priority(app: Celery, priority: int) -> int:
    """qcelery's priority (0..MAX_PRIORITY, higher runs first) as the broker orders it.

    RabbitMQ delivers a higher ``priority`` first; kombu's Redis transport keeps one list
    per priority and reads them in ascending order, so there 0 comes first. Without the
    flip, a task raised to priority 9 on Redis ran after everything else."""
    flip = getattr(app, "_qcelery_flip_priority", None)
    if flip is None:
        flip = app.connection_for_write().transport.driver_type == "redis"
        app._qcelery_flip_priority = flip  # type: ignore[attr-defined]  # cached per app
    return MAX_PRIORITY - priority if flip else priority


def redis_list(queue: str, priority: int = 0) -> str:
    """The Redis list that holds ``queue``'s messages of qcelery priority ``priority``
    (kombu keeps one list per priority: ``cpu`` for wire priority 0, ``cpu:N`` else)."""
    wire = MAX_PRIORITY - priority
    return f"{queue}:{wire}" if wire else queue


def _is_control(request) -> bool:
    return (request.delivery_info or {}).get("routing_key") == CONTROL_QUEUE


class PoolAutoscaler(Autoscaler):
    """Celery's autoscaler, counting only the pool's own tasks as load and activity.

    Every worker also runs the short control tasks (beat jobs every few seconds,
    aggregation checks). Celery's autoscaler shrinks only after ``keepalive`` seconds
    (``AUTOSCALE_KEEPALIVE``, 30) without any task received and grows whenever more
    tasks are reserved than processes run, so with it a recover job every 5 s kept an
    idle worker at its maximum forever. Control tasks still get a process when the
    minimum is 0."""

    def on_task_received(self, req) -> None:
        if not _is_control(req):
            super().on_task_received(req)  # type: ignore[misc]  # celery-types omits it; celery/worker/autoscale.py defines it

    @property
    def qty(self) -> int:
        reserved = list(worker_state.reserved_requests)
        work = sum(1 for r in reserved if not _is_control(r))
        return max(work, 1 if len(reserved) > work else 0)


class QceleryApp(Celery):
    """A Celery app that carries the settings it was made from (the tasks read them)."""

    qcelery_settings: Settings


def make_app(settings: Settings, main: str = "qcelery") -> QceleryApp:
    """A Celery app for ``settings`` with qcelery's tasks registered."""
    app = QceleryApp(main, broker=settings.broker_url, backend=settings.effective_result_backend, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.default_queue,
        task_queue_max_priority=MAX_PRIORITY,
        task_default_priority=0,
        task_create_missing_queues=True,
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT,
            "priority_steps": list(range(MAX_PRIORITY + 1)),
            "sep": ":",
            "queue_order_strategy": "priority",
        },
        result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        broker_connection_retry_on_startup=True,
        # RabbitMQ closes a channel whose unacknowledged message outlives its consumer_timeout
        # (30 min by default; a long training holds its message that long under acks_late).
        # That is a channel error: without this the worker stops on it ("Unrecoverable
        # error: PreconditionFailed"); with it the consumer reconnects and goes on.
        broker_channel_error_retry=True,
        # ...and the running task is not cancelled on reconnecting: it keeps its Mongo lease
        # and commits; its redelivered message finds it running and does nothing. (Cancelling
        # it would only rerun it into the same timeout.)
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_timeout=5,
        redis_socket_connect_timeout=5,
        redis_socket_timeout=30,
        redis_backend_health_check_interval=10,
        result_expires=7 * 24 * 3600,
        worker_send_task_events=True,
        # no task-sent events: they double the messages a 10,000-task enqueue publishes
        task_send_sent_event=False,
        task_track_started=True,
        worker_autoscaler="qcelery.celery_app:PoolAutoscaler",
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.time_limit,
        beat_schedule_filename=str(settings.run_dir / "celerybeat-schedule"),
        timezone="UTC",
        enable_utc=True,
        # a message that is not one of our task messages is dropped with one log line
        worker_consumer="qcelery.broker:GuardedConsumer",
    )
    if settings.broker_url.startswith("redis://"):
        # kombu's Redis transport stops the worker on a list entry that is not its JSON
        # envelope; this one refuses such entries (rediss:// keeps kombu's own: its TLS
        # options are resolved from the scheme name)
        app.conf.broker_transport = "qcelery.broker:RedisTransport"
    app.qcelery_settings = settings  # read by the tasks; one settings object per app
    # each worker records itself in Mongo for `qcelery status` (qcelery.presence)
    app.steps["worker"].add(Presence)
    from . import beat, worker  # registering needs the app; modules import us back

    worker.register(app)
    beat.register(app)
    return app


_APPS: dict[str, QceleryApp] = {}


def app_for(settings: Settings) -> QceleryApp:
    """One app per distinct settings in this process (producers, CLI, tests)."""
    key = settings.model_dump_json()
    if key not in _APPS:
        _APPS[key] = make_app(settings)
    return _APPS[key]
