"""From one delivery to one journal row: a task to run, or a bad message to dead-letter.

Pure functions, no I/O: the consumer calls `to_row` for every delivery of a
batch and writes the rows in one group commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ecoworker.envelope import TaskMessage, decode, digest_key
from ecoworker.errors import DecodeError
from ecoworker.journal import NewTask
from ecoworker.registry import Registry
from ecoworker.schema import DL_OWED

MAX_ERROR = 2000


def to_row(
    body: bytes,
    props: Mapping[str, Any],
    queue: str,
    *,
    registry: Registry,
    worker_name: str,
    max_body_bytes: int,
    now: float,
) -> tuple[NewTask, str | None]:
    """Return the journal row for a delivery and, for a bad one, its dead-letter reason."""
    headers = props.get("headers") or {}
    task_name: str | None = None
    try:
        msg = decode(
            body,
            content_type=props.get("content_type"),
            content_encoding=props.get("content_encoding"),
            headers=headers,
            message_id=props.get("message_id"),
            correlation_id=props.get("correlation_id"),
            max_body_bytes=max_body_bytes,
        )
        task_name = msg.task
        spec = registry.get(msg.task)
        if spec is None:
            raise DecodeError("unknown_task", f"task {msg.id}: no handler for {msg.task!r} on queue "
                              f"{queue!r}; known: {', '.join(sorted(s.name for s in registry))}", msg.id)
        spec.check_arguments(msg.id, msg.args, msg.kwargs)
        max_retries = spec.retry.max_retries if msg.max_retries is None else msg.max_retries
        row = _task_row(msg, queue, worker_name, max_retries, now)
        row.replays = _replays(headers)
        return row, None
    except DecodeError as exc:
        name = task_name or _text(headers.get("task")) or "(undecodable)"
        return _dead_row(exc, body, props, headers, queue, worker_name, name, now), exc.reason


def _task_row(msg: TaskMessage, queue: str, worker_name: str, max_retries: int, now: float) -> NewTask:
    expired = msg.expires is not None and msg.expires <= now
    return NewTask(
        task_id=msg.id,
        task_name=msg.task,
        worker_name=worker_name,
        queue=queue,
        args=orjson.dumps(msg.args).decode(),
        kwargs=orjson.dumps(msg.kwargs).decode(),
        status="EXPIRED" if expired else "PENDING",
        error="expired before it was received" if expired else None,
        retry_count=msg.retries,
        max_retries=max_retries,
        created_at=now,
        completed_at=now if expired else None,
        not_before=max(now, msg.eta or now),
        expires_at=msg.expires,
        timeout=msg.timelimit,
    )


def _dead_row(exc: DecodeError, body: bytes, props: Mapping[str, Any], headers: Mapping[str, Any],
              queue: str, worker_name: str, task_name: str, now: float) -> NewTask:
    key = exc.task_id or digest_key(body, props.get("content_type"), headers)
    kept = {"headers": dict(headers), "content_type": props.get("content_type"),
            "content_encoding": props.get("content_encoding"),
            "message_id": props.get("message_id"), "correlation_id": props.get("correlation_id")}
    return NewTask(
        task_id=key,
        task_name=task_name[:200],
        worker_name=worker_name,
        queue=queue,
        args="[]",
        kwargs="{}",
        status="DEAD",
        error=f"{exc.reason}: {exc}"[:MAX_ERROR],
        created_at=now,
        completed_at=now,
        not_before=now,
        dl_state=DL_OWED,
        raw_body=body,
        raw_headers=orjson.dumps(kept, default=str, option=orjson.OPT_NON_STR_KEYS).decode(),
    )


def _replays(headers: Mapping[str, Any]) -> int:
    value = headers.get("x-ecoworker-replay")
    return value if type(value) is int and value > 0 else 0


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None
