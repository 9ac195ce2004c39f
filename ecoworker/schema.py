"""The journal's SQLite schema: PRAGMAs, versioned forward migrations.

Version 1 is the seed's `task_wal` table exactly as the Celery workers created
it, so a journal they left behind is migrated in place rather than replaced.
Every later version is a forward step inside one transaction.
"""

from __future__ import annotations

TERMINAL = ("SUCCESS", "FAILURE", "DEAD", "EXPIRED")
UNFINISHED = ("PENDING", "RUNNING")
ALL_STATUSES = (*UNFINISHED, *TERMINAL, "HANDED_OFF")
TERMINAL_SQL = "('SUCCESS', 'FAILURE', 'DEAD', 'EXPIRED')"

# dead-letter state of a row: nothing to send / a copy is owed to <queue>.dead / sent
DL_NONE, DL_OWED, DL_SENT = 0, 1, 2
# synced_to_postgres: waiting / shipped / refused by PostgreSQL (kept with sync_error)
SYNC_WAITING, SYNC_DONE, SYNC_REJECTED = 0, 1, -1

# Connection settings. auto_vacuum only takes effect before the first table exists.
PRAGMAS = (
    "PRAGMA auto_vacuum = INCREMENTAL",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA wal_autocheckpoint = 1000",
    "PRAGMA journal_size_limit = 67108864",
    "PRAGMA cache_size = -16000",
    "PRAGMA temp_store = MEMORY",
    "PRAGMA foreign_keys = OFF",
)

SEED_SCHEMA = """
CREATE TABLE IF NOT EXISTS task_wal (
    task_id TEXT PRIMARY KEY,
    task_name TEXT NOT NULL,
    worker_name TEXT NOT NULL,
    args TEXT,
    kwargs TEXT,
    status TEXT NOT NULL,
    result TEXT,
    error TEXT,
    retry_count INTEGER DEFAULT 0,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    started_at TIMESTAMP,
    completed_at TIMESTAMP,
    synced_to_postgres BOOLEAN DEFAULT 0
);
CREATE INDEX IF NOT EXISTS idx_status ON task_wal(status);
CREATE INDEX IF NOT EXISTS idx_synced ON task_wal(synced_to_postgres);
"""

V2 = """
ALTER TABLE task_wal ADD COLUMN queue TEXT;
ALTER TABLE task_wal ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE task_wal ADD COLUMN max_retries INTEGER;
ALTER TABLE task_wal ADD COLUMN not_before REAL;
ALTER TABLE task_wal ADD COLUMN expires_at REAL;
ALTER TABLE task_wal ADD COLUMN timeout REAL;
ALTER TABLE task_wal ADD COLUMN dl_state INTEGER NOT NULL DEFAULT 0;
ALTER TABLE task_wal ADD COLUMN raw_body BLOB;
ALTER TABLE task_wal ADD COLUMN raw_headers TEXT;
ALTER TABLE task_wal ADD COLUMN sync_error TEXT;
ALTER TABLE task_wal ADD COLUMN replays INTEGER NOT NULL DEFAULT 0;
-- the seed stored text timestamps; from now on they are epoch seconds
UPDATE task_wal SET created_at = CAST(strftime('%s', created_at) AS REAL)
    WHERE typeof(created_at) = 'text';
UPDATE task_wal SET started_at = CAST(strftime('%s', started_at) AS REAL)
    WHERE typeof(started_at) = 'text';
UPDATE task_wal SET completed_at = CAST(strftime('%s', completed_at) AS REAL)
    WHERE typeof(completed_at) = 'text';
UPDATE task_wal SET not_before = COALESCE(created_at, 0) WHERE status = 'PENDING';
UPDATE task_wal SET attempts = 1 WHERE status = 'RUNNING';
DROP INDEX IF EXISTS idx_status;
DROP INDEX IF EXISTS idx_synced;
CREATE INDEX idx_wal_pending ON task_wal(not_before) WHERE status = 'PENDING';
CREATE INDEX idx_wal_running ON task_wal(status) WHERE status = 'RUNNING';
CREATE INDEX idx_wal_unsynced ON task_wal(completed_at)
    WHERE synced_to_postgres = 0 AND status IN ('SUCCESS', 'FAILURE', 'DEAD', 'EXPIRED');
CREATE INDEX idx_wal_deadletter ON task_wal(dl_state) WHERE dl_state = 1;
CREATE INDEX idx_wal_retention ON task_wal(completed_at) WHERE synced_to_postgres = 1;
"""

#: version → script that brings the previous version to it
MIGRATIONS: dict[int, str] = {1: SEED_SCHEMA, 2: V2}
LATEST = max(MIGRATIONS)

#: the columns `ingest` writes, in order
INGEST_COLUMNS = (
    "task_id",
    "task_name",
    "worker_name",
    "queue",
    "args",
    "kwargs",
    "status",
    "error",
    "retry_count",
    "attempts",
    "max_retries",
    "created_at",
    "completed_at",
    "not_before",
    "expires_at",
    "timeout",
    "dl_state",
    "raw_body",
    "raw_headers",
    "replays",
    "started_at",
)
