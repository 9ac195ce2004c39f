"""Consume RabbitMQ queues: journal every delivery, then ack it.

Deliveries land in a buffer; one flusher takes whatever the buffer holds (up to
`ingest_batch_max`) and writes it in one durable group commit, then acks. A
batch closes when the buffer is momentarily empty, never on a timer, so a lone
message is not delayed. Acks use `multiple=True` up to the highest delivery tag
below which every delivery is settled, so no unjournaled delivery is ever acked.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from aio_pika.abc import AbstractChannel, AbstractQueue
from aiormq.abc import DeliveredMessage

from ecoworker import metrics
from ecoworker.aio import wait_event
from ecoworker.broker import Broker
from ecoworker.deliveries import InlineDeliveries
from ecoworker.intake import to_row
from ecoworker.journal import ClaimedTask, Journal, NewTask
from ecoworker.registry import Registry
from ecoworker.settings import Settings

log = logging.getLogger("ecoworker.consumer")


@dataclass(slots=True)
class Delivery:
    message: DeliveredMessage  # aiormq's: aio-pika's wrapper cost more than the rest of ingest
    queue: str
    generation: int
    received: float

    @property
    def tag(self) -> int:
        """The delivery tag (deliveries from basic.consume always have one)."""
        return int(getattr(self.message.delivery, "delivery_tag", 0) or 0)


class Starter(Protocol):
    """The scheduler, as the consumer sees it: slots for rows journaled straight as RUNNING."""

    def reserve(self, names: Sequence[str]) -> list[int]: ...

    def adopt(self, rows: list[ClaimedTask], reserved: Sequence[str]) -> None: ...


class AckTracker:
    """Settled delivery tags of one channel → the highest tag safe to ack with multiple=True."""

    def __init__(self) -> None:
        self.acked_upto = 0
        self._settled: set[int] = set()

    def settle(self, tags: list[int]) -> int | None:
        self._settled.update(tags)
        top = self.acked_upto
        while top + 1 in self._settled:
            top += 1
            self._settled.discard(top)
        if top == self.acked_upto:
            return None
        self.acked_upto = top
        return top


class Consumer:
    """Owns the consuming channel; rebuilt on every broker connection."""

    def __init__(self, settings: Settings, journal: Journal, registry: Registry, broker: Broker,
                 on_ingested: Callable[[bool, bool], None], starter: Starter | None = None) -> None:
        self.settings = settings
        self.journal = journal
        self.registry = registry
        self.broker = broker
        # called after each commit: (rows wait in the journal as PENDING, dead letters are owed)
        self.on_ingested = on_ingested
        self.starter = starter
        self._buffer: list[Delivery] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._pause_reasons: set[str] = set()
        self._channel: AbstractChannel | None = None
        self._queues: dict[str, tuple[AbstractQueue, str | None]] = {}
        self._inline = InlineDeliveries()  # the current channel's consumer tags → _receive
        self._tracker = AckTracker()
        self._generation = -1
        self.consuming = False
        self.journal_error: str | None = None
        self._journal_failures = 0  # consecutive failed ingests: the retry waits 1, 2, 4 … 10 s
        self._journal_retry_at = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self._pending_estimate = 0  # PENDING rows: exact at each check, plus what ingest added since

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Consume on every connection the broker gives us, until `stop()`."""
        flusher = asyncio.create_task(self._flush_loop(), name="ingest-flusher")
        try:
            while not self._stopping:
                try:
                    conn = await self.broker.current()
                except ConnectionError:
                    break
                generation = self.broker.generation
                try:
                    await self._open(conn, generation)
                except Exception as exc:
                    log.warning("could not start consuming: %s; retrying", exc)
                    await asyncio.sleep(1)
                    continue
                await self._wait_closed(generation)
                self._set_consuming(False)
        finally:
            self._stopping = True
            self._wake.set()
            await flusher

    async def stop(self) -> None:
        """Stop consuming at once; journal and ack what is already buffered."""
        self._stopping = True
        await self._cancel_consumers()
        self._wake.set()
        if self._channel is not None and not self._channel.is_closed:
            # let the flusher empty the buffer before the channel goes
            for _ in range(100):
                if not self._buffer:
                    break
                await asyncio.sleep(0.05)
            await self._channel.close()

    # ------------------------------------------------------------ backpressure

    def pause(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            self._pause_reasons.add(reason)
            log.warning("consumer paused: %s", reason)
            self._spawn(self._cancel_consumers())

    def resume(self, reason: str) -> None:
        if reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons:
                log.info("consumer resumed (%s cleared)", reason)
                self._spawn(self._start_consumers())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def pause_reasons(self) -> frozenset[str]:
        return frozenset(self._pause_reasons)

    async def watch_backpressure(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Pause above the high-water marks, resume below the low-water marks."""
        s = self.settings
        while not stop.is_set():
            try:
                counts = await self.journal.counts()
                self._pending_estimate = counts["pending"]
                metrics.PENDING.set(counts["pending"])
                _toggle(self, "backlog", counts["pending"] >= s.pending_high_water,
                        counts["pending"] <= s.pending_low_water)
                _toggle(self, "unsynced backlog", counts["unsynced"] >= s.unsynced_high_water,
                        counts["unsynced"] <= s.unsynced_high_water * 0.8)
                free = shutil.disk_usage(self.journal.path.parent).free
                _toggle(self, "disk nearly full", free < s.min_free_disk_bytes,
                        free >= s.min_free_disk_bytes * 1.5)
                if (self.journal_error and free >= s.min_free_disk_bytes
                        and time.monotonic() >= self._journal_retry_at):
                    self.journal_error = None
                    self.resume("journal not writable")
            except Exception as exc:
                log.warning("backpressure check failed: %s", exc)
            await wait_event(stop, interval)

    # ------------------------------------------------------------ channel

    async def _open(self, conn: object, generation: int) -> None:
        channel = await conn.channel()  # type: ignore[attr-defined]
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        self._channel, self._generation, self._tracker = channel, generation, AckTracker()
        self._queues = {}
        self._inline = InlineDeliveries()
        inline = self._inline.install(await channel.get_underlay_channel())
        metrics.INLINE.set(1 if inline else 0)
        if not inline:
            log.warning("this aiormq cannot hand deliveries over inline; each takes a task (slower)")
        for name in self.settings.queues:
            # durable, no arguments: exactly what an unchanged Celery producer declares
            queue = await channel.declare_queue(name, durable=True)
            self._queues[name] = (queue, None)
        if not self._pause_reasons:
            await self._start_consumers()

    async def _start_consumers(self) -> None:
        channel = self._channel
        if channel is None or channel.is_closed or self._stopping or self._pause_reasons:
            return
        generation = self._generation
        underlay = await channel.get_underlay_channel()
        for name, (queue, tag) in list(self._queues.items()):
            if tag is None:
                short = name.encode()[:100].decode(errors="ignore")  # a tag is a shortstr: ≤ 255 bytes
                tag = f"ecoworker.{short}.{generation}.{uuid.uuid4().hex[:12]}"
                self._inline.callbacks[tag] = partial(self._receive, name, generation)
                await underlay.basic_consume(name, partial(self._on_message, name, generation), consumer_tag=tag)
                self._queues[name] = (queue, tag)
        self._set_consuming(True)

    async def _cancel_consumers(self) -> None:
        self._set_consuming(False)
        channel = self._channel
        for name, (queue, tag) in list(self._queues.items()):
            if tag is not None:
                self._queues[name] = (queue, None)
                if channel is not None and not channel.is_closed:
                    try:
                        await (await channel.get_underlay_channel()).basic_cancel(tag)
                    except Exception as exc:  # the channel may be dying; it will be rebuilt
                        log.debug("cancel %s: %s", name, exc)
                self._inline.callbacks.pop(tag, None)  # as aiormq forgets a cancelled consumer

    async def _wait_closed(self, generation: int) -> None:
        channel = self._channel
        lost = asyncio.create_task(self.broker.wait_lost(generation))
        closed = asyncio.get_running_loop().create_future()
        if channel is not None:
            channel.close_callbacks.add(lambda *_: None if closed.done() else closed.set_result(None))
        try:
            await asyncio.wait([lost, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if not self._stopping:
            log.warning("consuming channel closed; rebuilding")

    def _set_consuming(self, on: bool) -> None:
        self.consuming = on
        metrics.CONSUMING.set(1 if on else 0)

    def _receive(self, queue: str, generation: int, message: DeliveredMessage) -> None:
        self._buffer.append(Delivery(message, queue, generation, time.monotonic()))
        self._wake.set()

    async def _on_message(self, queue: str, generation: int, message: DeliveredMessage) -> None:
        """aiormq's path, in a task per delivery (see `ecoworker.deliveries`)."""
        self._receive(queue, generation, message)

    # ------------------------------------------------------------ journal, then ack

    async def _flush_loop(self) -> None:
        limit = self.settings.ingest_batch_max
        while True:
            if not self._buffer:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._buffer[:limit] = self._buffer[:limit], []
            # shielded: a cancellation cannot split "committed" from "acked"
            await asyncio.shield(self._commit(batch))

    async def _commit(self, batch: list[Delivery]) -> None:
        if self.journal_error is not None:  # deliveries that came before the pause: not one more failed write
            await self._give_back(batch)
            return
        s = self.settings
        now = time.time()
        rows, reasons = self._rows(batch, now)
        for queue, count in Counter(d.queue for d in batch).items():  # per batch, not per delivery
            metrics.RECEIVED.labels(queue).inc(count)
        starting, reserved = self._start_now(rows, now)
        started = time.monotonic()
        try:
            new = await self.journal.ingest(rows)
        except Exception as exc:
            if self.starter is not None:
                self.starter.adopt([], reserved)
            await self._refuse(batch, exc)
            return
        if new:  # rows were written (a batch of duplicates writes nothing and proves nothing)
            self._journal_failures = 0
        metrics.INGEST_SECONDS.observe(time.monotonic() - started)
        metrics.INGEST_BATCH.observe(len(batch))
        owed = False
        pending = 0
        run_now: list[ClaimedTask] = []
        for row, reason in zip(rows, reasons, strict=True):
            if row.task_id not in new:
                metrics.DUPLICATES.inc()
                continue
            new.discard(row.task_id)  # a second copy in the same batch is a duplicate
            if reason is not None:
                metrics.DEAD_LETTERED.labels(reason).inc()
                log.warning("dead-lettering %s from %s: %s", row.task_id, row.queue, row.error)
                owed = True
            elif (claimed := starting.get(id(row))) is not None:
                run_now.append(claimed)  # the row that was written is this RUNNING copy
            else:
                pending += 1
        if self.starter is not None:
            self.starter.adopt(run_now, reserved)
        self._pending_estimate += pending
        if self._pending_estimate >= s.pending_high_water:
            self.pause("backlog")  # at once, not at the next check: the broker keeps the rest
        await self._ack(batch)
        self.on_ingested(pending > 0, owed)

    def _rows(self, batch: list[Delivery], now: float) -> tuple[list[NewTask], list[str | None]]:
        """Each delivery as a journal row, and why it is dead-lettered (None: it runs)."""
        s = self.settings
        rows, reasons = [], []
        for d in batch:
            p = d.message.header.properties
            props = {"content_type": p.content_type, "content_encoding": p.content_encoding,
                     "headers": p.headers, "message_id": p.message_id, "correlation_id": p.correlation_id}
            row, reason = to_row(d.message.body, props, d.queue, registry=self.registry,
                                 worker_name=s.worker_name, max_body_bytes=s.max_body_bytes, now=now)
            rows.append(row)
            reasons.append(reason)
        return rows, reasons

    def _start_now(self, rows: list[NewTask], now: float) -> tuple[dict[int, ClaimedTask], list[str]]:
        """Due rows the scheduler has free slots for become RUNNING rows (keyed by `id(row)`: only
        the copy that gets written may run); also the task names whose slots were reserved."""
        if self.starter is None:
            return {}, []
        due = [r for r in rows if r.status == "PENDING" and (r.not_before is None or r.not_before <= now)]
        picked = [due[i] for i in self.starter.reserve([r.task_name for r in due])] if due else []
        return {id(r): r.started(now) for r in picked}, [r.task_name for r in picked]

    async def _ack(self, batch: list[Delivery]) -> None:
        current = [d for d in batch if d.generation == self._generation]
        if len(current) < len(batch):
            log.info("%d deliveries came on a closed channel; the broker redelivers them (deduplicated)",
                     len(batch) - len(current))
        top = self._tracker.settle([d.tag for d in current])
        channel = self._channel
        if top is None or channel is None or channel.is_closed:
            return
        try:
            underlay = await channel.get_underlay_channel()
            await underlay.basic_ack(top, multiple=True)
        except Exception as exc:  # the deliveries come back and are deduplicated
            log.warning("ack failed (%s); the broker will redeliver, duplicates are skipped", exc)
            return
        done = time.monotonic()
        for d in current:
            metrics.ACK_LATENCY.observe(done - d.received)

    async def _refuse(self, batch: list[Delivery], exc: Exception) -> None:
        """The journal could not take the batch: give every delivery back to the broker, retry later."""
        metrics.INGEST_ERRORS.inc()
        self.journal_error = f"{type(exc).__name__}: {exc}"
        self._journal_failures += 1
        delay = min(10.0, 2.0 ** (self._journal_failures - 1))
        self._journal_retry_at = time.monotonic() + delay
        log.error("journal write failed (%s): %d deliveries returned to the broker, consuming paused; "
                  "retrying in %.0f s", self.journal_error, len(batch), delay)
        self.pause("journal not writable")
        await self._give_back(batch)

    async def _give_back(self, batch: list[Delivery]) -> None:
        current = [d for d in batch if d.generation == self._generation]
        for d in current:
            try:
                await d.message.channel.basic_nack(d.tag, requeue=True)
            except Exception as nack_exc:
                log.debug("nack: %s", nack_exc)
        self._tracker.settle([d.tag for d in current])


def _toggle(consumer: Consumer, reason: str, high: bool, low: bool) -> None:
    if high:
        consumer.pause(reason)
    elif low:
        consumer.resume(reason)
