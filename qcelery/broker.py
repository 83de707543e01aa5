"""The broker boundary: what a worker accepts from its queues.

Anyone who can write to a queue can put any bytes there. Celery and kombu stop the
whole worker ("Unrecoverable error: JSONDecodeError") on a Redis list entry that is
not JSON or not kombu's envelope, and log a 20-40 line traceback for a task message
with a bad body, an unknown task or arguments that do not fit. Here every message is
checked in two places before anything acts on it:

1. :class:`RedisTransport` (Redis broker only): the raw list entry must be at most
   :data:`MAX_MESSAGE_BYTES`, UTF-8 JSON, and kombu's envelope (properties with a
   delivery tag and delivery info, a base64 body). RabbitMQ has no such layer: AMQP
   frames the message itself.
2. :class:`GuardedConsumer` (both brokers): the message must be one of this app's own
   tasks (``qcelery.*``) in protocol 2, JSON, with well-typed headers, a
   ``[args, kwargs, embed]`` body, and arguments that bind to the task's signature
   with the annotated types.

**Policy: a refused message is dropped**, with one WARNING line on the worker's log
containing :data:`REFUSED`, the queue, what was wrong and a short excerpt of the bytes,
never a traceback. Dropping is safe because Mongo is the truth and the broker only
carries hints: a genuine task whose message was mangled is still ``waiting`` in its pool
and beat's sweep publishes it again. (On RabbitMQ the message is rejected without
requeue, so a queue given a dead-letter exchange by policy keeps a copy there.)
"""

from __future__ import annotations

import base64
import binascii
import functools
import inspect
import json
import logging
import types
import typing
from collections.abc import Callable
from queue import Empty
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.bootsteps import Blueprint
from celery.utils.time import maybe_iso8601
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed
from kombu.exceptions import DecodeError as KombuDecodeError
from kombu.message import Message
from kombu.serialization import loads as kombu_loads
from kombu.serialization import prepare_accept_content
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.objects import cached_property

logger = logging.getLogger(__name__)

#: every refusal's log line contains this (operators grep for it)
REFUSED = "message refused"
#: qcelery's messages carry ids only (a few hundred bytes); anything this large is not one
MAX_MESSAGE_BYTES = 1024 * 1024
#: the prefix of the tasks a qcelery worker runs; everything else is foreign
TASK_PREFIX = "qcelery."
_EXCERPT = 60

_NONE = type(None)
#: protocol-2 headers Celery reads, and the types it can use (absent is always fine)
_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "task": (str,),
    "lang": (str, _NONE),
    "root_id": (str, _NONE),
    "parent_id": (str, _NONE),
    "group": (str, _NONE),
    "group_index": (int, _NONE),
    "shadow": (str, _NONE),
    "eta": (str, _NONE),
    "expires": (str, _NONE),
    "retries": (int, _NONE),
    "timelimit": (list, tuple, _NONE),
    "argsrepr": (str, _NONE),
    "kwargsrepr": (str, _NONE),
    "origin": (str, _NONE),
    "ignore_result": (bool, _NONE),
    "replaced_task_nesting": (int, _NONE),
    "stamped_headers": (list, _NONE),
    "stamps": (dict, _NONE),
}
_REQUIRED_HEADERS = ("id", "task")
_EMBED_TYPES: dict[str, tuple[type, ...]] = {
    "callbacks": (list, _NONE),
    "errbacks": (list, _NONE),
    "chain": (list, _NONE),
    "chord": (dict, _NONE),
}


class Refused(Exception):
    """Why a message cannot be served (internal: turned into one log line, never raised out)."""


def excerpt(data: bytes | str | None) -> str:
    """The first bytes of ``data``, printable, with its length when cut."""
    if data is None:
        return "no body"
    text = repr(data[:_EXCERPT])
    return f"{text}... ({len(data)} bytes)" if len(data) > _EXCERPT else text


def _short(value: Any) -> str:
    """``repr(value)``, cut to a few dozen characters."""
    text = repr(value)
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "..."


