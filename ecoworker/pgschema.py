"""PostgreSQL schema for task results: versioned, idempotent, safe from several pods at once.

Version 1 is the seed's `task_results (task_id, result, completed_at)`; later
versions add the columns ecoworker ships. `migrate()` takes an advisory lock so
concurrent `ecoworker db migrate` runs apply each step exactly once.
"""

from __future__ import annotations

import asyncpg

from ecoworker.errors import ConfigError

ADVISORY_KEY = 0x6563_6F77  # "ecow"

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE IF NOT EXISTS task_results (
        task_id TEXT PRIMARY KEY,
        result JSONB,
        completed_at TIMESTAMPTZ
    );
    """,
    2: """
    ALTER TABLE task_results
        ADD COLUMN IF NOT EXISTS task_name TEXT NOT NULL DEFAULT '(unknown)',
        ADD COLUMN IF NOT EXISTS queue TEXT,
        ADD COLUMN IF NOT EXISTS worker_name TEXT NOT NULL DEFAULT '(seed)',
        ADD COLUMN IF NOT EXISTS status TEXT NOT NULL DEFAULT 'SUCCESS',
        ADD COLUMN IF NOT EXISTS args JSONB,
        ADD COLUMN IF NOT EXISTS kwargs JSONB,
        ADD COLUMN IF NOT EXISTS error TEXT,
        ADD COLUMN IF NOT EXISTS attempts INTEGER NOT NULL DEFAULT 1,
        ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ,
        ADD COLUMN IF NOT EXISTS started_at TIMESTAMPTZ,
        ADD COLUMN IF NOT EXISTS synced_at TIMESTAMPTZ DEFAULT now();
    ALTER TABLE task_results
        ALTER COLUMN task_name DROP DEFAULT,
        ALTER COLUMN worker_name DROP DEFAULT,
        ALTER COLUMN status DROP DEFAULT,
        ALTER COLUMN attempts DROP DEFAULT;
    CREATE INDEX IF NOT EXISTS task_results_name_completed ON task_results (task_name, completed_at);
    CREATE INDEX IF NOT EXISTS task_results_status ON task_results (status);
    """,
}
LATEST = max(MIGRATIONS)

VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS ecoworker_schema_migrations (
    version INTEGER PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


async def current_version(conn: asyncpg.Connection) -> int:
    """The applied schema version; 1 for a seed database that has only `task_results`."""
    has_table = await conn.fetchval("SELECT to_regclass('ecoworker_schema_migrations') IS NOT NULL")
    if has_table:
        return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM ecoworker_schema_migrations"))
    seed = await conn.fetchval("SELECT to_regclass('task_results') IS NOT NULL")
    return 1 if seed else 0


async def migrate(conn: asyncpg.Connection) -> tuple[int, int]:
    """Bring the schema to LATEST. Returns (version before, version after)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_KEY)
        before = await current_version(conn)
        await conn.execute(VERSION_TABLE)
        if before == 1:
            await conn.execute("INSERT INTO ecoworker_schema_migrations (version) VALUES (1) "
                               "ON CONFLICT DO NOTHING")
        for version in range(before + 1, LATEST + 1):
            await conn.execute(MIGRATIONS[version])
            await conn.execute("INSERT INTO ecoworker_schema_migrations (version) VALUES ($1)", version)
    return before, LATEST


async def check(conn: asyncpg.Connection) -> None:
    """Raise ConfigError saying what to run when the schema is behind this ecoworker."""
    version = await current_version(conn)
    if version < LATEST:
        raise ConfigError(
            f"PostgreSQL schema is at version {version}, this ecoworker needs {LATEST}: "
            "run `ecoworker db migrate` (or start the worker with --migrate)"
        )
    if version > LATEST:
        raise ConfigError(f"PostgreSQL schema version {version} is newer than this ecoworker "
                          f"({LATEST}): upgrade ecoworker")
