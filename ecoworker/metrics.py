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
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app

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
INLINE = Gauge("ecoworker_deliveries_inline",
               "1 when deliveries reach the journal without a task each; 0: this aiormq takes its slower path")
POSTGRES_UP = Gauge("ecoworker_postgres_up", "1 while PostgreSQL answered the last sync")
RSS = Gauge("ecoworker_process_resident_memory_bytes", "Resident set size")
WRITER_RSS = Gauge("ecoworker_journal_writer_resident_memory_bytes",
                   "Resident set size of the journal writer process (0 when there is none)")
OPEN_FILES = Gauge("ecoworker_process_open_fds", "Open file descriptors")
WAL_FILE = Gauge("ecoworker_sqlite_wal_file_bytes", "Size of the journal's SQLite -wal file")


def observe_process() -> None:
    """Refresh RSS and open-file gauges (cheap reads of /proc)."""
    rss = resident_bytes("self")
    RSS.set(rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    try:
        OPEN_FILES.set(len(os.listdir("/proc/self/fd")))
    except OSError:  # not Linux
        pass


def resident_bytes(pid: int | str) -> int | None:
    """The resident set size of process `pid` ("self": this one), or None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


async def watch_loop_lag(stop: asyncio.Event, interval: float = 0.5) -> None:
    """Measure how late the loop wakes a timer: a blocked loop shows up here."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        start = loop.time()
        await wait_event(stop, interval)
        LOOP_LAG.set(max(0.0, loop.time() - start - interval) if not stop.is_set() else 0.0)


Readiness = Callable[[], tuple[bool, str]]
StatsSource = Callable[[], Awaitable[dict[str, Any]]]

LOOP_ANSWER_SECONDS = 3.0  # /healthz fails when the event loop cannot run a callback this fast
POLL_SECONDS = 0.2  # how often the server's thread looks for `close()`
# a client that connects and then sends nothing (or stops half-way) is dropped after this many
# seconds, instead of holding one of the server's threads for good
READ_TIMEOUT_SECONDS = 10.0


class MetricsServer:
    """The worker's HTTP port. `await start()` … `await close()`.

    The standard library's WSGI server in one thread, as prometheus_client's own
    `start_http_server` runs it: the probes no longer import aiohttp, which took a third of
    a second of every start-up. Anything that reads the worker's state runs on the event loop
    (`run_coroutine_threadsafe`), so /healthz answers 200 only while the loop is turning."""

    def __init__(self, host: str, port: int, ready: Readiness, stats: StatsSource,
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.host, self.port = host, port
        self._ready, self._stats, self._refresh = ready, stats, refresh
        self._httpd: WSGIServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exposition = make_wsgi_app(REGISTRY)  # content negotiation, gzip, name[] filters

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        server_class = _Server6 if ":" in self.host else _Server
        self._httpd = make_server(self.host, self.port, self._app, server_class=server_class,
                                  handler_class=_QuietHandler)
        self._httpd.read_timeout = READ_TIMEOUT_SECONDS  # type: ignore[attr-defined]
        self.port = self._httpd.server_port
        threading.Thread(target=self._httpd.serve_forever, args=(POLL_SECONDS,), name="metrics-http",
                         daemon=True).start()  # ends when close() shuts the server down
        log.info("metrics and probes on http://%s:%d/metrics", self.host, self.port)
        return self.port

    async def close(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            await asyncio.to_thread(httpd.shutdown)  # waits for serve_forever to return
            httpd.server_close()

    # ------------------------------------------------------------ in the server's threads

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _json(start_response, 405, {"error": "only GET and HEAD"})
        try:
            if path == "/metrics":
                self._on_loop(self._refreshed(), 10.0)
                body: Iterable[bytes] = self._exposition(environ, start_response)
                return body
            if path == "/healthz":
                self._on_loop(asyncio.sleep(0), LOOP_ANSWER_SECONDS)
                return _json(start_response, 200, {"status": "ok"})
            if path == "/readyz":
                ok, reason = self._on_loop(self._readiness(), LOOP_ANSWER_SECONDS)
                return _json(start_response, 200 if ok else 503, {"ready": ok, "reason": reason})
            if path == "/stats":
                return _json(start_response, 200, self._on_loop(self._stats_now(), 30.0))
        except TimeoutError:  # concurrent.futures' too, since Python 3.11
            return _json(start_response, 503, {"status": "event loop not answering", "path": path})
        except RuntimeError as exc:  # the loop is closed: the worker is on its way out
            return _json(start_response, 503, {"status": f"stopping: {exc}", "path": path})
        return _json(start_response, 404, {"error": f"no such path {path!r}",
                                           "paths": ["/metrics", "/healthz", "/readyz", "/stats"]})

    def _on_loop(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coro` on the worker's loop and wait for it here, at most `timeout` seconds."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    # ------------------------------------------------------------ on the loop

    async def _refreshed(self) -> None:
        if self._refresh is not None:
            try:
                await self._refresh()
            except Exception as exc:  # a scrape must still answer with what we have
                log.warning("metrics refresh failed: %s", exc)
        observe_process()

    async def _readiness(self) -> tuple[bool, str]:
        return self._ready()

    async def _stats_now(self) -> dict[str, Any]:
        return await self._stats()


StartResponse = Callable[[str, list[tuple[str, str]]], Any]
T = TypeVar("T")


def _json(start_response: StartResponse, status: int, body: Any) -> list[bytes]:
    data = orjson.dumps(body)
    start_response(f"{status} {HTTPStatus(status).phrase}",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress does not hold up the worker's exit

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A line in our log instead of the standard library's traceback on stderr: a client
        that timed out or went away is routine, anything else is worth a look."""
        exc = sys.exc_info()[1]
        if isinstance(exc, TimeoutError | ConnectionError):
            log.debug("metrics client %s dropped: %r", client_address, exc)
        else:
            log.warning("metrics request from %s failed", client_address, exc_info=exc)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(getattr(self.server, "read_timeout", READ_TIMEOUT_SECONDS))

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: Prometheus and the kubelet poll every few seconds."""