def refuse(queue: str | None, reason: str, data: bytes | str | None) -> None:
    """The one log line of a dropped message."""
    logger.warning("%s on queue %r: %s; dropped: %s", REFUSED, queue or "?", reason, excerpt(data))


def _type_names(allowed: tuple[type, ...]) -> str:
    return " or ".join("null" if t is _NONE else t.__name__ for t in allowed)


# ------------------------------------------------------------------ layer 1: Redis list entries
def check_envelope(payload: Any) -> dict[str, Any]:
    """``payload`` (decoded JSON) when it is a kombu envelope that kombu's Redis channel
    can turn into a Message and acknowledge; :class:`Refused` otherwise."""
    if not isinstance(payload, dict):
        raise Refused(f"a JSON {type(payload).__name__}, not kombu's message envelope (an object)")
    props = payload.get("properties")
    if not isinstance(props, dict):
        raise Refused("envelope without a 'properties' object")
    if not isinstance(props.get("delivery_tag"), str):
        raise Refused("envelope without a string properties.delivery_tag")
    info = props.get("delivery_info")
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("exchange", "routing_key")):
        raise Refused("envelope without properties.delivery_info {exchange, routing_key}")
    if not isinstance(props.get("priority", 0), int):
        raise Refused("envelope whose properties.priority is not an integer")
    for key, allowed in (("headers", (dict, _NONE)), ("content-type", (str, _NONE)), ("content-encoding", (str, _NONE))):
        if not isinstance(payload.get(key), allowed):
            raise Refused(f"envelope whose {key!r} is not {_type_names(allowed)}")
    body, encoding = payload.get("body"), props.get("body_encoding")
    if not isinstance(body, (str, _NONE)):
        raise Refused("envelope whose body is not a string")
    if encoding not in (None, "base64"):
        raise Refused(f"envelope with body_encoding {encoding!r} (kombu knows base64)")
    if encoding == "base64" and body:
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise Refused("envelope whose body is not valid base64") from None
    return payload


#: the exchange of the workers' events, which Celery may send grouped in one list
EVENT_EXCHANGE = "celeryev"


def check_fanout(envelope: dict[str, Any], exchange: str | None = None) -> None:
    """Raise :class:`Refused` unless a broadcast message (worker control, events) has a
    JSON object for body, the only thing Celery's readers of those expect; on the event
    exchange also a list of objects (a worker buffers its task events and sends them in
    groups, which Flower reads)."""
    if envelope.get("content-type") != "application/json":
        raise Refused(f"broadcast message of content type {envelope.get('content-type')!r}, not application/json")
    body = envelope.get("body") or ""
    try:
        raw = base64.b64decode(body) if envelope["properties"].get("body_encoding") == "base64" else body
        decoded = json.loads(raw)
    except (ValueError, RecursionError):
        raise Refused("broadcast message whose body is not JSON") from None
    if isinstance(decoded, list) and exchange == EVENT_EXCHANGE and decoded and all(isinstance(e, dict) for e in decoded):
        return
    if not isinstance(decoded, dict):
        raise Refused(f"broadcast message whose body is a JSON {type(decoded).__name__}, not an object")


