"""The scheduler against a real journal file whose writes fail for a while (a full disk, an
I/O error): it keeps retrying, logs the failure once rather than every second, says when it
works again, and every task still ends SUCCESS exactly once."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from ecoworker import builtins
from ecoworker.journal import ClaimedTask, Journal, NewTask, Outcome
from ecoworker.scheduler import Scheduler
from ecoworker.settings import Settings


class FailingJournal(Journal):
    """A real journal whose claim and finish raise the error a full disk gives, `fail` times each."""

    fail_claims = 0
    fail_finishes = 0

    async def claim(self, now: float, limit: int, exclude: object = ()) -> list[ClaimedTask]:
        if self.fail_claims > 0:
            self.fail_claims -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return await super().claim(now, limit, exclude)  # type: ignore[arg-type]

    async def finish(self, outcomes: Sequence[Outcome]) -> None:
        if self.fail_finishes > 0:
            self.fail_finishes -= 1
            raise sqlite3.OperationalError("database or disk is full")
        await super().finish(outcomes)


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[FailingJournal]:
    async with FailingJournal.open(tmp_path / "journal.db") as j:
        assert isinstance(j, FailingJournal)
        yield j


async def run_until_done(journal: Journal, ids: list[str], within: float) -> None:
    scheduler = Scheduler(Settings(), journal, builtins.registry, None, lambda outcomes, urgent: None)
    runner = asyncio.create_task(scheduler.run())
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            rows = {r["task_id"]: r["status"] for r in await journal.list_tasks()}
            if all(rows.get(i) == "SUCCESS" for i in ids):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"tasks not done in {within} s: {rows}")
    finally:
        await scheduler.stop(grace=1)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


def pending(task_id: str) -> NewTask:
    now = time.time()
    return NewTask(task_id, "ecoworker.noop", "w1", "storage", "[]", '{"n": 1}', created_at=now, not_before=now)


async def test_failing_writes_are_logged_once_per_outage(journal: FailingJournal,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Claims that fail 3 times and finishes that fail 3 times (3 s of retries each) give one
    error line apiece, then one line each saying how many attempts failed; the tasks run once."""
    caplog.set_level(logging.INFO, logger="ecoworker.scheduler")
    ids = [f"t{i}" for i in range(5)]
    await journal.ingest([pending(i) for i in ids])
    journal.fail_claims, journal.fail_finishes = 3, 3
    await run_until_done(journal, ids, within=30)
    lines = [r.getMessage() for r in caplog.records if r.name == "ecoworker.scheduler"]
    assert [m for m in lines if m.startswith("could not claim")] == [
        "could not claim due tasks from the journal: database or disk is full; retrying every second "
        "(logged again once it works)"]
    assert [m for m in lines if m.startswith("could not journal")] == [
        "could not journal task outcomes: database or disk is full; retrying every second "
        "(logged again once it works)"]
    assert "could claim due tasks from the journal again after 3 failed attempt(s)" in lines
    assert "could journal task outcomes again after 3 failed attempt(s)" in lines
    assert all(r["attempts"] == 1 for r in await journal.list_tasks())
