"""The in-process maintenance loop (the seed's Celery-beat jobs) on a real journal file."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from ecoworker.journal import Journal
from ecoworker.maintenance import Maintenance
from ecoworker.settings import MaintenanceSettings

TICK = 0.05
FAST = MaintenanceSettings(checkpoint_interval=0.2, cleanup_interval=0.2, retention_days=0,
                           wal_warn_bytes=1024 ** 3)


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    async with Journal.open(tmp_path / "journal.db") as j:
        yield j


async def add_tasks(journal: Journal, prefix: str, n: int, *, finish: bool = False, synced: bool = False) -> list[str]:
    """`n` rows PENDING, or SUCCESS (optionally marked synced to PostgreSQL)."""
    ids = [f"{prefix}-{i}" for i in range(n)]
    for task_id in ids:
        await journal.write_task(task_id, "ecoworker.noop", "w1", kwargs={"pad": "x" * 400}, queue="q")
        if finish:
            await journal.start_task(task_id)
            await journal.complete_task(task_id, {"ok": True})
    if synced:
        await journal.mark_synced(ids)
    return ids


async def run_for(maintenance: Maintenance, seconds: float) -> None:
    """Run the loop for `seconds`, then stop it and wait for it to end."""
    task = asyncio.create_task(maintenance.run())
    await asyncio.sleep(seconds)
    maintenance.stop()
    await asyncio.wait_for(task, 2)


def page_bytes(journal_path: Path) -> int:
    import sqlite3

    db = sqlite3.connect(journal_path)
    try:
        return int(db.execute("PRAGMA page_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0])
    finally:
        db.close()


class TestCheckpoint:
    async def test_passive_checkpoint_copies_wal_pages_into_the_database(self, journal, caplog):
        """A PASSIVE checkpoint runs at its interval and copies every WAL page into the database file."""
        caplog.set_level(logging.DEBUG, logger="ecoworker.maintenance")
        await add_tasks(journal, "t", 50)
        before = journal.path.stat().st_size
        assert page_bytes(journal.path) > before  # the rows are still only in the -wal file
        await run_for(Maintenance(FAST, journal, tick=TICK), 0.5)
        assert journal.path.stat().st_size == page_bytes(journal.path) > before
        done = [r.args for r in caplog.records if r.getMessage().startswith("PASSIVE checkpoint")]
        assert done, "no checkpoint was logged"
        assert all(copied == pages > 0 for copied, pages, *_ in done)

    async def test_checkpoint_waits_for_its_interval(self, journal, caplog):
        """Nothing is checkpointed before checkpoint_interval has elapsed."""
        caplog.set_level(logging.DEBUG, logger="ecoworker.maintenance")
        await add_tasks(journal, "t", 20)
        before = journal.path.stat().st_size
        slow = MaintenanceSettings(checkpoint_interval=60, cleanup_interval=60, wal_warn_bytes=1024 ** 3)
        await run_for(Maintenance(slow, journal, tick=TICK), 0.3)
        assert journal.path.stat().st_size == before
        assert not [r for r in caplog.records if "checkpoint" in r.getMessage()]


class TestRetention:
    async def test_cleanup_removes_old_synced_rows_and_keeps_the_rest(self, journal, caplog):
        """Retention cleanup deletes synced terminal rows past retention; unsynced and unfinished rows stay."""
        caplog.set_level(logging.INFO, logger="ecoworker.maintenance")
        synced = await add_tasks(journal, "synced", 5, finish=True, synced=True)
        unsynced = await add_tasks(journal, "unsynced", 3, finish=True)
        pending = await add_tasks(journal, "pending", 2)
        await run_for(Maintenance(FAST, journal, tick=TICK), 0.5)
        remaining = {r["task_id"] for r in await journal.list_tasks(limit=100)}
        assert remaining == set(unsynced) | set(pending)
        assert not remaining & set(synced)
        assert "retention cleanup removed 5 synced row(s) older than 0 days" in caplog.messages

    async def test_rows_inside_the_retention_window_are_kept(self, journal):
        """Synced rows younger than retention_days are not deleted."""
        synced = await add_tasks(journal, "recent", 3, finish=True, synced=True)
        week = MaintenanceSettings(checkpoint_interval=0.2, cleanup_interval=0.2, retention_days=7,
                                   wal_warn_bytes=1024 ** 3)
        await run_for(Maintenance(week, journal, tick=TICK), 0.5)
        assert {r["task_id"] for r in await journal.list_tasks(limit=100)} == set(synced)


class TestWalSizeWarning:
    async def test_large_wal_file_warns_once_and_sets_the_gauge(self, journal, caplog):
        """Past wal_warn_bytes the loop logs one warning (not one per tick) and sets the -wal size gauge."""
        caplog.set_level(logging.INFO, logger="ecoworker.maintenance")
        await add_tasks(journal, "t", 5)
        tiny = MaintenanceSettings(checkpoint_interval=60, cleanup_interval=60, wal_warn_bytes=1)
        await run_for(Maintenance(tiny, journal, tick=TICK), 0.4)  # ~8 ticks
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "-wal file" in r.getMessage()]
        assert len(warnings) == 1
        assert "ecoworker wal checkpoint --mode truncate" in warnings[0].getMessage()
        size = journal.wal_file.stat().st_size
        assert size > 1
        assert REGISTRY.get_sample_value("ecoworker_sqlite_wal_file_bytes") == size

    async def test_no_warning_below_the_threshold(self, journal, caplog):
        """A -wal file under wal_warn_bytes logs nothing."""
        caplog.set_level(logging.INFO, logger="ecoworker.maintenance")
        await add_tasks(journal, "t", 5)
        await run_for(Maintenance(FAST, journal, tick=TICK), 0.3)
        assert not [r for r in caplog.records if "-wal file" in r.getMessage()]


class TestLifecycle:
    async def test_stop_ends_run_promptly(self, journal):
        """stop() ends a running loop within about one tick, even with long job intervals."""
        slow = MaintenanceSettings(checkpoint_interval=3600, cleanup_interval=3600, wal_warn_bytes=1024 ** 3)
        maintenance = Maintenance(slow, journal, tick=1.0)
        task = asyncio.create_task(maintenance.run())
        await asyncio.sleep(0.1)
        started = time.monotonic()
        maintenance.stop()
        await asyncio.wait_for(task, 2)
        assert time.monotonic() - started < 0.2

    async def test_failing_job_is_logged_and_the_loop_goes_on(self, tmp_path, caplog):
        """A job that raises is logged as a warning and the loop keeps running until stopped."""
        caplog.set_level(logging.INFO, logger="ecoworker.maintenance")
        journal = await Journal.connect(tmp_path / "closed.db")
        await journal.close()  # every job now fails: the connection is gone
        maintenance = Maintenance(FAST, journal, tick=TICK)
        task = asyncio.create_task(maintenance.run())
        await asyncio.sleep(0.5)
        assert not task.done()
        maintenance.stop()
        await asyncio.wait_for(task, 2)
        failures = [m for m in caplog.messages if m.startswith("maintenance job failed")]
        assert len(failures) >= 2  # retried at the next interval, not given up
