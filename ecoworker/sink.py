"""Ship terminal journal rows to PostgreSQL: COPY into staging, upsert, then mark synced.

Exactly-once in effect: the upsert is keyed by task id (the newer completion
wins), and rows are marked synced only after PostgreSQL committed, so a crash
in between re-ships rows the upsert absorbs. An outage only delays shipping:
the loop backs off and the worker keeps running tasks. A row PostgreSQL
refuses is isolated by splitting the batch and kept in the journal with its error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from ecoworker import metrics, pgschema
from ecoworker.aio import wait_event
from ecoworker.errors import ConfigError
from ecoworker.journal import Journal
from ecoworker.registry import Registry
from ecoworker.settings import SinkSettings

log = logging.getLogger("ecoworker.sink")

STAGING_COLUMNS = ("task_id", "task_name", "queue", "worker_name", "status", "args", "kwargs",
                   "result", "error", "attempts", "created_at", "started_at", "completed_at")
COMPLETED_AT = STAGING_COLUMNS.index("completed_at")
STAGING = """
CREATE TEMP TABLE IF NOT EXISTS ecoworker_staging (
    task_id text, task_name text, queue text, worker_name text, status text, args text, kwargs text,
    result text, error text, attempts integer, created_at double precision,
    started_at double precision, completed_at double precision
) ON COMMIT DELETE ROWS
"""
NEWER_WINS = """
ON CONFLICT (task_id) DO UPDATE SET task_name = EXCLUDED.task_name, queue = EXCLUDED.queue,
    worker_name = EXCLUDED.worker_name, status = EXCLUDED.status, args = EXCLUDED.args,
    kwargs = EXCLUDED.kwargs, result = EXCLUDED.result, error = EXCLUDED.error,
    attempts = EXCLUDED.attempts, created_at = EXCLUDED.created_at, started_at = EXCLUDED.started_at,
    completed_at = EXCLUDED.completed_at, synced_at = now()
WHERE t.completed_at IS NULL OR EXCLUDED.completed_at >= t.completed_at
"""
UPSERT = """
INSERT INTO task_results AS t (task_id, task_name, queue, worker_name, status, args, kwargs, result,
    error, attempts, created_at, started_at, completed_at, synced_at)
SELECT task_id, task_name, queue, worker_name, status, args::jsonb, kwargs::jsonb,
    result::jsonb, error, attempts, to_timestamp(created_at), to_timestamp(started_at),
    to_timestamp(completed_at), now()
