"""Network faults between a real worker and its servers, injected by a TCP proxy (tests/tcp_proxy.py).

The worker subprocess reaches RabbitMQ or PostgreSQL through the proxy; the test
cuts, delays, blackholes or refuses its connections while it works. The servers
themselves are the shared stack's and are never stopped: only the proxy misbehaves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.tcp_proxy import TcpProxy
from tests.workers import WorkerProcess, fresh_database, journal_rows, statuses, wait_for


def _target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


@pytest.fixture
def rabbit_proxy(stack_env: dict[str, str]) -> Iterator[TcpProxy]:
    """A proxy in front of the shared RabbitMQ."""
    with TcpProxy(*_target(stack_env["RABBITMQ_URL"])) as proxy:
        yield proxy


@pytest.fixture
async def pg(stack_env: dict[str, str]) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """(DSN of a fresh migrated database, a direct connection to it)."""
    async with fresh_database(stack_env["POSTGRES_DSN"]) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            yield dsn, conn
        finally:
            await conn.close()


async def _done(amqp: Any, queue: str, w: WorkerProcess, ids: list[str]) -> bool:
    st = statuses(w.wal)
    return all(st.get(i) == "SUCCESS" for i in ids) and await amqp.depth(queue) == 0


def _assert_each_ran_once(w: WorkerProcess, ids: list[str]) -> None:
    rows = journal_rows(w.wal)
    assert sorted(r["task_id"] for r in rows) == sorted(ids)
    assert {r["status"] for r in rows} == {"SUCCESS"}
    reruns = [r["task_id"] for r in rows if r["attempts"] != 1]
    assert reruns == [], f"{len(reruns)} task(s) ran more than once"


def _restored(w: WorkerProcess) -> int:
    return w.log_text().count("broker connection restored")


async def _in_pg(conn: asyncpg.Connection, ids: list[str]) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM task_results WHERE task_id = ANY($1::text[])", ids))


def _unsynced(w: WorkerProcess) -> int:
    return int(journal_rows(w.wal, "SELECT count(*) FROM task_wal WHERE synced_to_postgres = 0")[0][0])


class TestBrokerThroughProxy:
    async def test_cut_connections_mid_run_reconnect_without_restart(self, amqp, queue_name, workers, rabbit_proxy,
                                                                    stack_env):
        """Six connection cuts (one with connects refused 2 s) mid-run: same process reconnects; each task runs once."""
        await amqp.declare(queue_name)
        w = workers(queue_name, args=("--prefetch", "100"), RABBITMQ_URL=rabbit_proxy.url(stack_env["RABBITMQ_URL"]),
                    ECOWORKER_PENDING_HIGH_WATER="150", ECOWORKER_PENDING_LOW_WATER="50")
        await asyncio.to_thread(w.wait_ready)
        ids: list[str] = []

        async def publish() -> None:
            for _ in range(12):
                ids.extend(await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"n": i} for i in range(250)]))
                await asyncio.sleep(0.4)

        publisher = asyncio.create_task(publish())
        cut = 0
        while cut < 6:
            await asyncio.sleep(1.0)
            assert rabbit_proxy.cut() >= 1, "the worker had no connection open to cut"
            cut += 1
            if cut == 3:
                rabbit_proxy.refuse()
                await asyncio.sleep(2)
                rabbit_proxy.pass_()
            await wait_for(lambda c=cut: _restored(w) >= c, 20, message=lambda: w.log_text()[-2000:])
        await publisher
        await wait_for(lambda: _done(amqp, queue_name, w, ids), 60, message=lambda: w.log_text()[-2000:])
        _assert_each_ran_once(w, ids)
        assert len(ids) == 3000
        assert w.alive and w.starts == 1
        # ready again by itself (a backlog pause may still be lifting when the last task lands)
        await wait_for(lambda: w.http("/readyz")[0] == 200, 20, message=lambda: str(w.http("/readyz")))

    async def test_200ms_latency_per_chunk_still_completes(self, amqp, queue_name, workers, rabbit_proxy, stack_env):
        """With 200 ms added to every chunk in each direction the worker connects, and 500 tasks complete once."""
        rabbit_proxy.delay(0.2)
        ids = await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"n": i} for i in range(500)])
        w = workers(queue_name, RABBITMQ_URL=rabbit_proxy.url(stack_env["RABBITMQ_URL"]))
        await wait_for(lambda: _done(amqp, queue_name, w, ids), 60, message=lambda: w.log_text()[-2000:])
        _assert_each_ran_once(w, ids)
        assert rabbit_proxy.accepted == 1, "a slow link must not make the worker reconnect"

    @pytest.mark.slow
    async def test_blackhole_then_pass_recovers_with_a_short_heartbeat(self, amqp, queue_name, workers,
                                                                      rabbit_proxy, stack_env):
        """With heartbeat=5 a silently dropped connection is replaced soon after the network passes; each task once."""
        url = rabbit_proxy.url(stack_env["RABBITMQ_URL"]) + "?heartbeat=5"
        await self._blackhole_then_pass(amqp, queue_name, workers, rabbit_proxy, url, within=45)

    @pytest.mark.slow
    async def test_blackhole_then_pass_recovers_with_default_settings(self, amqp, queue_name, workers,
                                                                     rabbit_proxy, stack_env):
        """With a plain RABBITMQ_URL a silently dropped connection is replaced within 60 s of the network passing."""
        url = rabbit_proxy.url(stack_env["RABBITMQ_URL"])
        await self._blackhole_then_pass(amqp, queue_name, workers, rabbit_proxy, url, within=60)

    async def _blackhole_then_pass(self, amqp: Any, queue: str, workers: Any, proxy: TcpProxy, url: str,
                                   within: float) -> None:
        await amqp.declare(queue)
        w = workers(queue, RABBITMQ_URL=url)
        await asyncio.to_thread(w.wait_ready)
        ids = await amqp.publish_tasks(queue, "ecoworker.noop", [{"n": i} for i in range(100)])
        await wait_for(lambda: _done(amqp, queue, w, ids), 30)
        proxy.blackhole()
        ids += await amqp.publish_tasks(queue, "ecoworker.noop", [{"n": i} for i in range(300)])
        await asyncio.sleep(10)
        assert w.alive
        done_in_blackhole = sum(s == "SUCCESS" for s in statuses(w.wal).values())
        assert done_in_blackhole == 100, "nothing can arrive through a blackhole"
        proxy.pass_()
        passed = time.monotonic()
        await wait_for(lambda: _done(amqp, queue, w, ids), within, message=lambda: (
            f"the worker did not recover within {within}s of the network passing again: "
            f"{sum(s == 'SUCCESS' for s in statuses(w.wal).values())}/{len(ids)} done, "
            f"{proxy.accepted} connection(s) ever made to the broker. A connection that went silent is only "
            "noticed by AMQP heartbeats, and aiormq's default (60 s, dead after 3 missed = 183 s) is too slow; "
            "the broker connection should default to a short heartbeat (ecoworker.broker.Broker._open: add "
            "heartbeat=10 to the URL unless it sets one).\n" + w.log_text()[-1500:]))
        print(f"recovered {time.monotonic() - passed:.1f}s after the network passed again")
        _assert_each_ran_once(w, ids)
        assert w.alive and w.starts == 1
        assert "broker connection lost" in w.log_text()


class TestPostgresThroughProxy:
    async def test_cut_and_refused_postgres_results_wait_then_ship_once(self, amqp, queue_name, workers, pg,
                                                                       stack_env):
        """PostgreSQL cut and refused: work goes on, results wait in the journal, then ship once each."""
        dsn, conn = pg
        with TcpProxy(*_target(dsn)) as proxy:
            w = workers(queue_name, POSTGRES_DSN=proxy.url(dsn), ECOWORKER_SYNC_BACKOFF_MAX="2")
            first = await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"n": i} for i in range(200)])
            await wait_for(lambda: _in_pg(conn, first), 30, message=lambda: w.log_text()[-2000:])
            assert await _in_pg(conn, first) == 200
            proxy.refuse()
            assert proxy.cut() >= 1
            later = await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"n": i} for i in range(300)])
            await wait_for(lambda: _done(amqp, queue_name, w, first + later), 30)
            await asyncio.sleep(2)
            assert _unsynced(w) == 300 and await _in_pg(conn, later) == 0
            assert w.http("/readyz")[0] == 200, "readiness is never tied to PostgreSQL"
            assert b"ecoworker_postgres_up 0.0" in w.http("/metrics")[1]
            proxy.pass_()
            await wait_for(lambda: _unsynced(w) == 0, 30, message=lambda: w.log_text()[-2000:])
            await self._assert_shipped_once(conn, first + later)
            assert "PostgreSQL is back" in w.log_text()

    @pytest.mark.slow
    async def test_blackholed_postgres_results_ship_after_it_passes(self, amqp, queue_name, workers, pg):
        """PostgreSQL blackholed: work goes on; results ship within 60 s of the network passing, once each."""
        dsn, conn = pg
        with TcpProxy(*_target(dsn)) as proxy:
            w = workers(queue_name, POSTGRES_DSN=proxy.url(dsn), ECOWORKER_SYNC_BACKOFF_MAX="2")
            first = await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"n": i} for i in range(200)])
            await wait_for(lambda: _in_pg(conn, first), 30, message=lambda: w.log_text()[-2000:])
            proxy.blackhole()
            later = await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"n": i} for i in range(300)])
            await wait_for(lambda: _done(amqp, queue_name, w, first + later), 30)
            await asyncio.sleep(8)
            assert await _in_pg(conn, later) == 0 and _unsynced(w) == 300
            proxy.pass_()
            passed = time.monotonic()
            await wait_for(lambda: _unsynced(w) == 0, 60, message=lambda: (
                f"results still unshipped 60s after PostgreSQL passed again ({_unsynced(w)} rows): the sink waits "
                "out asyncpg's command_timeout (60 s) on the silent connection, then again on the ROLLBACK; bound "
                "each ship (ecoworker.sink: create_pool(command_timeout=15) or a setting) so a dead connection is "
                "dropped in seconds.\n" + w.log_text()[-1500:]))
            print(f"shipped {time.monotonic() - passed:.1f}s after the network passed again")
            await self._assert_shipped_once(conn, first + later)

    async def _assert_shipped_once(self, conn: asyncpg.Connection, ids: list[str]) -> None:
        rows = await conn.fetch("SELECT task_id, status FROM task_results WHERE task_id = ANY($1::text[])", ids)
        assert sorted(r["task_id"] for r in rows) == sorted(ids)
        assert {r["status"] for r in rows} == {"SUCCESS"}
        assert await conn.fetchval("SELECT count(*) FROM task_results") == len(ids)
