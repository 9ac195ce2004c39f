"""The SQLite journal (ecoworker.journal, ecoworker.schema) against real files under tmp_path."""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import orjson
import pytest

from ecoworker import journal_sql as journal_module
from ecoworker import schema
from ecoworker.errors import JournalError
from ecoworker.journal import ClaimedTask, Journal, NewTask, Outcome, Recovery, WALManager
from ecoworker.journal_sql import PACK_ROWS

LONG_AGO = 1.0  # a `not_before` / timestamp that is always in the past
DAY = 86_400.0


# ------------------------------------------------------------------ helpers

def task(task_id: str, **overrides: Any) -> NewTask:
    """A due PENDING row; keyword arguments override any NewTask field."""
    values: dict[str, Any] = {
        "task_name": "demo.task", "worker_name": "w1", "queue": "storage",
        "args": '["a"]', "kwargs": '{"k": 1}', "created_at": LONG_AGO, "not_before": LONG_AGO,
    }
    values.update(overrides)
    return NewTask(task_id, **values)


def finished(task_id: str, status: str = "SUCCESS", completed_at: float = LONG_AGO, **overrides: Any) -> NewTask:
    """A terminal row as ingest can write it directly (like a dead-lettered delivery)."""
    return task(task_id, status=status, completed_at=completed_at, **overrides)


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a separate plain sqlite3 connection (what another process would see)."""
    con = sqlite3.connect(path)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def open_aiosqlite_connections() -> list[aiosqlite.Connection]:
    """Every aiosqlite connection in this process that is not closed yet."""
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, aiosqlite.Connection) and o._connection is not None]


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def row(journal: Journal, task_id: str) -> dict[str, Any]:
    found = await journal.get_task(task_id)
    assert found is not None, f"{task_id} is not in the journal"
    return found


def ids(rows: Any) -> list[str]:
    return [r["task_id"] for r in rows]


def make_seed_journal(path: Path) -> None:
    """A journal as the seed's Celery workers left it: v1 table, text timestamps, no version table."""
    con = sqlite3.connect(path)
    try:
        con.executescript(schema.SEED_SCHEMA)
        con.executemany(
            "INSERT INTO task_wal (task_id, task_name, worker_name, args, kwargs, status, result, "
            "created_at, started_at, completed_at, synced_to_postgres) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [
                ("p1", "upload_to_s3", "celery@a", "[1]", "{}", "PENDING", None,
                 "2024-01-02 03:04:05", None, None, 0),
                ("r1", "process_image", "celery@a", "[]", '{"x": 2}', "RUNNING", None,
                 "2024-01-02 03:04:05", "2024-01-02 03:05:05", None, 0),
                ("s1", "chat_with_llm", "celery@a", "[]", "{}", "SUCCESS", '"hi"',
                 "2024-01-02 03:04:05", "2024-01-02 03:05:05", "2024-01-02 03:06:05", 1),
            ],
        )
        con.commit()
    finally:
        con.close()


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.fixture(params=[False, True], ids=["in-thread", "writer-process"])
async def journal(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Journal]:
    """A fresh journal file, closed after the test; every test runs twice: hot writes in
    SQLite's thread, and in the writer process (ecoworker.writer) the worker uses."""
    async with Journal.open(tmp_path / "journal.db", writer_process=request.param) as j:
        yield j


# ------------------------------------------------------------------ opening

class TestOpen:
    async def test_creates_missing_parent_directories(self, tmp_path: Path) -> None:
        """Opening a path whose directories do not exist creates them and the file."""
        path = tmp_path / "a" / "b" / "journal.db"
        async with Journal.open(path) as j:
            assert j.path == path
        assert path.is_file()

    async def test_new_file_is_at_the_latest_schema_version(self, tmp_path: Path) -> None:
        """A new file gets the task_wal table and a version table holding schema.LATEST."""
        path = tmp_path / "journal.db"
        async with Journal.open(path):
            pass
        assert query(path, "SELECT version FROM ecoworker_schema") == [(schema.LATEST,)]
        columns = {r[1] for r in query(path, "PRAGMA table_info(task_wal)")}
        assert set(schema.INGEST_COLUMNS) <= columns
        assert {"started_at", "result", "synced_to_postgres", "sync_error"} <= columns

    async def test_pragmas_on_a_new_file(self, journal: Journal) -> None:
        """A new file is in WAL mode with incremental auto-vacuum; the writer commits with synchronous=FULL."""
        assert query(journal.path, "PRAGMA journal_mode") == [("wal",)]
        assert query(journal.path, "PRAGMA auto_vacuum") == [(2,)]
        # synchronous is a per-connection setting: ask the writer connection itself
        assert list(await journal._db.execute_fetchall("PRAGMA synchronous")) == [(2,)]

    async def test_reopen_keeps_rows_and_version(self, tmp_path: Path) -> None:
        """Closing and reopening a journal keeps its rows and does not migrate again."""
        path = tmp_path / "journal.db"
        async with Journal.open(path) as j:
            await j.ingest([task("t1")])
        async with Journal.open(path) as j:
            assert (await row(j, "t1"))["status"] == "PENDING"
        assert query(path, "SELECT version FROM ecoworker_schema") == [(schema.LATEST,)]

    async def test_empty_existing_file_becomes_a_journal(self, tmp_path: Path) -> None:
        """A zero-byte file (e.g. touched by a provisioning script) is taken as a new journal."""
        path = tmp_path / "journal.db"
        path.touch()
        async with Journal.open(path) as j:
            assert await j.ingest([task("t1")]) == {"t1"}

    async def test_wal_manager_is_the_journal(self) -> None:
        """The seed's class name WALManager still works and is Journal."""
        assert WALManager is Journal


