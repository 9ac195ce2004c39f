"""The PostgreSQL schema (ecoworker.pgschema, `ecoworker db migrate`) against the real server.

Every test gets its own freshly created database on the shared server, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest

from ecoworker import pgschema
from ecoworker.errors import ConfigError
from tests.workers import REPO, env_for_worker, fresh_database, journal_rows, statuses, wait_for

SEED_V1 = "CREATE TABLE task_results (task_id text primary key, result jsonb, completed_at timestamptz)"

# column → (data type, nullable) as the issue specifies them
EXPECTED_COLUMNS = {
    "task_id": ("text", "NO"),
    "task_name": ("text", "NO"),
    "queue": ("text", "YES"),
    "worker_name": ("text", "NO"),
    "status": ("text", "NO"),
    "args": ("jsonb", "YES"),
    "kwargs": ("jsonb", "YES"),
    "result": ("jsonb", "YES"),
    "error": ("text", "YES"),
    "attempts": ("integer", "NO"),
    "created_at": ("timestamp with time zone", "YES"),
    "started_at": ("timestamp with time zone", "YES"),
    "completed_at": ("timestamp with time zone", "YES"),
    "synced_at": ("timestamp with time zone", "YES"),
}


# ------------------------------------------------------------------ helpers

@pytest.fixture
async def fresh_dsn(stack_env: dict[str, str]) -> AsyncIterator[str]:
    """The DSN of a new, empty database on the shared PostgreSQL."""
    async with fresh_database(stack_env["POSTGRES_DSN"], migrated=False) as dsn:
        yield dsn


@pytest.fixture
async def conn(fresh_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the fresh database."""
    c = await asyncpg.connect(fresh_dsn)
    yield c
    await c.close()


async def columns(conn: asyncpg.Connection) -> dict[str, tuple[str, str]]:
    rows = await conn.fetch(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_name = 'task_results'"
    )
    return {r["column_name"]: (r["data_type"], r["is_nullable"]) for r in rows}


async def versions(conn: asyncpg.Connection) -> list[int]:
    return [r[0] for r in await conn.fetch("SELECT version FROM ecoworker_schema_migrations ORDER BY version")]


