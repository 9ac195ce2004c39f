"""The PostgreSQL sink (ecoworker.sink): in-process against a real server, and end to end with workers.

In-process tests pair a journal under tmp_path with a Sink on a freshly created
and migrated database. End-to-end tests run real `ecoworker` processes; the
outage test stops and starts the *private* stack's PostgreSQL, never the shared one.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY

from ecoworker.errors import ConfigError
from ecoworker.journal import Journal, NewTask, Outcome
from ecoworker.schema import SYNC_DONE, SYNC_REJECTED, SYNC_WAITING
from ecoworker.settings import SinkSettings
from ecoworker.sink import UNAVAILABLE, Sink
from tests.conftest import run_services
from tests.workers import REPO, env_for_worker, free_port, fresh_database, journal_rows, statuses, wait_for

T0 = 1_700_000_000.0  # a fixed epoch second for created/started/completed timestamps
Record = tuple[Any, ...]  # a row as Journal.unsynced_page returns it
Cursor = tuple[float | None, int]  # (completed_at, rowid) of the last row of a page


# ------------------------------------------------------------------ PostgreSQL helpers

@pytest.fixture
async def dsn(stack_env: dict[str, str]) -> AsyncIterator[str]:
    """A new database on the shared PostgreSQL, migrated to pgschema.LATEST."""
    async with fresh_database(stack_env["POSTGRES_DSN"]) as url:
        yield url


@pytest.fixture
async def pg(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's database, for reading what the sink wrote."""
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()


