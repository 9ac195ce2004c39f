"""Decoding deliveries into tasks: the native JSON envelope and Celery protocol v2.

`decode()` turns the body and AMQP properties of one delivery into a
`TaskMessage`, or raises `DecodeError` with a stable reason. It never raises
anything else, whatever the bytes (a property-based test holds it to that), and it
never unpickles: `application/x-python-serialize` is refused outright.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from ecoworker.errors import DecodeError

JSON_TYPES = frozenset({"application/json", "text/json"})
PICKLE_TYPES = frozenset({"application/x-python-serialize", "application/python-pickle"})
MAX_NAME = 200
MAX_ID = 255


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """One decoded task, protocol-independent."""

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    eta: float | None = None  # epoch seconds; run no earlier
    expires: float | None = None  # epoch seconds; do not run after
    max_retries: int | None = None
    retries: int = 0
    timelimit: float | None = None  # Celery's hard time limit, seconds
    protocol: str = "native"


def decode(
    body: bytes,
    *,
    content_type: str | None = None,
    content_encoding: str | None = None,
    headers: Mapping[str, Any] | None = None,
    message_id: str | None = None,
    correlation_id: str | None = None,
    max_body_bytes: int = 1024 * 1024,
) -> TaskMessage:
    """Decode one delivery. Raises DecodeError(reason, message) for anything unusable."""
    headers = headers or {}
    hint = _hint(headers, message_id, correlation_id)
    if len(body) > max_body_bytes:
        raise DecodeError("too_large", f"body is {len(body)} bytes, over the {max_body_bytes} limit", hint)
    ctype = (_text(content_type) or "").split(";")[0].strip().lower()
    if ctype in PICKLE_TYPES:
        raise DecodeError("pickle", "pickled payloads are never loaded: publish with the JSON serializer", hint)
    if ctype and ctype not in JSON_TYPES:
        raise DecodeError("content_type", f"content type {ctype!r} is not supported: use application/json", hint)
    encoding = (_text(content_encoding) or "utf-8").lower()
    if encoding not in ("utf-8", "utf8"):
        raise DecodeError("content_encoding", f"content encoding {encoding!r} is not supported: use utf-8", hint)
    if headers.get("compression") is not None:
        raise DecodeError("compressed", "compressed Celery messages are not supported", hint)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("bad_json", f"body is not valid UTF-8 JSON: {exc}", hint) from None
    if headers.get("task") is not None:
        return _celery(payload, headers, correlation_id)
    return _native(payload, message_id)


def _native(payload: Any, message_id: str | None) -> TaskMessage:
    if not isinstance(payload, dict):
        raise DecodeError("bad_shape", "native envelope must be a JSON object with 'id' and 'task'")
    task_id = _task_id(payload.get("id", None) or message_id)
    task = _task_name(payload.get("task"), task_id)
    args = payload.get("args", [])
    kwargs = payload.get("kwargs", {})
    _check_args(task_id, args, kwargs)
    max_retries = payload.get("max_retries")
    if max_retries is not None and (type(max_retries) is not int or not 0 <= max_retries <= 1000):
        raise DecodeError("bad_field", f"task {task_id}: max_retries must be an integer 0..1000", task_id)
    return TaskMessage(
        id=task_id,
        task=task,
        args=args,
        kwargs=kwargs,
        eta=_time(payload.get("eta"), "eta", task_id),
        expires=_time(payload.get("expires"), "expires", task_id),
        max_retries=max_retries,
    )


def _celery(payload: Any, headers: Mapping[str, Any], correlation_id: str | None) -> TaskMessage:
    task_id = _task_id(headers.get("id") or correlation_id)
    task = _task_name(headers.get("task"), task_id)
    if not isinstance(payload, list) or len(payload) != 3:
        raise DecodeError("bad_shape", f"task {task_id}: Celery body must be [args, kwargs, embed]", task_id)
    args, kwargs, _embed = payload
    _check_args(task_id, args, kwargs)
    retries = headers.get("retries") or 0
    if type(retries) is not int or retries < 0:
        raise DecodeError("bad_field", f"task {task_id}: header 'retries' must be a non-negative integer", task_id)
    return TaskMessage(
        id=task_id,
        task=task,
        args=args,
        kwargs=kwargs,
        eta=_time(headers.get("eta"), "eta", task_id),
        expires=_time(headers.get("expires"), "expires", task_id),
        retries=retries,
        timelimit=_timelimit(headers.get("timelimit"), task_id),
        protocol="celery",
    )


def encode(msg: TaskMessage) -> bytes:
    """The native envelope for `msg` (used by the client, drain and dead letters)."""
    doc: dict[str, Any] = {"id": msg.id, "task": msg.task, "args": msg.args, "kwargs": msg.kwargs}
    if msg.eta is not None:
        doc["eta"] = datetime.fromtimestamp(msg.eta, UTC).isoformat()
    if msg.expires is not None:
        doc["expires"] = datetime.fromtimestamp(msg.expires, UTC).isoformat()
    if msg.max_retries is not None:
        doc["max_retries"] = msg.max_retries
    return orjson.dumps(doc)


def digest_key(body: bytes, content_type: str | None, headers: Mapping[str, Any] | None) -> str:
    """A stable journal key for a bad delivery that carries no usable id."""
    h = hashlib.sha256()
    h.update(body)
    h.update(b"\0" + (content_type or "").encode("utf-8", "replace") + b"\0")
    for key in sorted(headers or {}):
        h.update(f"{key}={(headers or {})[key]!r}\0".encode("utf-8", "replace"))
    return "digest:" + h.hexdigest()[:40]


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value) if isinstance(value, str) and value else None


def _hint(headers: Mapping[str, Any], message_id: Any, correlation_id: Any) -> str | None:
    """The id an early refusal is keyed by: the one decode() would use, and only if it is valid."""
    celery = headers.get("task") is not None
    value = (_text(headers.get("id")) or _text(correlation_id)) if celery else _text(message_id)
    return value if value is not None and len(value) <= MAX_ID and value.isprintable() else None


def _task_id(raw: Any) -> str:
    value = _text(raw)
    if value is None:
        raise DecodeError("missing_id", "message has no task id (body 'id', message_id or Celery 'id' header)")
    if len(value) > MAX_ID or not value.isprintable():
        raise DecodeError("bad_id", f"task id must be printable and at most {MAX_ID} characters")
    return value


def _task_name(raw: Any, task_id: str) -> str:
    value = _text(raw)
    if value is None:
        raise DecodeError("missing_task", f"task {task_id}: no task name", task_id)
    if len(value) > MAX_NAME or not value.isprintable():
        raise DecodeError("bad_task_name", f"task {task_id}: task name is not printable or too long", task_id)
    return value


def _check_args(task_id: str, args: Any, kwargs: Any) -> None:
    if not isinstance(args, list):
        raise DecodeError("bad_args", f"task {task_id}: args must be a JSON array", task_id)
    if not isinstance(kwargs, dict):
        raise DecodeError("bad_args", f"task {task_id}: kwargs must be a JSON object", task_id)
    for key in kwargs:
        if not key.isidentifier():
            raise DecodeError("bad_args", f"task {task_id}: kwarg {key[:50]!r} is not a valid name", task_id)


def _time(value: Any, field: str, task_id: str) -> float | None:
    if value is None:
        return None
    text = _text(value)
    if text is None:
        raise DecodeError("bad_field", f"task {task_id}: {field} must be an ISO 8601 string", task_id)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise DecodeError("bad_field", f"task {task_id}: {field}={text[:40]!r} is not ISO 8601", task_id) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return when.timestamp()
    except (OverflowError, ValueError, OSError):
        raise DecodeError("bad_field", f"task {task_id}: {field} is out of range", task_id) from None


def _timelimit(value: Any, task_id: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise DecodeError("bad_field", f"task {task_id}: timelimit must be [hard, soft]", task_id)
    limits = [v for v in value if v is not None]
    for limit in limits:
        if type(limit) not in (int, float) or not 0 < limit < 1e9:
            raise DecodeError("bad_field", f"task {task_id}: timelimit values must be positive", task_id)
    return float(min(limits)) if limits else None