def decode_entry(raw: bytes | str) -> dict:
    """The kombu envelope in a raw Redis list entry; :class:`Refused` when it is not one.
    The size is checked before anything is parsed."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise Refused(f"more than {MAX_MESSAGE_BYTES} bytes")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        payload = json.loads(text)
    except UnicodeDecodeError:
        raise Refused("not UTF-8") from None
    except ValueError as exc:  # json.JSONDecodeError, or nesting too deep
        raise Refused(f"not JSON ({exc})") from None
    except RecursionError:
        raise Refused("JSON nested too deep") from None
    return check_envelope(payload)


class RedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, refusing list entries that are not envelopes.

    kombu reads a message in ``_brpop_read`` (the worker's event loop) or ``_get``
    (polling) and parses it right there, so a bad entry raised out of the event loop and
    stopped the worker. These two methods read the entry the same way, through
    :func:`decode_entry`; a refused entry is already popped from the list, so it is gone.
    Fan-out messages (the workers' broadcast control channel) get the envelope check too."""

    if TYPE_CHECKING:  # kombu's private members used here, which kombu-stubs leaves out
        connection_errors: tuple[type[BaseException], ...]
        _queue_cycle: Any

        def _q_for_pri(self, queue: str, pri: int) -> str: ...
        def _maybe_update_queues_expire(self, client: Any, queue: str) -> None: ...
        def _flush_brpop_reauth(self) -> None: ...

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # as kombu does: the next poll reconnects
                self.client.connection.disconnect()
                raise
            if not reply:
                raise Empty()
            key, raw = reply
            queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            payload = self._admit(raw, queue)
            if payload is not None:
                self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = False  # the BRPOP connection is idle again (the class default)
            self._flush_brpop_reauth()

    def _get(self, queue: str, timeout: float | None = None) -> dict:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                raw = client.rpop(self._q_for_pri(queue, pri))
                if raw:
                    self._maybe_update_queues_expire(client, queue)
                    payload = self._admit(raw, queue)
                    if payload is None:
                        break  # this poll found only a refused entry
                    return payload
            self._maybe_update_queues_expire(client, queue)
            raise Empty()

    def _deliver_fanout_message(self, message: Any, exchange: str) -> bool:
        try:
            check_fanout(check_envelope(message), exchange)
        except Refused as why:
            refuse(exchange, str(why), json.dumps(message, default=str))
            raise Empty() from None
        return bool(super()._deliver_fanout_message(message, exchange))  # type: ignore[misc]  # private in kombu, absent from kombu-stubs

    @staticmethod
    def _admit(raw: bytes | str, queue: str) -> dict | None:
        try:
            return decode_entry(raw)
        except Refused as why:
            refuse(queue, str(why), raw)
            return None


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`RedisChannel` (``broker_transport`` of a Redis
    broker, set by :func:`qcelery.celery_app.make_app`)."""

    Channel = RedisChannel


# ------------------------------------------------------------------ layer 2: task messages
def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a simple annotation (``str``, ``str | None``, ``dict``...);
    anything more elaborate is not checked."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if annotation is None:
        return value is None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if isinstance(origin, type):
        return isinstance(value, origin)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


@functools.lru_cache(maxsize=64)
def _signature(run: Callable) -> inspect.Signature:
    try:
        return inspect.signature(run, eval_str=True)
    except NameError:  # an annotation that cannot be resolved: check the arity only
        return inspect.signature(run)


def check_arguments(name: str, run: Callable, args: list, kwargs: dict) -> None:
    """Raise :class:`Refused` unless ``args``/``kwargs`` bind to ``run`` with the annotated types."""
    sig = _signature(run)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise Refused(f"{name}: arguments do not fit {name}{sig}: {exc}") from None
    for key, value in bound.arguments.items():
        param = sig.parameters[key]
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not _matches(value, param.annotation):
            raise Refused(f"{name}: argument {key}={_short(value)} is not {inspect.formatannotation(param.annotation)}")


def check_task_message(app: Celery, message: Message, accept: set[str]) -> None:
    """Raise :class:`Refused` unless ``message`` is a protocol-2 JSON message of one of
    ``app``'s own tasks, with headers and arguments Celery and the task can use."""
    body = message.body
    if body is not None and len(body) > MAX_MESSAGE_BYTES:
        raise Refused(f"more than {MAX_MESSAGE_BYTES} bytes")
    headers = message.headers
    if not isinstance(headers, dict) or not isinstance(headers.get("task"), str):
        raise Refused("no 'task' header (not a Celery protocol-2 task message)")
    name = headers["task"]
    if not name.startswith(TASK_PREFIX) or name not in app.tasks:
        raise Refused(f"task {_short(name)} is not a qcelery task (another application's message?)")
    for key in _REQUIRED_HEADERS:
        if key not in headers:
            raise Refused(f"{name}: no {key!r} header")
    for key, allowed in _HEADER_TYPES.items():
        if key in headers and not isinstance(headers[key], allowed):
            raise Refused(f"{name}: header {key}={_short(headers[key])} is not {_type_names(allowed)}")
    limits = headers.get("timelimit")
    if limits is not None and (len(limits) != 2 or not all(v is None or isinstance(v, (int, float)) for v in limits)):
        raise Refused(f"{name}: header timelimit={_short(limits)} is not [soft, hard] seconds")
    for key in ("eta", "expires"):
        if headers.get(key) is not None:
            try:
                maybe_iso8601(headers[key])
            except (ValueError, OverflowError, TypeError):
                raise Refused(f"{name}: header {key}={_short(headers[key])} is not an ISO 8601 time") from None
    if message.content_type not in accept:
        raise Refused(f"{name}: content type {message.content_type!r} is not accepted ({', '.join(sorted(accept))})")
    if not body:
        raise Refused(f"{name}: empty body")
    try:
        decoded = kombu_loads(body, message.content_type, message.content_encoding or "utf-8", accept=accept)
    except (ContentDisallowed, KombuDecodeError) as exc:
        raise Refused(f"{name}: body cannot be decoded as {message.content_type} ({exc})") from None
    if not (isinstance(decoded, (list, tuple)) and len(decoded) == 3):
        raise Refused(f"{name}: body is not [args, kwargs, embed]")
    args, kwargs, embed = decoded
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) or not isinstance(embed, dict):
        raise Refused(f"{name}: body is not [args (list), kwargs (object), embed (object)]")
    for key, allowed in _EMBED_TYPES.items():
        if not isinstance(embed.get(key), allowed):
            raise Refused(f"{name}: {key} is not {_type_names(allowed)}")
    check_arguments(name, app.tasks[name].run, list(args), kwargs)


