"""Dead letters, journal-first: publish owed copies to `<queue>.dead` with confirms.

A bad delivery (or a task that failed for good) is committed to the journal
with `dl_state = 1` before its delivery is acked. This loop publishes each owed
copy with publisher confirms and then marks it sent in one statement, so a
kill between the two repeats at most that one dead letter.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel

from ecoworker import metrics
from ecoworker.aio import wait_event
from ecoworker.broker import Broker
from ecoworker.envelope import TaskMessage, encode
from ecoworker.journal import Journal

log = logging.getLogger("ecoworker.deadletter")


def dead_queue(queue: str) -> str:
    return f"{queue}.dead"


def dead_letter_message(row: Any) -> aio_pika.Message:
    """The copy to publish for one journal row: the original body and headers when we have them."""
    extra = {
        "x-ecoworker-error": (row["error"] or "")[:1000],
        "x-ecoworker-task-id": row["task_id"],
        "x-ecoworker-attempts": int(row["attempts"] or 0),
        "x-original-queue": row["queue"] or "",
    }
    if row["replays"]:  # so that the next `dlq replay` counts on from here
        extra["x-ecoworker-replay"] = int(row["replays"])
    if row["raw_body"] is not None:
        kept = orjson.loads(row["raw_headers"] or "{}")
        headers = {k: v for k, v in (kept.get("headers") or {}).items() if v is not None}
        return aio_pika.Message(
            body=bytes(row["raw_body"]), headers={**headers, **extra},
            content_type=kept.get("content_type"), content_encoding=kept.get("content_encoding"),
            message_id=kept.get("message_id"), correlation_id=kept.get("correlation_id"),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
    body = encode(TaskMessage(id=row["task_id"], task=row["task_name"], args=orjson.loads(row["args"]),
                              kwargs=orjson.loads(row["kwargs"])))
    return aio_pika.Message(body=body, headers=extra, content_type="application/json",
                            message_id=row["task_id"], delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


class DeadLetterPublisher:
    """Publishes the journal's owed dead letters whenever woken (and every few seconds)."""

    def __init__(self, journal: Journal, broker: Broker, interval: float = 5.0) -> None:
        self.journal = journal
        self.broker = broker
        self.interval = interval
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._channel: AbstractChannel | None = None
        self._declared: set[str] = set()
        self._lock = asyncio.Lock()  # run() and stop() must never publish the same row twice

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                sent = await self.publish_owed()
                failures = 0
                if sent:
                    continue
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning("dead-letter publishing failed (%d in a row): %s", failures, exc)
                self._channel = None
            await self._sleep(min(30.0, self.interval * 2 ** min(failures, 3)) if failures else self.interval)
        await self._close()

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """One last bounded flush, then stop."""
        self._stop.set()
        self._wake.set()
        try:
            await asyncio.wait_for(self.publish_owed(), flush_timeout)
        except (TimeoutError, Exception) as exc:
            log.info("dead letters left owed at shutdown (sent at next start): %s", exc)

    async def publish_owed(self) -> int:
        async with self._lock:
            return await self._publish_owed()

    async def _publish_owed(self) -> int:
        rows = await self.journal.owed_dead_letters(100)
        if not rows:
            return 0
        channel = await self._ensure_channel()
        for row in rows:
            queue = dead_queue(row["queue"] or "unknown")
            if queue not in self._declared:
                await channel.declare_queue(queue, durable=True)
                self._declared.add(queue)
            await channel.default_exchange.publish(dead_letter_message(row), routing_key=queue)
            await self.journal.mark_dead_lettered(row["task_id"])  # the only repeat window
            metrics.DEAD_LETTERS_PUBLISHED.inc()
        return len(rows)

    async def _ensure_channel(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            conn = await asyncio.wait_for(self.broker.current(), 10)
            self._channel = await conn.channel(publisher_confirms=True)
            self._declared = set()
        return self._channel

    async def _sleep(self, seconds: float) -> None:
        await wait_event(self._wake, seconds)
        self._wake.clear()

    async def _close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            try:
                await self._channel.close()
            except Exception as exc:
                log.debug("closing dead-letter channel: %s", exc)