class TestOpenErrors:
    @pytest.mark.parametrize("content", [
        os.urandom(8192),
        b"task_id,status\nabc,PENDING\n" * 50,
    ], ids=["random-bytes", "text-file"])
    async def test_not_sqlite_is_refused_untouched(self, tmp_path: Path, content: bytes) -> None:
        """A file that is not SQLite raises JournalError naming it, and its bytes stay as they were."""
        path = tmp_path / "journal.db"
        path.write_bytes(content)
        with pytest.raises(JournalError, match="not an SQLite database") as caught:
            await Journal.connect(path)
        assert str(path) in str(caught.value)
        assert path.read_bytes() == content
        assert files_in(tmp_path) == ["journal.db"]

    async def test_truncated_database_is_refused_untouched(self, tmp_path: Path) -> None:
        """A real journal cut to half its size raises JournalError naming it; no byte changes, no -wal appears."""
        path = tmp_path / "journal.db"
        async with Journal.open(path) as j:
            for b in range(10):
                await j.ingest([task(f"t{b}-{i}", args=orjson.dumps(["x" * 300]).decode()) for i in range(100)])
        assert not j.wal_file.exists()  # the last close checkpointed and removed it
        full = path.read_bytes()
        path.write_bytes(full[: len(full) // 2])
        before = path.read_bytes()
        with pytest.raises(JournalError) as caught:
            await Journal.connect(path)
        assert str(path) in str(caught.value)
        assert path.read_bytes() == before
        assert files_in(tmp_path) == ["journal.db"]

    async def test_path_under_a_regular_file_is_refused(self, tmp_path: Path) -> None:
        """A journal path whose parent is a regular file raises JournalError naming the path."""
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("x")
        for path in (blocker / "journal.db", blocker / "sub" / "journal.db"):
            with pytest.raises(JournalError, match="cannot create its directory") as caught:
                await Journal.connect(path)
            assert str(path) in str(caught.value)
        assert blocker.read_text() == "x"

    async def test_directory_as_path_is_refused(self, tmp_path: Path) -> None:
        """A journal path that is a directory raises JournalError naming it."""
        path = tmp_path / "journal.db"
        path.mkdir()
        with pytest.raises(JournalError) as caught:
            await Journal.connect(path)
        assert str(path) in str(caught.value)

    async def test_newer_schema_version_is_refused(self, tmp_path: Path) -> None:
        """A file written by a newer ecoworker (version > LATEST) raises JournalError and keeps its version."""
        path = tmp_path / "journal.db"
        async with Journal.open(path) as j:
            await j.ingest([task("t1")])
        con = sqlite3.connect(path)
        try:
            con.execute("UPDATE ecoworker_schema SET version = ?", (schema.LATEST + 1,))
            con.commit()
        finally:
            con.close()
        with pytest.raises(JournalError, match=f"version {schema.LATEST + 1} is newer"):
            await Journal.connect(path)
        assert query(path, "SELECT version FROM ecoworker_schema") == [(schema.LATEST + 1,)]
        assert query(path, "SELECT task_id FROM task_wal") == [("t1",)]


class TestMigration:
    async def test_seed_journal_is_migrated_in_place(self, tmp_path: Path) -> None:
        """A seed v1 file reaches LATEST with its rows kept and text timestamps turned into epoch seconds."""
        path = tmp_path / "seed.db"
        make_seed_journal(path)
        async with Journal.open(path) as j:
            p1, r1, s1 = [await row(j, i) for i in ("p1", "r1", "s1")]
        assert query(path, "SELECT version FROM ecoworker_schema") == [(schema.LATEST,)]
        assert query(path, "SELECT count(*) FROM task_wal") == [(3,)]
        assert query(path, "PRAGMA journal_mode") == [("wal",)]
        created = epoch("2024-01-02 03:04:05")
        for r in (p1, r1, s1):
            assert isinstance(r["created_at"], int | float) and r["created_at"] == created
        assert r1["started_at"] == epoch("2024-01-02 03:05:05")
        assert s1["completed_at"] == epoch("2024-01-02 03:06:05")
        assert query(path, "SELECT count(*) FROM task_wal WHERE typeof(created_at) = 'text' "
                           "OR typeof(started_at) = 'text' OR typeof(completed_at) = 'text'") == [(0,)]
        assert p1["not_before"] == created and p1["attempts"] == 0
        assert r1["attempts"] == 1 and r1["status"] == "RUNNING"
        assert (s1["status"], s1["result"], s1["synced_to_postgres"]) == ("SUCCESS", '"hi"', 1)
        assert (p1["args"], r1["kwargs"], p1["worker_name"]) == ("[1]", '{"x": 2}', "celery@a")

    async def test_migrated_rows_run_again(self, tmp_path: Path) -> None:
        """After migration the seed's PENDING row is claimable and its RUNNING row is recovered."""
        path = tmp_path / "seed.db"
        make_seed_journal(path)
        async with Journal.open(path) as j:
            recovery = await j.recover(now=time.time(), default_max_retries=3)
            assert recovery == Recovery(requeued=1, dead=0, pending=2)
            claimed = await j.claim(now=time.time(), limit=10)
        assert sorted(c.task_id for c in claimed) == ["p1", "r1"]


# ------------------------------------------------------------------ ingest

class TestIngest:
    async def test_commits_at_full_even_after_normal_writes(self, tmp_path: Path) -> None:
        """Ingest (what every ack waits on) runs at synchronous=FULL; later state changes at NORMAL.
        (In SQLite's thread; test_writer.py checks the same in the writer process.)"""
        async with Journal.open(tmp_path / "journal.db") as journal:
            await self._check_full_after_normal(journal)

    async def _check_full_after_normal(self, journal: Journal) -> None:
        traced: list[str] = []
        await journal._db.set_trace_callback(traced.append)
        await journal.ingest([task("a")])
        await journal.claim(now=9e9, limit=1)
        await journal.ingest([task("b")])
        await journal._db.set_trace_callback(None)
        pragmas = [t for t in traced if "synchronous" in t or t.startswith("INSERT") or t.startswith("UPDATE")]
        kinds = ["FULL" if "FULL" in t else "NORMAL" if "NORMAL" in t else t.split()[0] for t in pragmas]
        # the claim switched to NORMAL, so the second ingest must switch back to FULL first
        assert kinds[-2:] == ["FULL", "INSERT"] and "NORMAL" in kinds
        assert list(await journal._db.execute_fetchall("PRAGMA synchronous"))[0][0] == 2

    async def test_returns_the_new_ids(self, journal: Journal) -> None:
        """Ingest stores every row and returns exactly the ids it inserted."""
        assert await journal.ingest([task("a"), task("b"), task("c")]) == {"a", "b", "c"}
        assert (await journal.counts())["pending"] == 3

    async def test_empty_batch(self, journal: Journal) -> None:
        """An empty batch is a no-op returning no ids."""
        assert await journal.ingest([]) == set()

    async def test_known_id_is_not_new_and_not_overwritten(self, journal: Journal) -> None:
        """A redelivered id is not new, and its different args, name or status change nothing."""
        await journal.ingest([task("a")])
        again = task("a", task_name="other", args='["changed"]', status="DEAD", not_before=5.0)
        assert await journal.ingest([again, task("b")]) == {"b"}
        a = await row(journal, "a")
        assert (a["task_name"], a["args"], a["status"], a["not_before"]) == ("demo.task", '["a"]', "PENDING", LONG_AGO)

    async def test_duplicate_within_one_batch(self, journal: Journal) -> None:
        """The same id twice in one batch is inserted once; the first copy wins."""
        new = await journal.ingest([task("a", args='["first"]'), task("a", args='["second"]'), task("b")])
        assert new == {"a", "b"}
        assert (await row(journal, "a"))["args"] == '["first"]'
        assert query(journal.path, "SELECT count(*) FROM task_wal") == [(2,)]

    async def test_every_column_is_stored(self, journal: Journal) -> None:
        """Each NewTask field lands in its column, bytes included."""
        full = NewTask("x", "ocr", "w9", "ai", "[1, 2]", '{"a": null}', status="DEAD", error="bad",
                       retry_count=2, attempts=1, max_retries=7, created_at=11.5, completed_at=12.5,
                       not_before=13.5, expires_at=14.5, timeout=15.5, dl_state=schema.DL_OWED,
                       raw_body=b"\x80\x04pickle", raw_headers='{"h": 1}', replays=3)
        await journal.ingest([full])
        stored = await row(journal, "x")
        for name in schema.INGEST_COLUMNS:
            assert stored[name] == getattr(full, name), name

    async def test_a_lean_row_gets_the_defaults_it_left_out(self, journal: Journal) -> None:
        """A row leaving error, expiry, raw body … at their defaults is inserted naming only the
        other columns; what SQLite fills in equals NewTask's defaults, column by column."""
        lean = task("x", status="RUNNING", attempts=1, started_at=20.0)
        assert journal_module.is_lean(lean)
        await journal.ingest([lean])
        stored = await row(journal, "x")
        for name in schema.INGEST_COLUMNS:
            assert stored[name] == getattr(lean, name), name

    async def test_a_batch_of_lean_and_full_rows(self, journal: Journal) -> None:
        """Lean and full rows in one batch are each stored whole, one commit for both shapes;
        known ids of either shape are not reported new, and of an id given twice the first copy
        wins whatever its shape."""
        await journal.ingest([task("old-lean"), task("old-full", timeout=3.0)])
        full = {"error": "bad", "expires_at": 99.0, "timeout": 5.0, "dl_state": schema.DL_OWED,
                "raw_body": b"\x00raw", "raw_headers": '{"h": 1}', "retry_count": 2, "replays": 0}
        batch = [task("l1"), task("f1", **full), task("old-lean", timeout=1.0), task("l2", args='["x"]'),
                 task("old-full"), task("twice", args='["first"]'), task("twice", args='["second"]', timeout=9.0),
                 task("f2", status="EXPIRED", completed_at=50.0, error="expired")]
        assert not all(journal_module.is_lean(r) for r in batch) and any(map(journal_module.is_lean, batch))
        assert await journal.ingest(batch) == {"l1", "f1", "l2", "twice", "f2"}
        for expected in (batch[0], batch[1], batch[3], batch[5], batch[7]):
            stored = await row(journal, expected.task_id)
            for name in schema.INGEST_COLUMNS:
                assert stored[name] == getattr(expected, name), (expected.task_id, name)
        assert (await row(journal, "old-lean"))["timeout"] is None  # a duplicate changes nothing
        assert query(journal.path, "SELECT count(*) FROM task_wal") == [(7,)]

    def test_batches_are_cut_into_few_statement_sizes(self) -> None:
        """Every batch size from 1 to 1000 is cut into power-of-two pieces that cover it exactly,
        so only 11 statement texts per shape are ever compiled (one per size was up to 1000)."""
        sizes_seen: set[int] = set()
        for n in range(1, 1001):
            statements = journal_module.ingest_statements([task(f"t{i}") for i in range(n)])
            sizes = [len(params) // len(journal_module.LEAN_COLUMNS) for _, params, _ in statements]
            assert sizes == [count for _, _, count in statements]
            assert sum(sizes) == n and sizes == sorted(sizes, reverse=True), n
            assert all(size & (size - 1) == 0 for size in sizes), sizes
            sizes_seen.update(sizes)
        assert sizes_seen == {2 ** k for k in range(10)}

    async def test_every_batch_size_lands_whole(self, journal: Journal) -> None:
        """Batches of many sizes, cut into several statements, insert every row once and report
        exactly the new ones, a known id in a later piece included."""
        total = 0
        for n in (1, 3, 7, 100, 255, 257, 500, 999):
            batch = [task(f"n{n}-{i}") for i in range(n)] + [task("n1-0")]  # last: known (or a repeat)
            new = await journal.ingest(batch)
            assert new == {f"n{n}-{i}" for i in range(n)}
            total += n
        assert query(journal.path, "SELECT count(*) FROM task_wal") == [(total,)]

    async def test_ingest_is_committed_on_return(self, journal: Journal) -> None:
        """Once ingest returns, another connection sees the rows (the batch is committed)."""
        await journal.ingest([task(f"t{i}") for i in range(50)])
        assert query(journal.path, "SELECT count(*) FROM task_wal") == [(50,)]

    async def test_large_batch(self, journal: Journal) -> None:
        """A batch of ingest_batch_max's cap (1000 rows) fits in one statement."""
        assert len(await journal.ingest([task(f"t{i}") for i in range(1000)])) == 1000


class TestReplay:
    @pytest.mark.parametrize("status", schema.TERMINAL)
    async def test_higher_replays_revives_a_terminal_row(self, journal: Journal, status: str) -> None:
        """A finished row re-ingested with a higher `replays` starts over as the new delivery."""
        await journal.ingest([finished("a", status, error="boom", attempts=3, dl_state=schema.DL_SENT)])
        await journal.finish([Outcome("a", status, result='"old"', error="boom", completed_at=50.0)])
        await journal.mark_sync_rejected("a", "constraint")
        revived = await journal.ingest([task("a", args='["new"]', replays=1, not_before=77.0)])
        assert revived == {"a"}
        a = await row(journal, "a")
        assert (a["status"], a["args"], a["replays"], a["not_before"]) == ("PENDING", '["new"]', 1, 77.0)
        assert (a["attempts"], a["error"], a["result"]) == (0, None, None)
        assert (a["completed_at"], a["started_at"]) == (None, None)
        assert (a["synced_to_postgres"], a["sync_error"], a["dl_state"]) == (0, None, 0)
        assert [c.task_id for c in await journal.claim(now=100.0, limit=5)] == ["a"]

    @pytest.mark.parametrize("status", ["PENDING", "RUNNING"])
    async def test_higher_replays_leaves_an_unfinished_row(self, journal: Journal, status: str) -> None:
        """A replay of a row that is still PENDING or RUNNING is a duplicate and changes nothing."""
        await journal.ingest([task("a", status=status, attempts=1)])
        assert await journal.ingest([task("a", args='["new"]', replays=1)]) == set()
        a = await row(journal, "a")
        assert (a["status"], a["args"], a["replays"], a["attempts"]) == (status, '["a"]', 0, 1)

    @pytest.mark.parametrize("replays", [2, 1])
    async def test_equal_or_lower_replays_changes_nothing(self, journal: Journal, replays: int) -> None:
        """A finished row redelivered with the same (or an older) replay count stays finished."""
        await journal.ingest([finished("a", "FAILURE", error="boom", replays=2)])
        assert await journal.ingest([task("a", args='["new"]', replays=replays)]) == set()
        a = await row(journal, "a")
        assert (a["status"], a["error"], a["args"], a["replays"]) == ("FAILURE", "boom", '["a"]', 2)


# ------------------------------------------------------------------ claim / finish / recover

class TestClaim:
    async def test_claims_only_due_rows(self, journal: Journal) -> None:
        """Rows whose not_before is still in the future are not claimed."""
        await journal.ingest([task("due", not_before=100.0), task("later", not_before=200.0)])
        assert [c.task_id for c in await journal.claim(now=150.0, limit=10)] == ["due"]
        assert (await row(journal, "later"))["status"] == "PENDING"

    async def test_moves_to_running_with_attempts_incremented(self, journal: Journal) -> None:
        """A claimed row is RUNNING, attempts+1 and started_at=now, committed before claim returns."""
        await journal.ingest([task("a", attempts=2, max_retries=5, timeout=9.0, expires_at=999.0, retry_count=1)])
        claimed = await journal.claim(now=150.0, limit=1)
        assert claimed == [ClaimedTask("a", "demo.task", "storage", '["a"]', '{"k": 1}', 3, 5, 9.0, 999.0, 1)]
        assert query(journal.path, "SELECT status, attempts, started_at FROM task_wal") == [("RUNNING", 3, 150.0)]

    async def test_claimed_values_come_back_exactly(self, journal: Journal) -> None:
        """What a claim hands the scheduler is bit-for-bit what was ingested: times and limits with
        17 significant digits (SQLite 3.40's JSON keeps 15), NULLs, and args text with quotes,
        backslashes, control characters and non-ASCII, for 300 rows in 3 claims."""
        import random

        rnd = random.Random(7)
        expected = {}
        rows = []
        for i in range(300):
            timeout = None if i % 5 == 0 else rnd.choice([rnd.uniform(0.001, 1e9), 0.1 + 0.2, 1e-3 / 3])
            expires = None if i % 7 == 0 else time.time() + rnd.uniform(-1e8, 1e8)
            args = orjson.dumps([f'q"\\{i}\n\u00e9\u2603\x01', i]).decode()
            max_retries = None if i % 3 == 0 else i
            rows.append(task(f"x{i}", args=args, timeout=timeout, expires_at=expires, max_retries=max_retries,
                             retry_count=i % 4, attempts=i % 2, not_before=100.0 + i / 1000))
            expected[f"x{i}"] = ClaimedTask(f"x{i}", "demo.task", "storage", args, '{"k": 1}', i % 2 + 1,
                                            max_retries, timeout, expires, i % 4)
        await journal.ingest(rows)
        claimed = [c for _ in range(3) for c in await journal.claim(now=150.0, limit=100)]
        assert [c.task_id for c in claimed] == [f"x{i}" for i in range(300)]  # oldest due first
        assert {c.task_id: c for c in claimed} == expected
        assert await journal.claim(now=150.0, limit=100) == []

    async def test_claims_a_row_once(self, journal: Journal) -> None:
        """A RUNNING row is not claimed again."""
        await journal.ingest([task("a")])
        assert len(await journal.claim(now=150.0, limit=5)) == 1
        assert await journal.claim(now=160.0, limit=5) == []

    async def test_skips_excluded_task_names(self, journal: Journal) -> None:
        """Rows whose task name is in `exclude` (saturated tasks) stay PENDING."""
        await journal.ingest([task("a", task_name="ocr"), task("b", task_name="chat"), task("c", task_name="s3")])
        claimed = await journal.claim(now=150.0, limit=10, exclude=["ocr", "s3"])
        assert [c.task_id for c in claimed] == ["b"]
        assert (await journal.counts())["pending"] == 2

    async def test_respects_limit_in_not_before_order(self, journal: Journal) -> None:
        """At most `limit` rows are claimed, the earliest not_before first."""
        await journal.ingest([task(f"t{n}", not_before=float(n)) for n in (50, 10, 40, 20, 30)])
        assert [c.task_id for c in await journal.claim(now=100.0, limit=2)] in (["t10", "t20"], ["t20", "t10"])
        assert sorted(c.task_id for c in await journal.claim(now=100.0, limit=2)) == ["t30", "t40"]

    async def test_zero_limit_claims_nothing(self, journal: Journal) -> None:
        """A limit of 0 claims nothing."""
        await journal.ingest([task("a")])
        assert await journal.claim(now=150.0, limit=0) == []
        assert (await row(journal, "a"))["status"] == "PENDING"


class TestFinish:
    async def test_success(self, journal: Journal) -> None:
        """A SUCCESS outcome stores the result and completion time, and the row awaits shipping."""
        await journal.ingest([task("a")])
        await journal.claim(now=150.0, limit=1)
        await journal.finish([Outcome("a", "SUCCESS", result='{"ok": true}', completed_at=160.0)])
        a = await row(journal, "a")
        assert (a["status"], a["result"], a["completed_at"], a["attempts"]) == ("SUCCESS", '{"ok": true}', 160.0, 1)
        assert ids(await journal.unsynced(10)) == ["a"]

    async def test_failure_owes_a_dead_letter(self, journal: Journal) -> None:
        """A FAILURE outcome with dl_state=1 stores the error and lists the row as an owed dead letter."""
        await journal.ingest([task("a")])
        await journal.claim(now=150.0, limit=1)
        await journal.finish([Outcome("a", "FAILURE", error="400 bad request", completed_at=160.0,
                                      dl_state=schema.DL_OWED)])
        a = await row(journal, "a")
        assert (a["status"], a["error"], a["dl_state"]) == ("FAILURE", "400 bad request", schema.DL_OWED)
        assert ids(await journal.owed_dead_letters()) == ["a"]

    async def test_retry_later(self, journal: Journal) -> None:
        """A retry puts the row back to PENDING with a later not_before and retry_count+1."""
        await journal.ingest([task("a")])
        await journal.claim(now=150.0, limit=1)
        await journal.finish([Outcome("a", "PENDING", error="timeout", not_before=500.0, retry_inc=1)])
        a = await row(journal, "a")
        assert (a["status"], a["not_before"], a["retry_count"], a["attempts"], a["error"]) == (
            "PENDING", 500.0, 1, 1, "timeout")
        assert await journal.claim(now=499.0, limit=1) == []
        assert [c.attempts for c in await journal.claim(now=500.0, limit=1)] == [2]

    async def test_success_after_a_retry_clears_its_error(self, journal: Journal) -> None:
        """The error a failed attempt left on the row is gone once a later attempt succeeds."""
        await journal.ingest([task("a")])
        await journal.claim(now=150.0, limit=1)
        await journal.finish([Outcome("a", "PENDING", error="timeout", not_before=151.0, retry_inc=1)])
        await journal.claim(now=151.0, limit=1)
        await journal.finish([Outcome("a", "SUCCESS", result="1", completed_at=160.0)])
        a = await row(journal, "a")
        assert (a["status"], a["error"], a["retry_count"], a["attempts"]) == ("SUCCESS", None, 1, 2)

    async def test_release_gives_the_attempt_back(self, journal: Journal) -> None:
        """A release (shutdown, per-task limit) returns the row to PENDING with attempts-1."""
        await journal.ingest([task("a", attempts=1)])
        await journal.claim(now=150.0, limit=1)
        await journal.finish([Outcome("a", "PENDING", not_before=151.0, attempts_inc=-1)])
        a = await row(journal, "a")
        assert (a["status"], a["attempts"], a["not_before"], a["retry_count"]) == ("PENDING", 1, 151.0, 0)

    async def test_many_outcomes_in_one_call(self, journal: Journal) -> None:
        """One call applies a batch of different outcomes."""
        await journal.ingest([task("a"), task("b"), task("c")])
        await journal.claim(now=150.0, limit=3)
        await journal.finish([
            Outcome("a", "SUCCESS", result="1", completed_at=160.0),
            Outcome("b", "EXPIRED", error="expired", completed_at=161.0),
            Outcome("c", "PENDING", not_before=170.0, retry_inc=1),
        ])
        statuses = {r["task_id"]: r["status"] for r in await journal.list_tasks()}
        assert statuses == {"a": "SUCCESS", "b": "EXPIRED", "c": "PENDING"}

    async def test_a_batch_larger_than_a_chunk_of_every_shape(self, journal: Journal) -> None:
        """More outcomes than one statement takes (FINISH_CHUNK), plain successes mixed with
        retries, releases, failures and expiries: every row ends exactly as its own outcome says,
        the padding rows change nothing, and of two outcomes for one row the first applies."""
        n = journal_module.FINISH_CHUNK + 45
        await journal.ingest([task(f"t{i:04d}") for i in range(n)] + [task("bystander")])
        assert len(await journal.claim(now=150.0, limit=n)) == n  # "bystander" stays PENDING
        outcomes, expected = [], {}
        for i in range(n):
            tid = f"t{i:04d}"
            kind = i % 5
            if kind < 2:
                outcomes.append(Outcome(tid, "SUCCESS", result=f'{{"i": {i}}}', completed_at=200.0 + i))
                expected[tid] = ("SUCCESS", f'{{"i": {i}}}', None, 200.0 + i, LONG_AGO, 0, 1, 0)
            elif kind == 2:
                outcomes.append(Outcome(tid, "PENDING", error="later", not_before=900.0 + i, retry_inc=1))
                expected[tid] = ("PENDING", None, "later", None, 900.0 + i, 1, 1, 0)
            elif kind == 3:
                outcomes.append(Outcome(tid, "PENDING", not_before=150.0, attempts_inc=-1))
                expected[tid] = ("PENDING", None, None, None, 150.0, 0, 0, 0)
            else:
                outcomes.append(Outcome(tid, "FAILURE", error=f"bad {i}", completed_at=300.0 + i,
                                        dl_state=schema.DL_OWED))
                expected[tid] = ("FAILURE", None, f"bad {i}", 300.0 + i, LONG_AGO, 0, 1, schema.DL_OWED)
        outcomes.append(Outcome("t0000", "FAILURE", error="second outcome", completed_at=1.0))
        await journal.finish(outcomes)
        got = {r[0]: r[1:] for r in query(journal.path, "SELECT task_id, status, result, error, completed_at, "
                                          "not_before, retry_count, attempts, dl_state FROM task_wal")}
        assert got.pop("bystander") == ("PENDING", None, None, None, LONG_AGO, 0, 0, 0)
        assert got == expected

    async def test_leaves_a_row_that_is_no_longer_running(self, journal: Journal) -> None:
        """An outcome arriving after `wal drain` handed the row off does not overwrite the hand-off."""
        await journal.ingest([task("a")])
        await journal.claim(now=150.0, limit=1)
        await journal.hand_off(["a"])  # `wal drain` beside the running worker republished it
        await journal.finish([Outcome("a", "SUCCESS", result="1", completed_at=160.0)])
        a = await row(journal, "a")
        assert (a["status"], a["synced_to_postgres"]) == ("HANDED_OFF", 1), (
            "BUG journal.finish: it updates rows by task_id only, so a late outcome overwrote a row that had "
            f"left RUNNING (now {a['status']!r} with synced_to_postgres={a['synced_to_postgres']}, a result "
            "that is never shipped); finish must add `AND status = 'RUNNING'` to its WHERE clause")


class TestRecover:
    async def test_running_rows_under_the_limit_run_again(self, journal: Journal) -> None:
        """RUNNING rows with attempts < max_retries+1 go back to PENDING, due now."""
        await journal.ingest([task("a", status="RUNNING", attempts=2, max_retries=2)])
        recovery = await journal.recover(now=500.0, default_max_retries=0)
        assert recovery == Recovery(requeued=1, dead=0, pending=1)
        a = await row(journal, "a")
        assert (a["status"], a["not_before"], a["attempts"], a["dl_state"]) == ("PENDING", 500.0, 2, 0)

    async def test_crash_looping_rows_are_dead(self, journal: Journal) -> None:
        """RUNNING rows at attempts = max_retries+1 become DEAD, owe a dead letter and say why."""
        await journal.ingest([task("a", status="RUNNING", attempts=3, max_retries=2)])
        recovery = await journal.recover(now=500.0, default_max_retries=10)
        assert recovery == Recovery(requeued=0, dead=1, pending=0)
        a = await row(journal, "a")
        assert (a["status"], a["completed_at"], a["dl_state"]) == ("DEAD", 500.0, schema.DL_OWED)
        assert "3 attempts" in a["error"]
        assert ids(await journal.owed_dead_letters()) == ["a"]
        assert ids(await journal.unsynced(10)) == ["a"]

    async def test_default_max_retries_when_the_row_has_none(self, journal: Journal) -> None:
        """A row without max_retries is judged by default_max_retries."""
        await journal.ingest([task("low", status="RUNNING", attempts=2), task("high", status="RUNNING", attempts=3)])
        assert await journal.recover(now=500.0, default_max_retries=2) == Recovery(requeued=1, dead=1, pending=1)
        assert (await row(journal, "low"))["status"] == "PENDING"
        assert (await row(journal, "high"))["status"] == "DEAD"

    async def test_other_rows_are_untouched(self, journal: Journal) -> None:
        """Recovery changes only RUNNING rows."""
        await journal.ingest([task("p", not_before=42.0), finished("s", "SUCCESS")])
        assert await journal.recover(now=500.0, default_max_retries=0) == Recovery(requeued=0, dead=0, pending=1)
        assert (await row(journal, "p"))["not_before"] == 42.0
        assert (await row(journal, "s"))["status"] == "SUCCESS"


# ------------------------------------------------------------------ sync, dead letters, gauges

class TestSync:
    async def test_unsynced_lists_terminal_rows_oldest_first(self, journal: Journal) -> None:
        """unsynced returns only terminal rows, ordered by completed_at, up to `limit`."""
        await journal.ingest([
            finished("s", "SUCCESS", completed_at=30.0), finished("f", "FAILURE", completed_at=10.0),
            finished("d", "DEAD", completed_at=20.0), finished("e", "EXPIRED", completed_at=40.0),
            task("p"), task("r", status="RUNNING"), task("h", status="HANDED_OFF", completed_at=5.0),
        ])
        assert ids(await journal.unsynced(10)) == ["f", "d", "s", "e"]
        assert ids(await journal.unsynced(2)) == ["f", "d"]

    async def test_pages_longer_than_a_pack_come_whole_and_in_order(self, journal: Journal) -> None:
        """Pages of more than PACK_ROWS rows (the writer process sends them in packs) hold every
        row once, in completed_at order, and each page's cursor starts the next one."""
        n = 2 * PACK_ROWS + 234
        await journal.ingest([finished(f"t{i:05d}", completed_at=1000.0 + i) for i in range(n)])
        seen: list[str] = []
        after = None
        for size in (PACK_ROWS + 1, 2 * PACK_ROWS, n):
            rows, after = await journal.unsynced_page(size, after)
            seen += [r[0] for r in rows]
            if after is None:
                break
        assert after is None
        assert seen == [f"t{i:05d}" for i in range(n)]

    async def test_mark_synced(self, journal: Journal) -> None:
        """Synced rows leave the unsynced list and the unsynced gauge."""
        await journal.ingest([finished("a", completed_at=1.0), finished("b", completed_at=2.0)])
        await journal.mark_synced(["a"])
        assert ids(await journal.unsynced(10)) == ["b"]
        assert (await journal.counts())["unsynced"] == 1
        assert (await row(journal, "a"))["synced_to_postgres"] == schema.SYNC_DONE

    async def test_mark_sync_rejected(self, journal: Journal) -> None:
        """A row PostgreSQL refused is kept with -1 and its error, and is not shipped again."""
        await journal.ingest([finished("a", completed_at=1.0), finished("b", completed_at=2.0)])
        await journal.mark_sync_rejected("a", "value too long")
        a = await row(journal, "a")
        assert (a["synced_to_postgres"], a["sync_error"]) == (schema.SYNC_REJECTED, "value too long")
        assert ids(await journal.unsynced(10)) == ["b"]
        assert (await journal.counts())["unsynced"] == 1


class TestDeadLetters:
    async def test_owed_then_marked_sent(self, journal: Journal) -> None:
        """Rows owing a dead letter are listed with their raw delivery until marked sent."""
        await journal.ingest([
            finished("bad", "DEAD", dl_state=schema.DL_OWED, raw_body=b"\x80\x04", raw_headers='{"h": 1}',
                     error="pickle"),
            finished("ok", "DEAD", dl_state=schema.DL_SENT), task("p"),
        ])
        owed = await journal.owed_dead_letters()
        assert [(r["task_id"], r["raw_body"], r["raw_headers"], r["error"]) for r in owed] == [
            ("bad", b"\x80\x04", '{"h": 1}', "pickle")]
        assert (await journal.counts())["dead_letters_owed"] == 1
        await journal.mark_dead_lettered("bad")
        assert await journal.owed_dead_letters() == []
        assert (await row(journal, "bad"))["dl_state"] == schema.DL_SENT

    async def test_limit(self, journal: Journal) -> None:
        """owed_dead_letters returns at most `limit` rows."""
        await journal.ingest([finished(f"d{i}", "DEAD", dl_state=schema.DL_OWED) for i in range(5)])
        assert len(await journal.owed_dead_letters(limit=3)) == 3


class TestCounts:
    async def test_counts(self, journal: Journal) -> None:
        """counts reports pending, running, unsynced, owed dead letters and the oldest unsynced completion."""
        await journal.ingest([
            task("p1"), task("p2"), task("r", status="RUNNING"),
            finished("s", "SUCCESS", completed_at=30.0), finished("f", "FAILURE", completed_at=20.0),
            finished("d", "DEAD", completed_at=25.0, dl_state=schema.DL_OWED),
            finished("old", "SUCCESS", completed_at=1.0),
        ])
        await journal.mark_synced(["old"])
        assert await journal.counts() == {
            "pending": 2, "running": 1, "unsynced": 3, "dead_letters_owed": 1, "oldest_unsynced": 20.0,
        }

    async def test_counts_of_an_empty_journal(self, journal: Journal) -> None:
        """An empty journal counts zeros and has no oldest unsynced row."""
        assert await journal.counts() == {
            "pending": 0, "running": 0, "unsynced": 0, "dead_letters_owed": 0, "oldest_unsynced": None,
        }

    async def test_next_due(self, journal: Journal) -> None:
        """next_due is the earliest not_before among PENDING rows, or None when none is pending."""
        assert await journal.next_due() is None
        await journal.ingest([task("a", not_before=300.0), task("b", not_before=200.0),
                              finished("c", not_before=100.0)])
        assert await journal.next_due() == 200.0
        await journal.claim(now=250.0, limit=5)
        assert await journal.next_due() == 300.0


# ------------------------------------------------------------------ operator commands

class TestRequeue:
    async def test_failed_rows_start_over(self, journal: Journal) -> None:
        """retry-failed puts FAILURE rows back to PENDING, due now, with fresh counters."""
        await journal.ingest([
            finished("f", "FAILURE", attempts=4, retry_count=3, dl_state=schema.DL_SENT),
            finished("s", "SUCCESS"), finished("d", "DEAD"),
        ])
        await journal.mark_synced(["f", "s"])
        before = time.time()
        assert await journal.requeue(["FAILURE"]) == 1
        f = await row(journal, "f")
        assert (f["status"], f["attempts"], f["retry_count"], f["completed_at"]) == ("PENDING", 0, 0, None)
        assert (f["synced_to_postgres"], f["dl_state"]) == (0, 0)
        assert before <= f["not_before"] <= time.time()
        assert (await row(journal, "s"))["status"] == "SUCCESS"
        assert (await row(journal, "d"))["status"] == "DEAD"
        assert [c.task_id for c in await journal.claim(now=time.time() + 1, limit=5)] == ["f"]

    async def test_several_statuses(self, journal: Journal) -> None:
        """Every listed status is requeued (retry-failed --include-dead)."""
        await journal.ingest([finished("f", "FAILURE"), finished("d", "DEAD"), finished("e", "EXPIRED")])
        assert await journal.requeue(["FAILURE", "DEAD"]) == 2
        assert (await row(journal, "e"))["status"] == "EXPIRED"

    async def test_task_filter(self, journal: Journal) -> None:
        """With a task name only that task's rows are requeued."""
        await journal.ingest([finished("a", "FAILURE", task_name="ocr"), finished("b", "FAILURE", task_name="chat")])
        assert await journal.requeue(["FAILURE"], task_name="ocr") == 1
        assert (await row(journal, "a"))["status"] == "PENDING"
        assert (await row(journal, "b"))["status"] == "FAILURE"

    async def test_since_filter(self, journal: Journal) -> None:
        """With `since` only rows completed at or after it are requeued."""
        await journal.ingest([finished("old", "FAILURE", completed_at=100.0),
                              finished("new", "FAILURE", completed_at=200.0)])
        assert await journal.requeue(["FAILURE"], since=200.0) == 1
        assert (await row(journal, "new"))["status"] == "PENDING"
        assert (await row(journal, "old"))["status"] == "FAILURE"


class TestHandOff:
    async def test_unfinished_rows_are_handed_off(self, journal: Journal) -> None:
        """Handed-off rows are never run here, never shipped, and finished rows are left alone."""
        await journal.ingest([task("p"), task("r"), finished("s", "SUCCESS", completed_at=7.0)])
        await journal.claim(now=150.0, limit=1, exclude=[])
        before = time.time()
        await journal.hand_off(["p", "r", "s"])
        for task_id in ("p", "r"):
            r = await row(journal, task_id)
            assert (r["status"], r["synced_to_postgres"]) == ("HANDED_OFF", 1)
            assert before <= r["completed_at"] <= time.time()
        assert (await row(journal, "s"))["completed_at"] == 7.0
        assert await journal.claim(now=time.time(), limit=5) == []
        assert ids(await journal.unsynced(10)) == ["s"]
        assert await journal.counts() == {
            "pending": 0, "running": 0, "unsynced": 1, "dead_letters_owed": 0, "oldest_unsynced": 7.0,
        }

    async def test_a_handed_off_task_that_comes_back_runs_again(self, journal: Journal) -> None:
        """A drained task redelivered to the same journal is new again (PENDING), not a lost duplicate."""
        await journal.ingest([task("d")])
        await journal.hand_off(["d"])
        assert await journal.ingest([task("d")]) == {"d"}
        r = await row(journal, "d")
        assert (r["status"], r["synced_to_postgres"]) == ("PENDING", 0)


class TestFailStaleRunning:
    async def test_stale_running_rows_fail(self, journal: Journal) -> None:
        """RUNNING rows started before the cutoff become FAILURE owing a dead letter; newer ones keep running."""
        await journal.ingest([task("stale", not_before=10.0), task("fresh", not_before=90.0),
                              task("p", not_before=9e9)])
        await journal.claim(now=50.0, limit=1)
        await journal.claim(now=100.0, limit=1)
        assert await journal.fail_stale_running(started_before=60.0) == 1
        stale = await row(journal, "stale")
        assert (stale["status"], stale["dl_state"]) == ("FAILURE", schema.DL_OWED)
        assert "RUNNING since 50" in stale["error"]
        assert (await row(journal, "fresh"))["status"] == "RUNNING"
        assert (await row(journal, "p"))["status"] == "PENDING"


# ------------------------------------------------------------------ the seed's API

class TestSeedApi:
    async def test_write_task(self, journal: Journal) -> None:
        """write_task returns True for a new id and False for a known one, and the row is due now."""
        before = time.time()
        assert await journal.write_task("t1", "upload_to_s3", "w1", ["f.png"], {"k": "v"}, queue="storage") is True
        assert await journal.write_task("t1", "other", "w2", [], {}) is False
        t1 = await row(journal, "t1")
        assert (t1["task_name"], t1["worker_name"], t1["queue"], t1["status"]) == (
            "upload_to_s3", "w1", "storage", "PENDING")
        assert (orjson.loads(t1["args"]), orjson.loads(t1["kwargs"])) == (["f.png"], {"k": "v"})
        assert before <= t1["created_at"] == t1["not_before"] <= time.time()

    async def test_start_complete_lifecycle(self, journal: Journal) -> None:
        """start_task marks RUNNING with attempts+1; complete_task marks SUCCESS with the JSON result."""
        await journal.write_task("t1", "chat", "w1")
        await journal.start_task("t1")
        t1 = await row(journal, "t1")
        assert (t1["status"], t1["attempts"]) == ("RUNNING", 1) and t1["started_at"] is not None
        await journal.complete_task("t1", {"text": "hi"})
        t1 = await row(journal, "t1")
        assert (t1["status"], orjson.loads(t1["result"])) == ("SUCCESS", {"text": "hi"})
        assert t1["completed_at"] >= t1["started_at"]

    async def test_fail_task(self, journal: Journal) -> None:
        """fail_task(task_id, error, retry_count) marks FAILURE with the error and the retry count."""
        await journal.write_task("t1", "chat", "w1")
        await journal.start_task("t1")
        await journal.fail_task("t1", "upstream 500", 3)
        t1 = await row(journal, "t1")
        assert (t1["status"], t1["error"], t1["retry_count"]) == ("FAILURE", "upstream 500", 3)
        assert t1["completed_at"] is not None

    async def test_get_unsynced_tasks_and_mark_synced(self, journal: Journal) -> None:
        """get_unsynced_tasks(limit) returns dicts of finished rows until mark_synced ships them."""
        for i in range(3):
            await journal.write_task(f"t{i}", "chat", "w1")
            await journal.start_task(f"t{i}")
            await journal.complete_task(f"t{i}", i)
        await journal.write_task("pending", "chat", "w1")
        unsynced = await journal.get_unsynced_tasks(limit=2)
        assert [type(r) for r in unsynced] == [dict, dict]
        assert [r["task_id"] for r in unsynced] == ["t0", "t1"]
        assert unsynced[0]["result"] == "0" and unsynced[0]["status"] == "SUCCESS"
        await journal.mark_synced(["t0", "t1"])
        assert [r["task_id"] for r in await journal.get_unsynced_tasks()] == ["t2"]

    async def test_get_stats(self, journal: Journal) -> None:
        """get_stats has exactly the seed's shape: by_status, sync totals and wal_size_mb."""
        await journal.ingest([task("p1"), task("p2"), finished("s"), finished("f", "FAILURE"), finished("s2")])
        await journal.mark_synced(["s", "s2"])
        stats = await journal.get_stats()
        assert set(stats) == {"by_status", "sync", "wal_size_mb"}
        assert stats["by_status"] == {"PENDING": 2, "SUCCESS": 2, "FAILURE": 1}
        assert stats["sync"] == {"total": 3, "synced": 2, "unsynced": 1}
        assert isinstance(stats["wal_size_mb"], float)
        assert stats["wal_size_mb"] == round(journal.size_bytes() / 2**20, 3) > 0

    async def test_get_stats_of_an_empty_journal(self, journal: Journal) -> None:
        """An empty journal's stats are empty counts, not errors."""
        stats = await journal.get_stats()
        assert (stats["by_status"], stats["sync"]) == ({}, {"total": 0, "synced": 0, "unsynced": 0})

    async def test_recover_pending_tasks(self, journal: Journal) -> None:
        """recover_pending_tasks lists PENDING and RUNNING rows as dicts, oldest first."""
        await journal.ingest([task("b", created_at=20.0), task("a", created_at=10.0, status="RUNNING"),
                              finished("s", created_at=5.0)])
        unfinished = await journal.recover_pending_tasks()
        assert [(r["task_id"], r["status"]) for r in unfinished] == [("a", "RUNNING"), ("b", "PENDING")]


class TestCheckpoint:
    @pytest.mark.parametrize("mode", ["PASSIVE", "FULL", "RESTART", "TRUNCATE", "passive"])
    async def test_modes(self, journal: Journal, mode: str) -> None:
        """Each checkpoint mode copies every WAL page back when no reader is in the way."""
        await journal.ingest([task(f"t{i}") for i in range(200)])
        busy, log, done = await journal.checkpoint(mode)
        assert busy == 0 and log == done
        if mode != "TRUNCATE":
            assert log > 0

    async def test_truncate_empties_the_wal_file(self, journal: Journal) -> None:
        """TRUNCATE leaves the -wal file at 0 bytes, also with the reader connection open."""
        await journal.ingest([task(f"t{i}", args=orjson.dumps(["x" * 500]).decode()) for i in range(500)])
        assert (await journal.counts())["pending"] == 500  # opens the reader
        assert journal.wal_file.stat().st_size > 0
        assert await journal.checkpoint("TRUNCATE") == (0, 0, 0)
        assert journal.wal_file.stat().st_size == 0
        assert query(journal.path, "SELECT count(*) FROM task_wal") == [(500,)]

    @pytest.mark.parametrize("mode", ["NOPE", "", "PASSIVE); DROP TABLE task_wal; --"])
    async def test_bad_mode(self, journal: Journal, mode: str) -> None:
        """An unknown mode raises ValueError and runs nothing."""
        with pytest.raises(ValueError, match="checkpoint mode"):
            await journal.checkpoint(mode)


class TestCleanup:
    async def test_deletes_only_old_synced_terminal_rows(self, journal: Journal) -> None:
        """Only synced terminal (or handed-off) rows completed before the cutoff are deleted."""
        old, recent = time.time() - 10 * DAY, time.time() - 3600
        await journal.ingest([
            finished("old-success", "SUCCESS", completed_at=old), finished("old-failure", "FAILURE", completed_at=old),
            task("old-handed", status="HANDED_OFF", completed_at=old),
            finished("old-unsynced", "SUCCESS", completed_at=old),
            finished("old-rejected", "SUCCESS", completed_at=old),
            finished("recent-synced", "SUCCESS", completed_at=recent),
            task("old-pending", completed_at=old), task("old-running", status="RUNNING", completed_at=old),
        ])
        await journal.mark_synced(["old-success", "old-failure", "old-handed", "recent-synced",
                                   "old-pending", "old-running"])
        await journal.mark_sync_rejected("old-rejected", "refused")
        assert await journal.cleanup_old_tasks(days=7) == 3
        left = {r["task_id"] for r in await journal.list_tasks(limit=100)}
        assert left == {"old-unsynced", "old-rejected", "recent-synced", "old-pending", "old-running"}

    async def test_works_in_chunks(self, journal: Journal) -> None:
        """With chunk=10, 35 old rows are all deleted across several transactions."""
        old = time.time() - 30 * DAY
        await journal.ingest([finished(f"t{i}", completed_at=old) for i in range(35)] + [task("keep")])
        await journal.mark_synced([f"t{i}" for i in range(35)])
        assert await journal.cleanup_old_tasks(days=7, chunk=10) == 35
        assert query(journal.path, "SELECT task_id FROM task_wal") == [("keep",)]

    async def test_rows_older_than_days_set_in_sqlite(self, journal: Journal) -> None:
        """Rows finished normally and aged by a direct update are cleaned up; young ones stay."""
        for i in range(3):
            await journal.write_task(f"t{i}", "chat", "w1")
            await journal.start_task(f"t{i}")
            await journal.complete_task(f"t{i}", None)
        await journal.mark_synced(["t0", "t1", "t2"])
        con = sqlite3.connect(journal.path)
        try:
            con.execute("UPDATE task_wal SET completed_at = completed_at - 8 * 86400 WHERE task_id != 't2'")
            con.commit()
        finally:
            con.close()
        assert await journal.cleanup_old_tasks(days=7) == 2
        assert [r["task_id"] for r in await journal.list_tasks()] == ["t2"]

    async def test_nothing_to_delete(self, journal: Journal) -> None:
        """A journal without old rows deletes nothing."""
        await journal.ingest([finished("s", completed_at=time.time())])
        await journal.mark_synced(["s"])
        assert await journal.cleanup_old_tasks(days=7, chunk=1) == 0


# ------------------------------------------------------------------ connections

class TestReader:
    async def test_reads_do_not_wait_for_the_writer(self, journal: Journal) -> None:
        """While the writer holds an open transaction, reads answer at once with the committed state."""
        await journal.ingest([task("committed")])
        inside, release = threading.Event(), threading.Event()

        def hold(db: sqlite3.Connection) -> None:  # in the writer's thread, inside BEGIN IMMEDIATE
            db.execute("INSERT INTO task_wal (task_id, task_name, worker_name, status, not_before) "
                       "VALUES ('uncommitted', 'demo.task', 'w1', 'PENDING', 1)")
            inside.set()
            release.wait(10)

        writer = asyncio.create_task(journal._transaction(hold))
        assert await asyncio.to_thread(inside.wait, 5)
        try:
            assert (await asyncio.wait_for(journal.counts(), 2))["pending"] == 1
            assert (await asyncio.wait_for(journal.get_stats(), 2))["by_status"] == {"PENDING": 1}
            assert await asyncio.wait_for(journal.get_task("uncommitted"), 2) is None
            assert not writer.done()
        finally:
            release.set()
            await writer
        assert (await journal.counts())["pending"] == 2

    async def test_concurrent_first_reads_share_one_connection(self, tmp_path: Path) -> None:
        """Reads that start together on a fresh journal open one reader connection, none leaked."""
        before = {id(c) for c in open_aiosqlite_connections()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            async with Journal.open(tmp_path / "journal.db") as j:
                await asyncio.gather(j.counts(), j.get_stats(), j.next_due(), j.list_tasks())
            still_open = [c for c in open_aiosqlite_connections() if id(c) not in before]
            for conn in still_open:  # a leaked connection's non-daemon thread would hang this process at exit
                await conn.close()
        dropped = [w for w in caught if issubclass(w.category, ResourceWarning) and "aiosqlite" in str(w.message)]
        assert (len(dropped), len(still_open)) == (0, 0), (
            f"BUG journal.Journal.reader: concurrent first reads each opened a reader connection; "
            f"{len(dropped)} were dropped unclosed and {len(still_open)} stayed open after Journal.close() "
            "(its worker thread keeps it alive and blocks interpreter exit); reader() must open the "
            "connection under an asyncio.Lock and re-check self._reader inside it")
