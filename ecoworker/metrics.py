"""Every metric ecoworker exports, and the one HTTP port that serves them.

`/metrics` (Prometheus text), `/healthz` (the loop answers), `/readyz`
(consuming and the journal writable; never tied to PostgreSQL) and `/stats`
(the seed's `get_stats()` as JSON). Names are `ecoworker_*` with units in the
name, plus the seed's `wal_*` gauges.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

from ecoworker.aio import wait_event

log = logging.getLogger("ecoworker.metrics")

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TASK = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# the seed's gauges, names unchanged
class _UntypedGauge(Gauge):
    """The seed's `wal_tasks_total` is a gauge with a counter's suffix; exported untyped,
    promtool accepts the name the seed's dashboards already use."""

    _type = "unknown"


WAL_TASKS = _UntypedGauge("wal_tasks_total", "Journal rows by status", ["status"])
WAL_UNSYNCED = Gauge("wal_unsynced_tasks", "Terminal journal rows not yet in PostgreSQL")
WAL_SIZE = Gauge("wal_size_bytes", "Journal size on disk: database plus its -wal file")

RECEIVED = Counter("ecoworker_messages_received_total", "Deliveries received", ["queue"])
DUPLICATES = Counter("ecoworker_messages_duplicate_total", "Deliveries whose task id was already journaled")
DEAD_LETTERED = Counter("ecoworker_messages_dead_lettered_total", "Bad deliveries dead-lettered", ["reason"])
DEAD_LETTERS_PUBLISHED = Counter("ecoworker_dead_letters_published_total", "Dead-letter copies confirmed by the broker")
INGEST_BATCH = Histogram("ecoworker_ingest_batch_size", "Deliveries per journal commit",
                         buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
INGEST_SECONDS = Histogram("ecoworker_ingest_commit_seconds", "Time of one group commit", buckets=_FAST)
ACK_LATENCY = Histogram("ecoworker_delivery_to_ack_seconds", "Delivery received to ack sent", buckets=_FAST)
INGEST_ERRORS = Counter("ecoworker_ingest_errors_total", "Group commits that failed (deliveries nacked back)")
TASKS_FINISHED = Counter("ecoworker_tasks_finished_total", "Task executions by outcome", ["task", "status"])
RETRIES = Counter("ecoworker_task_retries_total", "Transient failures scheduled for another attempt", ["task"])
TASK_SECONDS = Histogram("ecoworker_task_duration_seconds", "Handler run time", ["task"], buckets=_TASK)
IN_FLIGHT = Gauge("ecoworker_tasks_in_flight", "Handlers running now")
PENDING = Gauge("ecoworker_tasks_pending", "Journal rows waiting to run")
LOOP_LAG = Gauge("ecoworker_event_loop_lag_seconds", "How late the event loop woke a 0.5 s timer")
SYNC_ROWS = Counter("ecoworker_sync_rows_total", "Rows shipped to PostgreSQL")
SYNC_ERRORS = Counter("ecoworker_sync_errors_total", "Failed PostgreSQL sync attempts")
SYNC_REJECTED = Counter("ecoworker_sync_rejected_rows_total", "Rows PostgreSQL refused (kept in the journal)")
SYNC_LAG = Gauge("ecoworker_sync_lag_seconds", "Age of the oldest terminal row not yet in PostgreSQL")
BROKER_UP = Gauge("ecoworker_broker_connected", "1 while connected to RabbitMQ")
CONSUMING = Gauge("ecoworker_consuming", "1 while consuming (0 when paused by backpressure or disconnected)")
POSTGRES_UP = Gauge("ecoworker_postgres_up", "1 while PostgreSQL answered the last sync")
RSS = Gauge("ecoworker_process_resident_memory_bytes", "Resident set size")
OPEN_FILES = Gauge("ecoworker_process_open_fds", "Open file descriptors")
WAL_FILE = Gauge("ecoworker_sqlite_wal_file_bytes", "Size of the journal's SQLite -wal file")


def observe_process() -> None:
    """Refresh RSS and open-file gauges (cheap reads of /proc)."""
    try:
        with open("/proc/self/statm") as f:
            RSS.set(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        OPEN_FILES.set(len(os.listdir("/proc/self/fd")))
    except OSError:  # not Linux: fall back to the peak, which is what getrusage has
        RSS.set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


async def watch_loop_lag(stop: asyncio.Event, interval: float = 0.5) -> None:
    """Measure how late the loop wakes a timer: a blocked loop shows up here."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        start = loop.time()
        await wait_event(stop, interval)
        LOOP_LAG.set(max(0.0, loop.time() - start - interval) if not stop.is_set() else 0.0)


Readiness = Callable[[], tuple[bool, str]]
StatsSource = Callable[[], Awaitable[dict[str, Any]]]


class MetricsServer:
    """The worker's HTTP port. `await start()` … `await close()`."""

    def __init__(self, host: str, port: int, ready: Readiness, stats: StatsSource,
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.host, self.port = host, port
        self._ready, self._stats, self._refresh = ready, stats, refresh
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/stats", self._stats_view)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if self.port == 0 and server is not None:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("metrics and probes on http://%s:%d/metrics", self.host, self.port)
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._refresh is not None:
            try:
                await self._refresh()
            except Exception as exc:  # a scrape must still answer with what we have
                log.warning("metrics refresh failed: %s", exc)
        observe_process()
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, reason = self._ready()
        body = orjson.dumps({"ready": ok, "reason": reason})
        return web.Response(body=body, status=200 if ok else 503, content_type="application/json")

    async def _stats_view(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(await self._stats()), content_type="application/json")