def db_migrate(dsn: str) -> subprocess.Popen[str]:
    """Start `ecoworker db migrate` with POSTGRES_DSN=dsn (not waited for)."""
    env = env_for_worker({}, POSTGRES_DSN=dsn)
    return subprocess.Popen([sys.executable, "-m", "ecoworker.cli", "db", "migrate"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# ------------------------------------------------------------------ migrate

class TestMigrateEmpty:
    async def test_creates_task_results_as_specified(self, conn: asyncpg.Connection) -> None:
        """On an empty database migrate creates task_results with the issue's columns, types and nullability."""
        assert await pgschema.migrate(conn) == (0, pgschema.LATEST)
        assert await columns(conn) == EXPECTED_COLUMNS

    async def test_primary_key_and_indexes(self, conn: asyncpg.Connection) -> None:
        """task_id is the primary key; (task_name, completed_at) and status are indexed."""
        await pgschema.migrate(conn)
        pk = await conn.fetch(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'task_results'::regclass AND i.indisprimary"
        )
        assert [r[0] for r in pk] == ["task_id"]
        indexes = {r["indexname"]: r["indexdef"] for r in await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'task_results'")}
        assert "(task_name, completed_at)" in indexes["task_results_name_completed"]
        assert "(status)" in indexes["task_results_status"]

    async def test_synced_at_defaults_to_now(self, conn: asyncpg.Connection) -> None:
        """A row inserted without synced_at gets the insertion time."""
        await pgschema.migrate(conn)
        await conn.execute("INSERT INTO task_results (task_id, task_name, worker_name, status, attempts) "
                           "VALUES ('a', 'n', 'w', 'SUCCESS', 1)")
        assert await conn.fetchval("SELECT now() - synced_at < interval '1 minute' FROM task_results")

    async def test_version_table_is_at_latest(self, conn: asyncpg.Connection) -> None:
        """The version table holds one row per applied version, up to pgschema.LATEST."""
        await pgschema.migrate(conn)
        assert await versions(conn) == list(range(1, pgschema.LATEST + 1))
        assert await pgschema.current_version(conn) == pgschema.LATEST

    async def test_second_run_changes_nothing(self, conn: asyncpg.Connection) -> None:
        """A second migrate is a no-op: same version, same version rows, same columns, rows kept."""
        await pgschema.migrate(conn)
        await conn.execute("INSERT INTO task_results (task_id, task_name, worker_name, status, attempts) "
                           "VALUES ('a', 'n', 'w', 'SUCCESS', 1)")
        applied = await conn.fetch("SELECT version, applied_at FROM ecoworker_schema_migrations ORDER BY 1")
        assert await pgschema.migrate(conn) == (pgschema.LATEST, pgschema.LATEST)
        assert await conn.fetch("SELECT version, applied_at FROM ecoworker_schema_migrations ORDER BY 1") == applied
        assert await columns(conn) == EXPECTED_COLUMNS
        assert await conn.fetchval("SELECT count(*) FROM task_results") == 1


class TestMigrateSeed:
    async def test_seed_v1_table_is_upgraded_with_rows_kept(self, conn: asyncpg.Connection) -> None:
        """The seed's v1 task_results with rows is upgraded in place: rows kept, new columns filled with defaults."""
        await conn.execute(SEED_V1)
        await conn.executemany(
            "INSERT INTO task_results VALUES ($1, $2::jsonb, $3)",
            [("s1", '{"ok": true}', ts("2024-01-02T03:04:05")), ("s2", '"text"', None), ("s3", None, None)],
        )
        assert await pgschema.current_version(conn) == 1
        assert await pgschema.migrate(conn) == (1, pgschema.LATEST)
        assert await columns(conn) == EXPECTED_COLUMNS
        assert await versions(conn) == list(range(1, pgschema.LATEST + 1))
        rows = {r["task_id"]: dict(r) for r in await conn.fetch("SELECT * FROM task_results")}
        assert set(rows) == {"s1", "s2", "s3"}
        s1 = rows["s1"]
        assert orjson.loads(s1["result"]) == {"ok": True}
        assert s1["completed_at"] == ts("2024-01-02T03:04:05")
        assert (s1["task_name"], s1["worker_name"], s1["status"], s1["attempts"]) == ("(unknown)", "(seed)",
                                                                                     "SUCCESS", 1)
        assert s1["synced_at"] is not None
        assert all(s1[c] is None for c in ("queue", "args", "kwargs", "error", "created_at", "started_at"))
        assert orjson.loads(rows["s2"]["result"]) == "text"

    async def test_defaults_are_dropped_after_the_backfill(self, conn: asyncpg.Connection) -> None:
        """After the upgrade, a new row must name its task, worker, status and attempts (no silent defaults)."""
        await conn.execute(SEED_V1)
        await pgschema.migrate(conn)
        with pytest.raises(asyncpg.NotNullViolationError):
            await conn.execute("INSERT INTO task_results (task_id) VALUES ('x')")


class TestConcurrentMigrate:
    async def test_two_connections_at_once(self, fresh_dsn: str) -> None:
        """Concurrent migrate calls on separate connections all succeed and apply each version once."""
        conns = [await asyncpg.connect(fresh_dsn) for _ in range(4)]
        try:
            results = await asyncio.gather(*(pgschema.migrate(c) for c in conns))
            assert sorted(results) == [(0, pgschema.LATEST)] + [(pgschema.LATEST, pgschema.LATEST)] * 3
            assert await versions(conns[0]) == list(range(1, pgschema.LATEST + 1))
            assert await columns(conns[0]) == EXPECTED_COLUMNS
        finally:
            for c in conns:
                await c.close()

    async def test_two_cli_runs_at_once(self, fresh_dsn: str, conn: asyncpg.Connection) -> None:
        """Two `ecoworker db migrate` processes started together both exit 0; each version row exists once."""
        procs = [db_migrate(fresh_dsn) for _ in range(2)]
        outputs = [await asyncio.to_thread(p.communicate, timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        lines = sorted(out.strip() for out, _ in outputs)
        assert lines == sorted([f"schema at version {pgschema.LATEST} (was 0)",
                                f"schema at version {pgschema.LATEST} (up to date)"]), outputs
        assert await versions(conn) == list(range(1, pgschema.LATEST + 1))

    async def test_cli_on_a_migrated_database_is_up_to_date(self, fresh_dsn: str, conn: asyncpg.Connection) -> None:
        """`ecoworker db migrate` on a database already at LATEST says so and exits 0."""
        await pgschema.migrate(conn)
        out, err = await asyncio.to_thread(db_migrate(fresh_dsn).communicate, timeout=60)
        assert out.strip() == f"schema at version {pgschema.LATEST} (up to date)", err

    async def test_cli_unreachable_server_is_one_clear_line(self, stack_env: dict[str, str]) -> None:
        """`ecoworker db migrate` against a closed port exits 2 with one line naming the server, no password."""
        from tests.workers import free_port

        proc = db_migrate(f"postgresql://u:s3cr3t@127.0.0.1:{free_port()}/db")
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 2
        assert "cannot connect to PostgreSQL" in err and "Traceback" not in err
        assert "s3cr3t" not in out + err


class TestCheck:
    async def test_empty_database_is_behind(self, conn: asyncpg.Connection) -> None:
        """check() on an empty database raises ConfigError naming `ecoworker db migrate`."""
        with pytest.raises(ConfigError, match=r"version 0.*run `ecoworker db migrate`"):
            await pgschema.check(conn)

    async def test_seed_database_is_behind(self, conn: asyncpg.Connection) -> None:
        """check() on the seed's v1 table raises ConfigError naming `ecoworker db migrate`."""
        await conn.execute(SEED_V1)
        with pytest.raises(ConfigError, match=r"version 1.*run `ecoworker db migrate`"):
            await pgschema.check(conn)

    async def test_migrated_database_passes(self, conn: asyncpg.Connection) -> None:
        """check() after migrate returns quietly."""
        await pgschema.migrate(conn)
        await pgschema.check(conn)

    async def test_newer_schema_asks_for_an_upgrade(self, conn: asyncpg.Connection) -> None:
        """check() on a schema newer than this ecoworker raises ConfigError asking to upgrade ecoworker."""
        await pgschema.migrate(conn)
        await conn.execute("INSERT INTO ecoworker_schema_migrations (version) VALUES ($1)", pgschema.LATEST + 1)
        with pytest.raises(ConfigError, match="upgrade ecoworker"):
            await pgschema.check(conn)


# ------------------------------------------------------------------ the worker

async def pg_count(dsn: str) -> int:
    c = await asyncpg.connect(dsn)
    try:
        if not await c.fetchval("SELECT to_regclass('task_results') IS NOT NULL"):
            return -1
        return int(await c.fetchval("SELECT count(*) FROM task_results"))
    finally:
        await c.close()


class TestWorker:
    async def test_unmigrated_database_is_named_and_work_goes_on(self, amqp: Any, queue_name: str, workers: Any,
                                                                fresh_dsn: str) -> None:
        """Un-migrated: the worker says "run `ecoworker db migrate`" and keeps working; --migrate migrates and ships."""
        ids = await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"n": i} for i in range(50)])
        w = workers(queue_name, name="w", POSTGRES_DSN=fresh_dsn, ECOWORKER_SYNC_MAX_DELAY="0.2")
        await wait_for(lambda: all(statuses(w.wal).get(i) == "SUCCESS" for i in ids), 30)
        await wait_for(lambda: "run `ecoworker db migrate`" in w.log_text(), 15, message=w.log_text)
        # still consuming and running after the schema complaint
        later = await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"late": True}])
        await wait_for(lambda: statuses(w.wal).get(later[0]) == "SUCCESS", 15)
        assert w.alive and w.http("/readyz")[0] == 200
        assert w.log_text().count("run `ecoworker db migrate`") == 1
        unsynced = journal_rows(w.wal, "SELECT count(*) FROM task_wal WHERE synced_to_postgres = 0")[0][0]
        assert unsynced == len(ids) + 1
        assert await pg_count(fresh_dsn) == -1  # the worker did not create the table by itself
        assert await asyncio.to_thread(w.terminate, 30) == 0

        w2 = workers(queue_name, name="w", args=("--migrate",), POSTGRES_DSN=fresh_dsn)
        await wait_for(lambda: _count_is(fresh_dsn, len(ids) + 1), 30, message=w2.log_text)
        c = await asyncpg.connect(fresh_dsn)
        try:
            assert await versions(c) == list(range(1, pgschema.LATEST + 1))
            result = await c.fetchval("SELECT result FROM task_results WHERE task_id = $1", ids[3])
            assert orjson.loads(result) == {"n": 3}
        finally:
            await c.close()
        await wait_for(lambda: journal_rows(w2.wal, "SELECT count(*) FROM task_wal WHERE synced_to_postgres = 0")
                       [0][0] == 0, 10)


async def _count_is(dsn: str, n: int) -> bool:
    return await pg_count(dsn) == n
