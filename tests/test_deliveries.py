"""Inline deliveries (`ecoworker.deliveries`) against the stack's RabbitMQ: the same messages
as aiormq's own path, without a task per delivery."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aiormq.abc import DeliveredMessage

from ecoworker.deliveries import InlineDeliveries

# frame_max is 131,072 bytes by default: bodies over it arrive in several frames
BODIES = [b"", b"x", b"{}" * 1000, bytes(range(256)) * 1500, b"y" * (3 * 131_072 + 17)]


async def _publish(amqp: Any, queue: str, bodies: list[bytes]) -> None:
    await amqp.channel.declare_queue(queue, durable=True)
    for body in bodies:
        await amqp.channel.default_exchange.publish(aio_pika.Message(body, message_id=str(len(body))), queue)


async def _receive(channel: Any, queue: str, count: int, inline: InlineDeliveries | None,
                   tag: str) -> tuple[list[DeliveredMessage], list[DeliveredMessage]]:
    """(inline deliveries, aiormq-path deliveries) until `count` arrived in all."""
    inlined: list[DeliveredMessage] = []
    tasked: list[DeliveredMessage] = []
    done = asyncio.Event()

    def got(into: list[DeliveredMessage], message: DeliveredMessage) -> None:
        into.append(message)
        if len(inlined) + len(tasked) == count:
            done.set()

    async def on_message(message: DeliveredMessage) -> None:  # aiormq's path
        got(tasked, message)

    if inline is not None:
        inline.callbacks[tag] = lambda message: got(inlined, message)
    await channel.basic_consume(queue, on_message, consumer_tag=tag)
    await asyncio.wait_for(done.wait(), 30)
    return inlined, tasked


class TestInline:
    async def test_bodies_arrive_whole_and_in_order(self, amqp: Any, stack_env: dict[str, str],
                                                      queue_name: str) -> None:
        """Empty, small and multi-frame bodies reach the registered function intact, in
        publishing order, with their properties, and none goes through aiormq's task."""
        await _publish(amqp, queue_name, BODIES)
        conn = await aio_pika.connect(stack_env["RABBITMQ_URL"])
        try:
            channel = await (await conn.channel()).get_underlay_channel()
            inline = InlineDeliveries()
            assert inline.install(channel)
            inlined, tasked = await _receive(channel, queue_name, len(BODIES), inline, "ours")
            assert tasked == []
            assert [m.body for m in inlined] == BODIES
            assert [m.header.properties.message_id for m in inlined] == [str(len(b)) for b in BODIES]
        finally:
            await conn.close()

    async def test_other_consumers_keep_aiormq_path(self, amqp: Any, stack_env: dict[str, str],
                                                    queue_name: str) -> None:
        """A consumer tag nobody registered inline still gets its deliveries from aiormq, whole."""
        await _publish(amqp, queue_name, BODIES)
        conn = await aio_pika.connect(stack_env["RABBITMQ_URL"])
        try:
            channel = await (await conn.channel()).get_underlay_channel()
            assert InlineDeliveries().install(channel)
            inlined, tasked = await _receive(channel, queue_name, len(BODIES), None, "theirs")
            assert inlined == []
            assert [m.body for m in tasked] == BODIES
        finally:
            await conn.close()

    async def test_a_failing_function_does_not_stop_the_channel(self, amqp: Any, stack_env: dict[str, str],
                                                                 queue_name: str) -> None:
        """A function that raises is logged, as aiormq logs a failed callback task; the next
        deliveries still arrive."""
        await _publish(amqp, queue_name, [b"1", b"2", b"3"])
        conn = await aio_pika.connect(stack_env["RABBITMQ_URL"])
        try:
            channel = await (await conn.channel()).get_underlay_channel()
            inline = InlineDeliveries()
            assert inline.install(channel)
            seen: list[bytes] = []
            done = asyncio.Event()

            def on_message(message: DeliveredMessage) -> None:
                seen.append(message.body)
                if len(seen) == 3:
                    done.set()
                if message.body == b"1":
                    raise RuntimeError("boom")

            async def unused(message: DeliveredMessage) -> None:
                raise AssertionError("took aiormq's path")

            inline.callbacks["ours"] = on_message
            await channel.basic_consume(queue_name, unused, consumer_tag="ours")
            await asyncio.wait_for(done.wait(), 30)
            assert seen == [b"1", b"2", b"3"]
            assert not channel.is_closed
        finally:
            await conn.close()

    def test_an_aiormq_without_the_hook_is_left_alone(self) -> None:
        """A channel without `_on_deliver_frame` (a changed aiormq) is not touched: install()
        says so, and deliveries keep aiormq's path."""

        class Changed:
            consumers: dict[str, Any] = {}

            async def _get_frame(self) -> None: ...

        channel = Changed()
        assert not InlineDeliveries().install(channel)
        assert "_on_deliver_frame" not in vars(channel)