async def pg_rows(conn: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    return {r["task_id"]: dict(r) for r in await conn.fetch("SELECT * FROM task_results")}


async def pg_count(dsn: str) -> int:
    """Rows in task_results (-1 while PostgreSQL does not answer)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return -1
    try:
        return int(await conn.fetchval("SELECT count(*) FROM task_results"))
    finally:
        await conn.close()


async def pg_count_at_least(dsn: str, n: int) -> bool:
    return await pg_count(dsn) >= n


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def db_migrate(env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "ecoworker.cli", "db", "migrate"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ journal helpers

@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    """A fresh journal file, closed after the test."""
    async with Journal.open(tmp_path / "journal.db") as j:
        yield j


@pytest.fixture
async def sink(journal: Journal, dsn: str) -> AsyncIterator[Sink]:
    """A Sink from the test's journal to the test's database."""
    s = Sink(SinkSettings(dsn=dsn), journal)
    yield s
    await s.close()


def new_task(task_id: str, **overrides: Any) -> NewTask:
    """A due PENDING row, as the consumer ingests a delivery."""
    values: dict[str, Any] = {
        "task_name": "demo.task", "worker_name": "pod-a", "queue": "storage",
        "args": '["a", 1]', "kwargs": '{"k": "v"}', "created_at": T0, "not_before": 1.0,
    }
    values.update(overrides)
    return NewTask(task_id, **values)


def done_task(task_id: str, completed_at: float = T0 + 2, **overrides: Any) -> NewTask:
    """A terminal SUCCESS row written by ingest directly (fast; what the bench does too)."""
    values: dict[str, Any] = {"status": "SUCCESS", "completed_at": completed_at, "attempts": 1}
    values.update(overrides)
    return new_task(task_id, **values)


async def run_tasks(journal: Journal, outcomes: Sequence[Outcome]) -> None:
    """Claim every due row (RUNNING, attempts+1) and apply `outcomes`, as the scheduler does."""
    await journal.claim(T0 + 1, len(outcomes) + 10)
    await journal.finish(outcomes)


async def ingest_and_run(journal: Journal, outcomes: Sequence[Outcome]) -> None:
    """Ingest a due row for each outcome (500 per commit), then run them all to those outcomes."""
    for i in range(0, len(outcomes), 500):
        await journal.ingest([new_task(o.task_id) for o in outcomes[i:i + 500]])
    await run_tasks(journal, outcomes)


def set_rows(path: Path, sql: str, params: Sequence[Any] = ()) -> None:
    """Change journal rows from a separate plain sqlite3 connection (another process's view)."""
    con = sqlite3.connect(path, timeout=10)
    try:
        con.execute(sql, params)
        con.commit()
    finally:
        con.close()


def sync_states(path: Path) -> dict[str, tuple[int, str | None]]:
    return {r["task_id"]: (r["synced_to_postgres"], r["sync_error"])
            for r in journal_rows(path, "SELECT task_id, synced_to_postgres, sync_error FROM task_wal")}


# ================================================================== in-process

class TestShip:
    async def test_finished_rows_ship_with_every_field(self, journal: Journal, sink: Sink,
                                                       pg: asyncpg.Connection) -> None:
        """SUCCESS and FAILURE rows ship with status, args, kwargs, result, error, attempts and timestamps."""
        await journal.ingest([new_task("ok"), new_task("bad", task_name="other.task", queue=None),
                              new_task("waiting", not_before=T0 * 2)])
        await run_tasks(journal, [Outcome("ok", "SUCCESS", result='{"n": 1, "s": "é"}', completed_at=T0 + 2.5),
                                  Outcome("bad", "FAILURE", error="ValueError: nope", completed_at=T0 + 3.25)])
        assert await sink.sync_all() == 2
        rows = await pg_rows(pg)
        assert set(rows) == {"ok", "bad"}  # a PENDING row is not shipped
        ok, bad = rows["ok"], rows["bad"]
        assert (ok["task_name"], ok["queue"], ok["worker_name"], ok["status"], ok["attempts"]) == (
            "demo.task", "storage", "pod-a", "SUCCESS", 1)
        assert orjson.loads(ok["args"]) == ["a", 1] and orjson.loads(ok["kwargs"]) == {"k": "v"}
        assert orjson.loads(ok["result"]) == {"n": 1, "s": "é"} and ok["error"] is None
        assert (ok["created_at"], ok["started_at"], ok["completed_at"]) == (at(T0), at(T0 + 1), at(T0 + 2.5))
        assert abs((ok["synced_at"] - datetime.now(UTC)).total_seconds()) < 60
        assert (bad["task_name"], bad["queue"], bad["status"], bad["result"], bad["error"]) == (
            "other.task", None, "FAILURE", None, "ValueError: nope")
        assert bad["completed_at"] == at(T0 + 3.25)
        states = sync_states(journal.path)
        assert states["ok"] == states["bad"] == (SYNC_DONE, None) and states["waiting"][0] == SYNC_WAITING

    async def test_dead_and_expired_rows_ship(self, journal: Journal, sink: Sink, pg: asyncpg.Connection) -> None:
        """DEAD and EXPIRED rows are terminal too: they ship with their error and no result."""
        await journal.ingest([done_task("d", status="DEAD", error="unknown task 'x'", attempts=0),
                              done_task("e", status="EXPIRED", error="expired before it could run")])
        assert await sink.sync_all() == 2
        rows = await pg_rows(pg)
        assert (rows["d"]["status"], rows["d"]["error"], rows["d"]["attempts"]) == ("DEAD", "unknown task 'x'", 0)
        assert rows["e"]["status"] == "EXPIRED" and rows["e"]["result"] is None

    async def test_seed_api_rows_ship(self, journal: Journal, sink: Sink, pg: asyncpg.Connection) -> None:
        """Rows written through the seed's API (write/start/complete/fail_task) ship like any other."""
        await journal.write_task("s1", "chat_with_llm", "celery@a", args=[1], kwargs={"p": "hi"})
        await journal.write_task("s2", "chat_with_llm", "celery@a")
        await journal.start_task("s1")
        await journal.complete_task("s1", {"text": "hello"})
        await journal.fail_task("s2", "boom", retry_count=2)
        assert await sink.sync_all() == 2
        rows = await pg_rows(pg)
        assert orjson.loads(rows["s1"]["result"]) == {"text": "hello"} and rows["s1"]["attempts"] == 1
        assert orjson.loads(rows["s1"]["args"]) == [1] and orjson.loads(rows["s1"]["kwargs"]) == {"p": "hi"}
        assert rows["s1"]["started_at"] <= rows["s1"]["completed_at"]
        assert (rows["s2"]["status"], rows["s2"]["error"], rows["s2"]["started_at"]) == ("FAILURE", "boom", None)

    async def test_sync_all_ships_every_batch_and_returns_the_count(self, journal: Journal, dsn: str,
                                                                   pg: asyncpg.Connection) -> None:
        """sync_all drains more than one batch and returns how many rows it shipped; then there is nothing left."""
        await journal.ingest([done_task(f"t{i}", completed_at=T0 + i) for i in range(250)])
        sink = Sink(SinkSettings(dsn=dsn, batch_size=100), journal)
        try:
            rows_before = counter("ecoworker_sync_rows_total")
            assert await sink.sync_once() == 100
            assert await sink.sync_all() == 150
            assert await sink.sync_all() == 0
        finally:
            await sink.close()
        assert counter("ecoworker_sync_rows_total") - rows_before == 250
        assert await pg.fetchval("SELECT count(*) FROM task_results") == 250
        assert (await journal.counts())["unsynced"] == 0

    async def test_empty_journal_does_not_contact_postgresql(self, journal: Journal) -> None:
        """With nothing to ship, sync_once returns 0 without connecting (even to a closed port)."""
        sink = Sink(SinkSettings(dsn=f"postgresql://u@127.0.0.1:{free_port()}/db"), journal)
        assert await sink.sync_once() == 0
        await sink.close()


class TestExactlyOnce:
    async def test_shipping_twice_leaves_one_row(self, journal: Journal, sink: Sink, pg: asyncpg.Connection) -> None:
        """Rows shipped again (marked unsynced after PostgreSQL committed) are upserted: one row per id."""
        await journal.ingest([done_task(f"t{i}", completed_at=T0 + i) for i in range(300)])
        assert await sink.sync_all() == 300
        first = await pg.fetchval("SELECT max(synced_at) FROM task_results")
        set_rows(journal.path, "UPDATE task_wal SET synced_to_postgres = 0")
        assert await sink.sync_all() == 300
        assert tuple(await pg.fetchrow("SELECT count(*), count(DISTINCT task_id) FROM task_results")) == (300, 300)
        assert await pg.fetchval("SELECT min(synced_at) FROM task_results") > first  # really shipped again

    async def test_newer_completion_wins(self, journal: Journal, sink: Sink, pg: asyncpg.Connection) -> None:
        """A task retried after it was shipped (retry-failed) replaces its row with the newer outcome."""
        await journal.ingest([new_task("t")])
        await run_tasks(journal, [Outcome("t", "FAILURE", error="ConnectionError: down", completed_at=T0 + 2)])
        await sink.sync_all()
        assert await journal.requeue(["FAILURE"]) == 1
        await journal.claim(time.time() + 1, 10)
        await journal.finish([Outcome("t", "SUCCESS", result='"second"', completed_at=T0 + 100)])
        assert await sink.sync_all() == 1
        row = (await pg_rows(pg))["t"]
        assert (row["status"], orjson.loads(row["result"]), row["error"]) == ("SUCCESS", "second", None)
        assert (row["completed_at"], row["attempts"]) == (at(T0 + 100), 1)

    async def test_older_completion_never_overwrites(self, tmp_path: Path, dsn: str, pg: asyncpg.Connection) -> None:
        """Two pods ran the same task (a redelivery); whichever ships last, the later completion is kept."""
        async with Journal.open(tmp_path / "a.db") as a, Journal.open(tmp_path / "b.db") as b:
            await a.ingest([done_task("x", completed_at=T0 + 50, worker_name="pod-a", kwargs='{"who": "a"}'),
                            done_task("y", completed_at=T0 + 10, worker_name="pod-a")])
            await b.ingest([done_task("x", completed_at=T0 + 20, worker_name="pod-b"),
                            done_task("y", completed_at=T0 + 60, worker_name="pod-b")])
            for j in (a, b):  # a ships first: x stays a's (newer), y becomes b's (newer)
                sink = Sink(SinkSettings(dsn=dsn), j)
                try:
                    assert await sink.sync_all() == 2
                finally:
                    await sink.close()
        rows = await pg_rows(pg)
        assert (rows["x"]["worker_name"], rows["x"]["completed_at"]) == ("pod-a", at(T0 + 50))
        assert orjson.loads(rows["x"]["kwargs"]) == {"who": "a"}
        assert (rows["y"]["worker_name"], rows["y"]["completed_at"]) == ("pod-b", at(T0 + 60))

    async def test_batch_of_new_and_shipped_rows_inserts_and_upserts(self, journal: Journal, sink: Sink,
                                                                     pg: asyncpg.Connection) -> None:
        """One batch mixing new rows with rows PostgreSQL has (newer and older): new ones inserted, newer wins."""
        await journal.ingest([done_task(f"old{i}", completed_at=T0 + 10) for i in range(20)])
        assert await sink.sync_all() == 20
        # ten come back newer, ten come back older (another pod's late copy), twenty are new
        set_rows(journal.path, "UPDATE task_wal SET synced_to_postgres = 0, worker_name = 'pod-b', "
                 "completed_at = CASE WHEN CAST(substr(task_id, 4) AS INTEGER) < 10 THEN ? ELSE ? END",
                 (T0 + 20, T0 + 5))
        await journal.ingest([done_task(f"new{i}", completed_at=T0 + 15, worker_name="pod-b") for i in range(20)])
        assert await sink.sync_once() == 40  # one batch
        rows = await pg_rows(pg)
        assert len(rows) == 40
        assert {i for i, r in rows.items() if r["worker_name"] == "pod-b"} == (
            {f"old{i}" for i in range(10)} | {f"new{i}" for i in range(20)})
        assert {r["completed_at"] for i, r in rows.items() if i.startswith("old")} == {at(T0 + 20), at(T0 + 10)}
        assert set(sync_states(journal.path).values()) == {(SYNC_DONE, None)}

    async def test_row_changed_while_shipping_is_shipped_again(self, tmp_path: Path, dsn: str,
                                                               pg: asyncpg.Connection) -> None:
        """A row requeued (`wal retry-failed`) while its old outcome ships stays unsynced; its next outcome ships."""
        async with RetryFailedWhileShipping.open(tmp_path / "j.db") as j:
            await j.ingest([new_task("t")])
            await run_tasks(j, [Outcome("t", "FAILURE", error="ConnectionError: down", completed_at=T0 + 2)])
            sink = Sink(SinkSettings(dsn=dsn), j)
            try:
                await sink.sync_once()  # ships FAILURE; retry-failed runs between the read and the mark
                assert (await j.get_task("t") or {})["status"] == "PENDING"
                await j.claim(time.time() + 1, 10)
                await j.finish([Outcome("t", "SUCCESS", result='"retried"', completed_at=T0 + 100)])
                await sink.sync_all()
            finally:
                await sink.close()
        row = (await pg_rows(pg))["t"]
        assert row["status"] == "SUCCESS", (
            "the retried task's SUCCESS never reached PostgreSQL: mark_synced marked the requeued row "
            "synced although PostgreSQL only has the outcome read before the requeue")


class RetryFailedWhileShipping(Journal):
    """A journal on which `ecoworker wal retry-failed` runs once, right after the sink read its batch."""

    fired = False

    async def unsynced_page(self, limit: int, after: Cursor | None = None) -> tuple[list[Record], Cursor | None]:
        page = await super().unsynced_page(limit, after)
        if page[0] and not self.fired:
            self.fired = True
            await self.requeue(["FAILURE"])
        return page


# realistic outcomes PostgreSQL refuses: NUL inside a JSON string (orjson escapes it as \u0000, which
# jsonb cannot hold), a NUL byte in error text, and what the seed's json.dumps wrote for NaN and for a
# lone surrogate (e.g. a surrogate-escaped file name)
POISON: dict[str, dict[str, Any]] = {
    "nul_in_result": {"result": orjson.dumps({"text": "ocr\x00garbage"}).decode()},
    "nul_in_error": {"status": "FAILURE", "error": "OSError: bad path 'a\x00b'"},
    "nan_result": {"result": json.dumps({"score": float("nan")})},
    "lone_surrogate": {"result": json.dumps({"file": "photo-\udce9.jpg"})},
}


def outcome(task_id: str, completed_at: float, poison: str | None = None) -> Outcome:
    """A SUCCESS outcome, or the poison outcome of that kind."""
    values: dict[str, Any] = {"status": "SUCCESS", "result": '{"ok": true}', "completed_at": completed_at}
    values.update(POISON[poison] if poison else {})
    return Outcome(task_id, **values)


class TestPoisonRows:
    @pytest.mark.parametrize("kind", sorted(POISON))
    async def test_each_kind_is_rejected_and_kept(self, kind: str, journal: Journal, sink: Sink,
                                                  pg: asyncpg.Connection) -> None:
        """A row PostgreSQL refuses ends synced_to_postgres = -1 with PostgreSQL's error; its neighbours ship."""
        await ingest_and_run(journal, [outcome("before", T0), outcome("poison", T0 + 1, kind),
                                       outcome("after", T0 + 2)])
        assert await sink.sync_all() == 3
        assert set(await pg_rows(pg)) == {"before", "after"}
        state, error = sync_states(journal.path)["poison"]
        assert state == SYNC_REJECTED
        assert error and "Error" in error

    async def test_poison_rows_are_isolated_in_a_2000_row_batch(self, journal: Journal, sink: Sink,
                                                                pg: asyncpg.Connection) -> None:
        """Poison rows in a 2,000-row batch are isolated, kept at -1 with their error and counted; the rest ship."""
        poison_at = {7: "nul_in_result", 777: "nul_in_error", 1500: "nan_result", 1999: "lone_surrogate"}
        await ingest_and_run(journal, [outcome(f"t{i:04}", T0 + i, poison_at.get(i)) for i in range(2000)])
        rejected_before = counter("ecoworker_sync_rejected_rows_total")
        shipped_before = counter("ecoworker_sync_rows_total")
        assert await sink.sync_all() == 2000
        assert counter("ecoworker_sync_rejected_rows_total") - rejected_before == 4
        assert counter("ecoworker_sync_rows_total") - shipped_before == 1996
        in_pg = set(await pg_rows(pg))
        poison_ids = {f"t{i:04}" for i in poison_at}
        assert len(in_pg) == 1996 and not in_pg & poison_ids
        states = sync_states(journal.path)
        assert {i for i, (s, _) in states.items() if s == SYNC_REJECTED} == poison_ids
        assert "UntranslatableCharacterError" in (states["t0007"][1] or "")
        assert "CharacterNotInRepertoireError" in (states["t0777"][1] or "")
        assert "NaN" in (states["t1500"][1] or "")
        assert "surrogate" in (states["t1999"][1] or "")
        assert all(s == SYNC_DONE for i, (s, _) in states.items() if i not in poison_ids)
        assert await sink.sync_all() == 0  # rejected rows are kept, not retried forever
        assert (await journal.counts())["unsynced"] == 0


class EventJournal(Journal):
    """A journal that logs the sink's page reads and marks, in the order they finish."""

    events: list[str]

    async def unsynced_page(self, limit: int, after: Cursor | None = None) -> tuple[list[Record], Cursor | None]:
        page = await super().unsynced_page(limit, after)
        self.events.append("read")
        return page

    async def mark_synced(self, task_ids: Sequence[str], completed_at: Sequence[float | None] | None = None) -> None:
        await super().mark_synced(task_ids, completed_at)
        self.events.append("mark")


class CountingSink(Sink):
    """A sink that records how many batches are inside PostgreSQL transactions at once."""

    inside = peak = 0

    async def _write(self, conn: asyncpg.Connection, records: Sequence[Record]) -> None:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        try:
            await asyncio.sleep(0.05)  # long enough for the pass to start the next batch
            await super()._write(conn, records)
        finally:
            self.inside -= 1


class FailingSink(Sink):
    """A sink on which the batch starting with task `fail` meets a dropped connection, and the one
    starting with `slow` (every batch: "*") waits `delay` seconds before PostgreSQL sees it."""

    fail = slow = ""
    delay = 0.0
    writes = 0

    async def _write(self, conn: asyncpg.Connection, records: Sequence[Record]) -> None:
        self.writes += 1
        if records[0][0] == self.fail:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        if self.slow in ("*", records[0][0]):
            await asyncio.sleep(self.delay)
        await super()._write(conn, records)


def synced_ids(path: Path) -> set[str]:
    return {i for i, (state, _) in sync_states(path).items() if state == SYNC_DONE}


class TestPipeline:
    async def test_next_pages_are_read_and_batches_overlap_before_the_first_mark(
            self, tmp_path: Path, dsn: str, pg: asyncpg.Connection) -> None:
        """A pass reads the next pages before the first batch is marked, with pool_size batches in PostgreSQL."""
        async with EventJournal.open(tmp_path / "j.db") as j:
            assert isinstance(j, EventJournal)
            j.events = []
            await j.ingest([done_task(f"t{i:03}", completed_at=T0 + i) for i in range(500)])
            sink = CountingSink(SinkSettings(dsn=dsn, batch_size=100, pool_size=2), j)
            try:
                assert await sink.sync_pass() == 500
            finally:
                await sink.close()
            assert j.events.index("mark") >= 3, j.events  # pages 2 and 3 were read while batch 1 shipped
            assert sink.peak == 2  # two batches in PostgreSQL at once, never more than the pool
            assert synced_ids(j.path) == {f"t{i:03}" for i in range(500)}
        assert tuple(await pg.fetchrow("SELECT count(*), count(DISTINCT task_id) FROM task_results")) == (500, 500)

    async def test_equal_and_null_completion_times_across_pages_ship_once_in_one_pass(
            self, journal: Journal, dsn: str, pg: asyncpg.Connection) -> None:
        """Rows tied on completed_at, or without one, spanning page boundaries all ship in one pass, once each."""
        await journal.ingest([done_task(f"n{i:03}", completed_at=None) for i in range(150)])
        await journal.ingest([done_task(f"s{i:03}", completed_at=T0 + 5) for i in range(250)])
        await journal.ingest([done_task(f"z{i:03}", completed_at=T0 + 6 + i) for i in range(20)])
        sink = Sink(SinkSettings(dsn=dsn, batch_size=100), journal)
        try:
            assert await sink.sync_pass() == 420  # one pass: no row skipped by the page cursor
        finally:
            await sink.close()
        assert tuple(await pg.fetchrow("SELECT count(*), count(DISTINCT task_id), count(completed_at) "
                                       "FROM task_results")) == (420, 420, 270)
        assert (await journal.counts())["unsynced"] == 0

    async def test_row_finished_again_during_a_pass_ships_its_newer_outcome_in_that_pass(
            self, tmp_path: Path, dsn: str, pg: asyncpg.Connection) -> None:
        """A row finished again while its old outcome is in flight ships anew in that pass; the old one, committed
        last, does not overwrite it."""
        async with RetryFailedWhileShipping.open(tmp_path / "j.db") as j:
            outcomes = [outcome(f"t{i:03}", T0 + i) for i in range(300)]
            outcomes[10] = Outcome("t010", "FAILURE", error="ConnectionError: down", completed_at=T0 + 10)
            await ingest_and_run(j, outcomes)
            sink = FailingSink(SinkSettings(dsn=dsn, batch_size=100), j)
            sink.slow, sink.delay = "t000", 0.5  # batch 1, with the old outcome, commits after the new one
            try:
                original_requeue = j.requeue

                async def requeue_and_finish(statuses: Sequence[str]) -> int:
                    n = await original_requeue(statuses)  # right after page 1, which holds the FAILURE
                    await j.claim(time.time() + 1, 10)
                    await j.finish([Outcome("t010", "SUCCESS", result='"retried"', completed_at=T0 + 1000)])
                    return n

                j.requeue = requeue_and_finish  # type: ignore[method-assign]
                assert await sink.sync_pass() == 301  # 300 rows, one of them twice
            finally:
                await sink.close()
            assert (await j.counts())["unsynced"] == 0
        row = (await pg_rows(pg))["t010"]
        assert (row["status"], orjson.loads(row["result"]), row["completed_at"]) == (
            "SUCCESS", "retried", at(T0 + 1000))
        assert await pg.fetchval("SELECT count(*) FROM task_results") == 300

    async def test_a_failed_batch_lets_the_batches_in_flight_finish_then_raises(
            self, journal: Journal, dsn: str, pg: asyncpg.Connection) -> None:
        """Batch 2 losing its connection raises UNAVAILABLE once batches 1 and 3 shipped and were marked
        (and batch 4, if batch 1 was done before batch 2 failed and the pass went on meanwhile)."""
        await journal.ingest([done_task(f"t{i:03}", completed_at=T0 + i) for i in range(500)])
        sink = FailingSink(SinkSettings(dsn=dsn, batch_size=100, pool_size=2), journal)
        sink.fail = "t100"
        batch = [{f"t{i:03}" for i in range(start, start + 100)} for start in range(0, 500, 100)]
        try:
            # both pool connections open first: else batch 2 may still be connecting while batches
            # 1, 3 and 4 ship on the other one, and it fails only after batch 5 went out (1 run in 8)
            pool = await sink._ensure_pool()
            async with pool.acquire(), pool.acquire():
                pass
            with pytest.raises(UNAVAILABLE):
                await sink.sync_pass()
            assert sink.writes in (3, 4)
            in_pg = {r[0] for r in await pg.fetch("SELECT task_id FROM task_results")}
            assert in_pg == synced_ids(journal.path)  # nothing marked that PostgreSQL lacks, nothing left unmarked
            assert batch[0] | batch[2] <= in_pg and not in_pg & batch[1]
            assert in_pg - batch[0] - batch[2] == (batch[3] if sink.writes == 4 else set())
            sink.fail = ""  # the connection is back: the rest ships on the next pass
            assert await sink.sync_all() == 500 - len(in_pg)
        finally:
            await sink.close()
        assert tuple(await pg.fetchrow("SELECT count(*), count(DISTINCT task_id) FROM task_results")) == (500, 500)

    async def test_stop_cancels_a_slow_pass_at_its_deadline(self, journal: Journal, dsn: str,
                                                           pg: asyncpg.Connection) -> None:
        """stop(flush_timeout) returns at its deadline while PostgreSQL is slow: the batches in flight are cancelled."""
        await journal.ingest([done_task(f"t{i:03}", completed_at=T0 + i) for i in range(500)])
        sink = FailingSink(SinkSettings(dsn=dsn, batch_size=100, pool_size=2), journal)
        sink.slow, sink.delay = "*", 30
        sink.up = True
        try:
            started = time.monotonic()
            await sink.stop(flush_timeout=0.5)
            assert time.monotonic() - started < 10
            shipping = [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "Sink._ship"]
            assert not shipping  # cancelled and awaited, not left running
        finally:
            await sink.close()
        assert await pg.fetchval("SELECT count(*) FROM task_results") == 0
        assert (await journal.counts())["unsynced"] == 500

    async def test_a_batch_over_sqlites_variable_limit_is_marked_synced(self, journal: Journal, dsn: str,
                                                                        pg: asyncpg.Connection) -> None:
        """One 16,500-row batch ships and is marked although its 33,000 values exceed what one statement may bind."""
        await journal._run(lambda db: db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32_766))  # upstream default
        for start in range(0, 16_500, 500):
            await journal.ingest([done_task(f"t{i:05}", completed_at=T0 + i) for i in range(start, start + 500)])
        sink = Sink(SinkSettings(dsn=dsn, batch_size=20_000), journal)
        try:
            assert await sink.sync_once() == 16_500
        finally:
            await sink.close()
        assert await pg.fetchval("SELECT count(*) FROM task_results") == 16_500
        assert (await journal.counts())["unsynced"] == 0


class TestRolledBack:
    async def test_deadlocks_retry_the_batch_instead_of_rejecting_rows(self, journal: Journal, dsn: str,
                                                                       pg: asyncpg.Connection) -> None:
        """PostgreSQL rolling a batch back (deadlock_detected, 40P01) is no row's fault: all ship, none is rejected."""
        # the first 6 statements inserting into task_results are rolled back; a sequence counts
        # them, since nextval() is not undone by the rollback it causes
        await pg.execute("""
            CREATE SEQUENCE rollbacks_seq;
            CREATE FUNCTION roll_back_some() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('rollbacks_seq') <= 6 THEN
                    RAISE EXCEPTION 'deadlock detected (test)' USING ERRCODE = '40P01';
                END IF;
                RETURN NULL;
            END $$;
            CREATE TRIGGER roll_back_some AFTER INSERT ON task_results
                FOR EACH STATEMENT EXECUTE FUNCTION roll_back_some();
        """)
        await journal.ingest([done_task(f"d{i}") for i in range(4)])
        sink = Sink(SinkSettings(dsn=dsn, max_delay=0.2, backoff_max=0.5), journal)
        task = asyncio.create_task(sink.run())
        try:
            await wait_for(lambda: pg_count_at_least(dsn, 4), 20)
        finally:
            await sink.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert await pg.fetchval("SELECT nextval('rollbacks_seq')") > 6  # the trigger did roll batches back
        assert sync_states(journal.path) == {f"d{i}": (SYNC_DONE, None) for i in range(4)}


class TestUnavailable:
    async def test_closed_port_raises_unavailable_and_rows_stay(self, journal: Journal) -> None:
        """With PostgreSQL unreachable, sync_once raises an UNAVAILABLE error and every row stays unsynced."""
        await journal.ingest([done_task(f"t{i}") for i in range(5)])
        sink = Sink(SinkSettings(dsn=f"postgresql://u@127.0.0.1:{free_port()}/db"), journal)
        try:
            with pytest.raises(UNAVAILABLE):
                await sink.sync_once()
            with pytest.raises(UNAVAILABLE):
                await sink.sync_all()
        finally:
            await sink.close()
        assert {s for s, _ in sync_states(journal.path).values()} == {SYNC_WAITING}
        assert (await journal.counts())["unsynced"] == 5

    async def test_finished_tasks_do_not_cut_the_back_off_short(self, journal: Journal) -> None:
        """While PostgreSQL is unreachable, results finishing in bursts (lulls, full batches,
        urgent ones) wait for the back-off: in 3 s the sink tries 1 s, 1-2 s, ... apart, about
        3 times, not once per burst (60 here)."""
        await journal.ingest([done_task(f"t{i}") for i in range(150)])
        attempts = 0

        class CountingPasses(Sink):
            async def sync_pass(self, stop: asyncio.Event | None = None) -> int:
                nonlocal attempts
                attempts += 1
                return await super().sync_pass(stop)

        sink = CountingPasses(SinkSettings(dsn=f"postgresql://u@127.0.0.1:{free_port()}/db", lull_batch=100),
                              journal)
        task = asyncio.create_task(sink.run())
        try:
            for i in range(60):  # a burst every 50 ms: a lull, a full batch or an urgent result
                sink.notify(5000 if i % 3 == 1 else 150, urgent=i % 3 == 2)
                await asyncio.sleep(0.05)
        finally:
            await sink.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert sink.up is False
        assert 1 <= attempts <= 5, f"{attempts} attempts in 3 s"

    async def test_unmigrated_database_is_a_config_error(self, journal: Journal, stack_env: dict[str, str]) -> None:
        """An un-migrated database is a ConfigError naming `ecoworker db migrate`; auto_migrate migrates and ships."""
        await journal.ingest([done_task("t")])
        async with fresh_database(stack_env["POSTGRES_DSN"], migrated=False) as url:
            sink = Sink(SinkSettings(dsn=url), journal)
            try:
                with pytest.raises(ConfigError, match="run `ecoworker db migrate`"):
                    await sink.sync_once()
            finally:
                await sink.close()
            assert (await journal.counts())["unsynced"] == 1
            sink = Sink(SinkSettings(dsn=url, auto_migrate=True), journal)
            try:
                assert await sink.sync_all() == 1
            finally:
                await sink.close()
            assert await pg_count(url) == 1


class TestLoop:
    async def test_run_ships_within_max_delay_and_urgent_wakes_it(self, journal: Journal, dsn: str) -> None:
        """The loop ships ordinary rows only after max_delay, but notify(urgent=True) ships at once."""
        sink = Sink(SinkSettings(dsn=dsn, max_delay=30), journal)
        task = asyncio.create_task(sink.run())
        try:
            await asyncio.sleep(0.5)  # the first (empty) pass is done; the loop sleeps max_delay
            await journal.ingest([done_task("plain")])
            sink.notify(1, urgent=False)
            await asyncio.sleep(1)
            assert await pg_count(dsn) == 0
            await journal.ingest([done_task("urgent")])
            sink.notify(1, urgent=True)
            await wait_for(lambda: pg_count_at_least(dsn, 2), 3)
            assert sink.up is True
        finally:
            await sink.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def test_a_burst_ships_once_tasks_stop_finishing(self, journal: Journal, dsn: str) -> None:
        """With a 30 s max delay, 150 rows finishing in a stream ship only after the stream
        stops: within a second of the last one (a lull of LULL with ≥ lull_batch rows waiting),
        not 30 s later, and not while tasks were still finishing."""
        sink = Sink(SinkSettings(dsn=dsn, max_delay=30, lull_batch=100), journal)
        task = asyncio.create_task(sink.run())
        try:
            await asyncio.sleep(0.5)  # the first (empty) pass is done; the loop sleeps max_delay
            for i in range(15):  # 10 rows every 20 ms: never quiet for 50 ms
                await journal.ingest([done_task(f"b{i}-{j}") for j in range(10)])
                sink.notify(10, urgent=False)
                await asyncio.sleep(0.02)
            assert await pg_count(dsn) == 0  # past 100 rows for a while, but tasks kept finishing
            stopped = time.monotonic()
            await wait_for(lambda: pg_count_at_least(dsn, 150), 5, interval=0.02)
            assert time.monotonic() - stopped < 1
        finally:
            await sink.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def test_a_lull_with_few_rows_waits_out_max_delay(self, journal: Journal, dsn: str) -> None:
        """Fewer than lull_batch rows after a lull wait for max_delay (a trickle of tasks costs
        one PostgreSQL write per max_delay, not one per task); lull_batch=0 turns lulls off."""
        for lull_batch, rows in ((100, 99), (0, 300)):
            sink = Sink(SinkSettings(dsn=dsn, max_delay=30, lull_batch=lull_batch), journal)
            task = asyncio.create_task(sink.run())
            try:
                await asyncio.sleep(0.5)
                await journal.ingest([done_task(f"few-{lull_batch}-{i}") for i in range(rows)])
                sink.notify(rows, urgent=False)
                await asyncio.sleep(1.5)
                assert (await journal.counts())["unsynced"] == rows, f"lull_batch={lull_batch}"
            finally:
                await sink.stop()  # ships them: the next round starts from an empty backlog
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def test_stop_flushes_what_is_left(self, journal: Journal, dsn: str) -> None:
        """stop() ships the unsynced rows before returning, even while the loop waits out max_delay."""
        sink = Sink(SinkSettings(dsn=dsn, max_delay=30), journal)
        task = asyncio.create_task(sink.run())
        await asyncio.sleep(0.3)
        await journal.ingest([done_task(f"t{i}") for i in range(20)])
        await sink.stop(flush_timeout=10)
        await asyncio.wait_for(task, 5)
        assert await pg_count(dsn) == 20
        assert (await journal.counts())["unsynced"] == 0


# ================================================================== end to end

def journal_count(wal: Path, where: str) -> int:
    rows = journal_rows(wal, f"SELECT count(*) FROM task_wal WHERE {where}")
    return int(rows[0][0]) if rows else 0  # 0 while the worker is still creating the file


def success_count(wal: Path) -> int:
    return journal_count(wal, "status = 'SUCCESS'")


def unsynced_count(wal: Path) -> int:
    return journal_count(wal, "synced_to_postgres = 0")


async def assert_all_shipped_once(dsn: str, ids: Sequence[str], kwargs: Sequence[dict[str, Any]]) -> None:
    """task_results holds every id exactly once, SUCCESS, with its kwargs echoed as the result."""
    conn = await asyncpg.connect(dsn)
    try:
        total, distinct = await conn.fetchrow("SELECT count(*), count(DISTINCT task_id) FROM task_results "
                                              "WHERE task_id = ANY($1::text[])", list(ids))
        assert total == distinct == len(ids)
        rows = await conn.fetch("SELECT task_id, status, result FROM task_results WHERE task_id = ANY($1::text[])",
                                list(ids))
    finally:
        await conn.close()
    assert {r["status"] for r in rows} == {"SUCCESS"}
    expected = dict(zip(ids, kwargs, strict=True))
    assert all(orjson.loads(r["result"]) == expected[r["task_id"]] for r in rows)


class TestOutage:
    @pytest.mark.slow
    async def test_postgresql_outage_delays_shipping_only(self, amqp: Any, queue_name: str, workers: Any,
                                                          stack_env: dict[str, str],
                                                          private_stack: tuple[dict[str, str], dict[str, str]]
                                                          ) -> None:
        """PostgreSQL down mid-run: tasks still complete, /readyz stays 200; after, all ship once, two log lines."""
        services_env, values = private_stack
        dsn = values["POSTGRES_DSN"]
        db_migrate(env_for_worker(stack_env, POSTGRES_DSN=dsn))
        kwargs = [{"n": i} for i in range(5000)]
        ids = await amqp.publish_tasks(queue_name, "ecoworker.noop", kwargs[:1500])
        w = workers(queue_name, POSTGRES_DSN=dsn, ECOWORKER_SYNC_MAX_DELAY="0.5", ECOWORKER_SYNC_BACKOFF_MAX="2")
        await wait_for(lambda: pg_count_at_least(dsn, 1000), 60, message=w.log_text)
        await asyncio.to_thread(run_services, "stop-pg", env=services_env, timeout=120)
        try:
            assert await pg_count(dsn) == -1, "stop-pg left the private PostgreSQL answering"
            # the outage: 3,500 more tasks arrive in waves over ~8 s and complete into the journal
            done, ready = [success_count(w.wal)], []
            for wave in range(7):
                start = 1500 + wave * 500
                ids += await amqp.publish_tasks(queue_name, "ecoworker.noop", kwargs[start:start + 500])
                await asyncio.sleep(1.1)
                done.append(success_count(w.wal))
                ready.append(w.http("/readyz")[0])
            tail = w.log_text()[-3000:]
            assert ready == [200] * 7, (ready, tail)
            assert all(b > a for a, b in itertools.pairwise(done)), (done, tail)
            assert unsynced_count(w.wal) >= done[-1] - 1500, tail  # none of them shipped
            await wait_for(lambda: "PostgreSQL unavailable" in w.log_text(), 10, message=w.log_text)
            assert w.alive
        finally:
            await asyncio.to_thread(run_services, "start-pg", env=services_env, timeout=120)
        await wait_for(lambda: pg_count_at_least(dsn, 5000), 90, message=lambda: w.log_text()[-3000:])
        await wait_for(lambda: unsynced_count(w.wal) == 0, 20)
        await assert_all_shipped_once(dsn, ids, kwargs)
        assert await pg_count(dsn) == 5000
        text = w.log_text()
        assert text.count("PostgreSQL unavailable") == 1, text[-3000:]
        assert text.count("PostgreSQL is back") == 1, text[-3000:]
        assert w.alive and w.starts == 1


class TestKill:
    @pytest.mark.slow
    async def test_kill_minus_nine_while_syncing_ships_each_row_once(self, amqp: Any, queue_name: str,
                                                                      dsn: str, workers: Any) -> None:
        """kill -9 five times while shipping 5,000 results in small batches: each id ends in PostgreSQL once."""
        kwargs = [{"n": i} for i in range(5000)]
        ids = await amqp.publish_tasks(queue_name, "ecoworker.noop", kwargs)
        # run every task first with no PostgreSQL configured, so that the kills land in shipping only
        # (killing while tasks run would, after 4 kills, rightly bury an in-flight task as crash-looping)
        w = workers(queue_name, name="w", POSTGRES_DSN="")
        await wait_for(lambda: success_count(w.wal) == 5000, 120, message=w.log_text)
        assert await asyncio.to_thread(w.terminate, 60) == 0
        assert unsynced_count(w.wal) == 5000
        w = workers(queue_name, name="w", POSTGRES_DSN=dsn, ECOWORKER_SYNC_BATCH_SIZE="50")
        rng = random.Random(11)
        kills = mid_sync = 0
        conn = await asyncpg.connect(dsn)
        try:
            count = functools.partial(conn.fetchval, "SELECT count(*) FROM task_results")
            while kills < 5 and (before := await count()) < 5000:
                # wait until this run ships, then kill it at a random moment of its shipping
                await wait_for(functools.partial(_more_than, count, before), 60, interval=0.01, message=w.log_text)
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                w.kill()
                kills += 1
                shipped = await count()
                mid_sync += shipped < 5000
                marked = journal_count(w.wal, "synced_to_postgres = 1")
                print(f"kill {kills}: {shipped} row(s) in PostgreSQL, {marked} marked synced in the journal")
                w.start()
            await wait_for(lambda: _more_than(count, 4999), 60, message=w.log_text)
        finally:
            await conn.close()
        await wait_for(lambda: unsynced_count(w.wal) == 0, 30)
        assert mid_sync >= 5, f"only {mid_sync} kill(s) landed before everything was shipped"
        st = statuses(w.wal)
        assert len(st) == 5000 and set(st.values()) == {"SUCCESS"}
        await assert_all_shipped_once(dsn, ids, kwargs)
        assert await pg_count(dsn) == 5000


async def _more_than(count: Any, n: int) -> bool:
    return int(await count()) > n


class TestUrgent:
    async def test_urgent_result_ships_at_once_ordinary_waits(self, amqp: Any, queue_name: str, dsn: str,
                                                              workers: Any) -> None:
        """With a 30 s max delay an urgent result ships within ~3 s; a noop finished just after it still waits."""
        await amqp.declare(queue_name)
        w = workers(queue_name, POSTGRES_DSN=dsn, ECOWORKER_SYNC_MAX_DELAY="30")
        w.wait_ready()
        await asyncio.sleep(0.5)  # the sink's first (empty) pass is over; it now sleeps up to 30 s
        [urgent] = await amqp.publish_tasks(queue_name, "ecoworker.urgent", [{"tier": "realtime"}])
        await wait_for(lambda: statuses(w.wal).get(urgent) == "SUCCESS", 10, interval=0.05)
        finished = time.monotonic()
        await wait_for(lambda: pg_count_at_least(dsn, 1), 3, interval=0.05, message=w.log_text)
        assert time.monotonic() - finished < 3
        [plain] = await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"tier": "batch"}])
        await wait_for(lambda: statuses(w.wal).get(plain) == "SUCCESS", 10, interval=0.05)
        await asyncio.sleep(3)
        conn = await asyncpg.connect(dsn)
        try:
            shipped = {r[0]: orjson.loads(r[1]) for r in await conn.fetch("SELECT task_id, result FROM task_results")}
        finally:
            await conn.close()
        assert shipped == {urgent: {"tier": "realtime"}}
        assert journal_rows(w.wal, "SELECT synced_to_postgres FROM task_wal WHERE task_id = ?", (plain,))[0][0] == 0


class TestWalSyncCommand:
    async def test_wal_sync_ships_unsynced_rows(self, tmp_path: Path, dsn: str, pg: asyncpg.Connection) -> None:
        """`ecoworker wal sync --db PATH` ships every unsynced row and prints "shipped N row(s)"."""
        path = tmp_path / "offline.db"
        async with Journal.open(path) as j:
            await j.ingest([done_task(f"t{i}", completed_at=T0 + i) for i in range(123)] + [new_task("pending")])
        env = env_for_worker({}, POSTGRES_DSN=dsn, ECOWORKER_SYNC_BATCH_SIZE="50")
        proc = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "ecoworker.cli", "wal", "sync", "--db", str(path)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "shipped 123 row(s)" in proc.stdout
        assert await pg.fetchval("SELECT count(*) FROM task_results") == 123
        assert unsynced_count(path) == 1  # only the PENDING row, which is not terminal
