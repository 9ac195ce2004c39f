"""The worker's lifecycle: startup → run → shutdown, in one `serve()`.

open journal → recover → connect → consumer, scheduler, dead letters, sink,
maintenance and probes in one TaskGroup → wait for a stop signal → drain in
order → close in reverse order of opening → checkpoint(TRUNCATE).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from ecoworker import metrics
from ecoworker.broker import Broker
from ecoworker.consumer import Consumer
from ecoworker.deadletter import DeadLetterPublisher
from ecoworker.journal import Journal, Outcome
from ecoworker.lockfile import JournalLock
from ecoworker.maintenance import Maintenance
from ecoworker.registry import Registry
from ecoworker.scheduler import Scheduler
from ecoworker.schema import ALL_STATUSES
from ecoworker.settings import Settings
from ecoworker.sink import Sink

log = logging.getLogger("ecoworker.worker")
ResourcesFactory = Callable[[], AbstractAsyncContextManager[Any]]


@contextlib.asynccontextmanager
async def _no_resources() -> AsyncIterator[None]:
    yield None


class Worker:
    """One worker process. `await Worker(settings, registry).serve()` returns the exit code."""

    def __init__(self, settings: Settings, registry: Registry,
                 resources: ResourcesFactory | None = None) -> None:
        self.settings = settings
        self.registry = registry.for_queues(settings.queues)
        self._resources = resources or _no_resources
        self._stop = asyncio.Event()
        self.metrics_port: int | None = None
        self.consumer: Consumer | None = None
        self.journal: Journal | None = None

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> int:
        s = self.settings
        log.info("ecoworker starting: worker %s, queues %s, journal %s, %d task type(s)",
                 s.worker_name, ",".join(s.queues), s.wal_path, len(self.registry))
        with JournalLock(s.wal_path, "two workers must never share a journal: stop the other one, "
                         "or give this one its own WAL_DB_PATH"):
            return await self._serve_locked()

    async def _serve_locked(self) -> int:
        s = self.settings
        async with Journal.open(s.wal_path, writer_process=s.journal_process) as journal:
            self.journal = journal
            recovery = await journal.recover(time.time(), s.default_max_retries)
            log.info("recovered from the journal: %d pending, %d re-queued after a crash, %d buried as DEAD",
                     recovery.pending, recovery.requeued, recovery.dead)
            broker = Broker(s.rabbitmq_url, s.connect_timeout)
            await broker.connect_first()
            await journal.ready()  # its writer process started while we connected
            try:
                async with self._resources() as resources:
                    await self._run(journal, broker, resources)
            finally:
                await broker.close()
            busy, _pages, _done = await journal.checkpoint("TRUNCATE")
            log.info("journal checkpointed%s; bye", " (a reader kept the -wal file)" if busy else "")
        return 0

    async def _run(self, journal: Journal, broker: Broker, resources: Any) -> None:
        s = self.settings
        dead_letters = DeadLetterPublisher(journal, broker)
        sink = Sink(s.sink, journal, self.registry) if s.sink.dsn else None
        maintenance = Maintenance(s.maintenance, journal)

        def on_finished(outcomes: list[Outcome], urgent: bool) -> None:
            if any(o.dl_state for o in outcomes):
                dead_letters.wake()
            if sink is not None:
                sink.notify(len(outcomes), urgent)

        scheduler = Scheduler(s, journal, self.registry, resources, on_finished)

        def on_ingested(pending: bool, owed: bool) -> None:
            if pending:  # rows the consumer could not start at once
                scheduler.wake()
            if owed:
                dead_letters.wake()

        consumer = Consumer(s, journal, self.registry, broker, on_ingested, starter=scheduler)
        self.consumer = consumer
        server = metrics.MetricsServer(s.metrics_host, s.metrics_port, self._readiness,
                                       journal.get_stats, self._refresh_gauges)
        if s.metrics_port >= 0:
            self.metrics_port = await server.start()
        background_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(broker.run(), name="broker")
                tg.create_task(consumer.run(), name="consumer")
                tg.create_task(scheduler.run(), name="scheduler")
                tg.create_task(dead_letters.run(), name="dead-letters")
                tg.create_task(maintenance.run(), name="maintenance")
                tg.create_task(consumer.watch_backpressure(background_stop), name="backpressure")
                tg.create_task(metrics.watch_loop_lag(background_stop), name="loop-lag")
                if sink is not None:
                    tg.create_task(sink.run(), name="sink")
                log.info("worker ready: consuming %s", ",".join(s.queues))
                await self._stop.wait()
                log.info("shutting down: no new deliveries; %d task(s) running", scheduler.in_flight)
                # 1. stop taking work: cancel consumers, journal and ack what is buffered
                await consumer.stop()
                # 2. let running handlers finish within the grace period; the rest go back to PENDING
                await scheduler.stop(s.grace_period)
                # 3. publish owed dead letters, ship results (each bounded)
                await dead_letters.stop()
                if sink is not None:
                    await sink.stop(flush_timeout=min(10.0, s.grace_period / 4))
                maintenance.stop()
                background_stop.set()
                await broker.close()
        finally:
            await server.close()

    def _readiness(self) -> tuple[bool, str]:
        c = self.consumer
        if c is None:
            return False, "starting"
        if c.journal_error:
            return False, f"journal not writable: {c.journal_error}"
        if not c.broker.connected:
            return False, "broker disconnected"
        if c.pause_reasons:
            return False, "paused: " + ", ".join(sorted(c.pause_reasons))
        if not c.consuming:
            return False, "not consuming"
        return True, "consuming"

    async def _refresh_gauges(self) -> None:
        if self.journal is None:
            return
        stats = await self.journal.get_stats()
        by_status = stats["by_status"]
        for status in {*ALL_STATUSES, *by_status}:  # a status whose rows are gone reads 0
            metrics.WAL_TASKS.labels(status).set(by_status.get(status, 0))
        counts = await self.journal.counts()
        metrics.WAL_UNSYNCED.set(counts["unsynced"])
        metrics.PENDING.set(counts["pending"])
        oldest = counts["oldest_unsynced"]
        metrics.SYNC_LAG.set(max(0.0, time.time() - oldest) if oldest else 0.0)
        writer = self.journal.writer_pid
        metrics.WRITER_RSS.set((metrics.resident_bytes(writer) or 0) if writer is not None else 0)
        metrics.WAL_SIZE.set(self.journal.size_bytes())
        metrics.WAL_FILE.set(self.journal.wal_file.stat().st_size if self.journal.wal_file.exists() else 0)