FROM ecoworker_staging
""" + NEWER_WINS
# errors that mean "PostgreSQL is not there right now", as opposed to "this data is refused"
UNAVAILABLE = (OSError, asyncio.TimeoutError, asyncpg.exceptions.InterfaceError,
               asyncpg.exceptions.PostgresConnectionError, asyncpg.exceptions.CannotConnectNowError,
               asyncpg.exceptions.TooManyConnectionsError, asyncpg.exceptions.AdminShutdownError,
               asyncpg.exceptions.CrashShutdownError, asyncpg.exceptions.ConnectionFailureError)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.execute(STAGING)


class Sink:
    """The background loop that drains the journal's unsynced rows into `task_results`."""

    def __init__(self, settings: SinkSettings, journal: Journal, registry: Registry | None = None) -> None:
        self.settings = settings
        self.journal = journal
        self._pool: asyncpg.Pool | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._hint = 0
        self.up: bool | None = None  # None: not tried yet
        self._failures = 0

    def notify(self, finished: int, urgent: bool) -> None:
        """The scheduler journaled `finished` outcomes; ship now if urgent or a batch is full."""
        self._hint += finished
        if urgent or self._hint >= self.settings.batch_size:
            self._wake.set()

    async def run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    shipped = await self.sync_once()
                except UNAVAILABLE as exc:
                    self._down(exc)
                    await self._sleep(self._backoff())
                    continue
                except ConfigError as exc:
                    self._down(exc)
                    await self._sleep(self.settings.backoff_max)
                    continue
                except sqlite3.Error as exc:  # the journal (e.g. disk full): re-shipping later is harmless
                    log.error("could not read or mark the journal while syncing: %s; retrying", exc)
                    await self._sleep(self._backoff())
                    continue
                self._back_up()
                if shipped < self.settings.batch_size:
                    await self._sleep(self.settings.max_delay)
        finally:
            await self.close()

    async def stop(self, flush_timeout: float = 10.0) -> None:
        """Ship what is there for at most `flush_timeout` seconds, then stop."""
        self._stop.set()
        self._wake.set()
        if self.up is False:
            return
        deadline = time.monotonic() + flush_timeout
        try:
            while time.monotonic() < deadline:
                if await asyncio.wait_for(self.sync_once(), max(0.1, deadline - time.monotonic())) == 0:
                    break
        except (TimeoutError, Exception) as exc:
            log.info("results left unsynced at shutdown (shipped after restart): %s", exc)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, Exception):
                pool.terminate()

    async def sync_once(self) -> int:
        """Ship up to one batch. Returns the rows marked synced or rejected."""
        self._hint = 0
        rows = await self.journal.unsynced(self.settings.batch_size)
        if not rows:
            metrics.SYNC_LAG.set(0)
            return 0
        metrics.SYNC_LAG.set(max(0.0, time.time() - (rows[0]["completed_at"] or time.time())))
        pool = await self._ensure_pool()
        records = [tuple(r) for r in rows]
        return await self._ship(pool, records)

    async def sync_all(self) -> int:
        """Ship everything unsynced now (the seed's force_sync_all)."""
        total = 0
        while (n := await self.sync_once()) > 0:
            total += n
        return total

    async def _ship(self, pool: asyncpg.Pool, records: Sequence[tuple[Any, ...]]) -> int:
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.copy_records_to_table("ecoworker_staging", records=records,
                                                 columns=STAGING_COLUMNS)
                await conn.execute(UPSERT)
        except asyncpg.exceptions.DataError as exc:  # the driver refused a value: that row's fault
            return await self._refused(pool, records, exc)
        except UNAVAILABLE:
            raise
        except (asyncpg.PostgresError, TypeError, ValueError, OverflowError) as exc:
            return await self._refused(pool, records, exc)
        await self.journal.mark_synced([r[0] for r in records], [r[COMPLETED_AT] for r in records])
        metrics.SYNC_ROWS.inc(len(records))
        return len(records)

    async def _refused(self, pool: asyncpg.Pool, records: Sequence[tuple[Any, ...]], exc: BaseException) -> int:
        """Some row in `records` was refused: bisect until it is alone, keep it with its error."""
        if len(records) == 1:
            task_id = records[0][0]
            message = f"{type(exc).__name__}: {exc}"[:2000]
            log.error("PostgreSQL refused task %s: %s; kept in the journal", task_id, message)
            await self.journal.mark_sync_rejected(task_id, message, records[0][COMPLETED_AT])
            metrics.SYNC_REJECTED.inc()
            return 1
        half = len(records) // 2  # isolate the bad row(s), ship the rest
        return await self._ship(pool, records[:half]) + await self._ship(pool, records[half:])

    async def _ensure_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            pool = await asyncpg.create_pool(
                self.settings.dsn, min_size=0, max_size=self.settings.pool_size,
                init=_init_connection, timeout=10, command_timeout=self.settings.command_timeout,
            )
            try:
                async with pool.acquire() as conn:
                    if self.settings.auto_migrate:
                        await pgschema.migrate(conn)
                    await pgschema.check(conn)
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
        return self._pool

    def _down(self, exc: BaseException) -> None:
        metrics.SYNC_ERRORS.inc()
        metrics.POSTGRES_UP.set(0)
        self._failures += 1
        if self.up is not False:
            log.warning("PostgreSQL unavailable (%s: %s); results wait in the journal, retrying with back-off",
                        type(exc).__name__, exc)
        self.up = False
        if isinstance(exc, UNAVAILABLE) and self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def _back_up(self) -> None:
        metrics.POSTGRES_UP.set(1)
        if self.up is False:
            log.info("PostgreSQL is back after %d failed attempt(s); shipping the backlog", self._failures)
        self.up = True
        self._failures = 0

    def _backoff(self) -> float:
        return float(min(self.settings.backoff_max, 0.5 * 2 ** min(self._failures, 10)) * random.uniform(0.5, 1.0))

    async def _sleep(self, seconds: float) -> None:
        await wait_event(self._wake, seconds)
        self._wake.clear()
