"""`ecoworker dlq list|replay`: inspect dead letters and move them back to their queue."""

from __future__ import annotations

import aio_pika

from ecoworker.deadletter import dead_queue

OURS = ("x-ecoworker-error", "x-ecoworker-task-id", "x-ecoworker-attempts", "x-original-queue")


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


async def list_dead(url: str, queue: str, limit: int) -> list[str]:
    """Describe up to `limit` dead letters; they all stay in the queue."""
    lines = []
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        dq = await channel.declare_queue(dead_queue(queue), durable=True)
        for _ in range(limit):
            msg = await dq.get(no_ack=False, fail=False)
            if msg is None:
                break
            h = msg.headers or {}
            task_id, attempts = _text(h.get("x-ecoworker-task-id", "?")), _text(h.get("x-ecoworker-attempts", 0))
            lines.append(f"{task_id}  attempts={attempts}  {_text(h.get('x-ecoworker-error', ''))[:120]}")
        await channel.close()  # unacked gets go back to the queue, in order
    finally:
        await conn.close()
    return lines


async def replay(url: str, queue: str, limit: int = 0) -> int:
    """Republish dead letters to their original queue (confirmed), then remove them."""
    moved = 0
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel(publisher_confirms=True)
        dq = await channel.declare_queue(dead_queue(queue), durable=True)
        while limit <= 0 or moved < limit:
            msg = await dq.get(no_ack=False, fail=False)
            if msg is None:
                break
            headers = dict(msg.headers or {})
            target = str(headers.get("x-original-queue") or queue)
            clean = {k: v for k, v in headers.items() if k not in OURS}
            previous = clean.get("x-ecoworker-replay")
            clean["x-ecoworker-replay"] = (previous if isinstance(previous, int) else 0) + 1
            await channel.declare_queue(target, durable=True)
            await channel.default_exchange.publish(
                aio_pika.Message(msg.body, headers=clean, content_type=msg.content_type,
                                 content_encoding=msg.content_encoding, message_id=msg.message_id,
                                 correlation_id=msg.correlation_id,
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=target,
            )
            await msg.ack()
            moved += 1
    finally:
        await conn.close()
    return moved