def _queue_of(message: Message) -> str | None:
    # our queues are direct exchanges routed by the queue's name
    info = message.delivery_info or {}
    return info.get("routing_key") or info.get("exchange")


def _without_steps(blueprint: type[Blueprint], suffix: str) -> type[Blueprint]:
    """A subclass of ``blueprint`` whose default steps leave out those named ``*suffix``."""
    steps = [step for step in blueprint.default_steps if not str(step).endswith(suffix)]
    return type(blueprint.__name__, (blueprint,), {"default_steps": steps})


class GuardedConsumer(Consumer):
    """Celery's worker consumer, checking each task message before Celery acts on it
    (``worker_consumer``). A message :func:`check_task_message` refuses is rejected
    without requeue and logged in one line. Celery's own handlers of undecodable,
    unknown and invalid messages (each a traceback) are replaced by the same line, in
    case a message gets past the check to them."""

    if TYPE_CHECKING:  # set by Celery's Consumer, absent from celery-stubs
        connection_errors: tuple[type[BaseException], ...]

    # without Gossip, which reads every worker event on the broadcast exchange
    # ``celeryev`` and stopped the worker ("Unrecoverable error: TypeError") on one whose
    # body is not an object. qcelery uses none of what it offers (leader election, clock
    # sync with other workers); Flower reads events on its own
    Blueprint = _without_steps(Consumer.Blueprint, ":Gossip")

    @cached_property
    def _accept(self) -> set[str]:
        return set(prepare_accept_content(self.app.conf.accept_content) or ())

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Message], Any]:
        celery_handler = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Message) -> Any:
            try:
                check_task_message(self.app, message, self._accept)
            except Refused as why:
                self._drop(message, str(why))
                return None
            return celery_handler(message)

        return on_task_received

    def _drop(self, message: Message, reason: str) -> None:
        refuse(_queue_of(message), reason, message.body)
        message.reject_log_error(logger, self.connection_errors, requeue=False)

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        self._drop(message, f"cannot be decoded ({type(exc).__name__}: {exc})")

    def on_unknown_message(self, body: Any, message: Message) -> None:
        self._drop(message, "not a Celery task message")

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        self._drop(message, f"unknown task ({exc})")

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        self._drop(message, f"invalid task message ({exc})")
