"""The scheduler against a real journal file: when it claims (only when rows may be due, and
promptly when they become due) and what it does while the journal's writes fail for a while
(a full disk, an I/O error): it keeps retrying, logs the failure once rather than every second,
says when it works again, and every task still ends SUCCESS exactly once."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from ecoworker import builtins
from ecoworker.journal import ClaimedTask, Journal, NewTask, Outcome
from ecoworker.scheduler import Scheduler
from ecoworker.settings import Settings


class FailingJournal(Journal):
    """A real journal whose claim and finish raise the error a full disk gives, `fail` times each;
    it counts the claims asked of it."""

    fail_claims = 0
    fail_finishes = 0
    claims = 0

    async def claim(self, now: float, limit: int, exclude: object = ()) -> list[ClaimedTask]:
        self.claims += 1
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


REGISTRY = builtins.registry.merge(builtins.test_registry)


@asynccontextmanager
async def running(journal: Journal) -> AsyncIterator[Scheduler]:
    scheduler = Scheduler(Settings(), journal, REGISTRY, None, lambda outcomes, urgent: None)
    runner = asyncio.create_task(scheduler.run())
    try:
        yield scheduler
    finally:
        await scheduler.stop(grace=1)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def wait_done(journal: Journal, ids: list[str], within: float) -> dict[str, dict[str, Any]]:
    """The journal rows of `ids` once all are SUCCESS; fails after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        rows = {r["task_id"]: r for r in await journal.list_tasks(limit=1000)}
        if all(i in rows and rows[i]["status"] == "SUCCESS" for i in ids):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"tasks not done in {within} s: { {i: rows.get(i) for i in ids} }")
        await asyncio.sleep(0.02)


async def run_until_done(journal: Journal, ids: list[str], within: float) -> None:
    async with running(journal):
        await wait_done(journal, ids, within)


def pending(task_id: str, name: str = "ecoworker.noop", kwargs: str = '{"n": 1}', delay: float = 0.0) -> NewTask:
    now = time.time()
    return NewTask(task_id, name, "w1", "storage", "[]", kwargs, created_at=now, not_before=now + delay)


async def test_tasks_started_at_intake_cost_no_claims(journal: FailingJournal) -> None:
    """Tasks journaled straight as RUNNING (the consumer's path when slots are free) run without
    the scheduler asking the journal for due rows: a finished task frees a slot, but with
    nothing PENDING that is no reason to claim. (Claiming on every finish took the free slots
    from intake, so under load nearly every task was written twice: ingest, then claim.)"""
    async with running(journal) as scheduler:
        await asyncio.sleep(0.2)  # the start-up claim (recovered rows) is done
        before = journal.claims
        ids = [f"t{i}" for i in range(40)]
        for task_id in ids:  # as Consumer._commit does it, one delivery at a time
            row = pending(task_id)
            assert scheduler.reserve([row.task_name]) == [0]
            claimed = row.started(time.time())
            assert await journal.ingest([row]) == {task_id}
            scheduler.adopt([claimed], [row.task_name])
            await asyncio.sleep(0.01)
        rows = await wait_done(journal, ids, within=10)
        claims = journal.claims - before
    assert all(rows[i]["attempts"] == 1 for i in ids)
    assert claims <= 1, f"{claims} claims for 40 tasks that needed none"  # ≤ 1: the 1 s idle look


async def test_rows_journaled_pending_are_claimed_when_the_scheduler_is_woken(journal: FailingJournal) -> None:
    """PENDING rows are claimed as soon as wake() says they are there, not at the next idle look."""
    async with running(journal) as scheduler:
        await asyncio.sleep(0.2)
        ids = [f"p{i}" for i in range(20)]
        await journal.ingest([pending(i) for i in ids])
        started = time.monotonic()
        scheduler.wake()
        await wait_done(journal, ids, within=10)
        assert time.monotonic() - started < 0.5


async def test_a_row_due_later_runs_at_its_time(journal: FailingJournal) -> None:
    """A row due 1.5 s from now (an ETA, a retry's back-off) is claimed when it is due, by the
    scheduler's timer: not before, and not at the next one-second idle look after it."""
    async with running(journal) as scheduler:
        await asyncio.sleep(0.2)
        row = pending("eta", delay=1.5)
        await journal.ingest([row])
        scheduler.wake()
        rows = await wait_done(journal, ["eta"], within=10)
    assert row.not_before is not None
    late = rows["eta"]["started_at"] - row.not_before
    assert 0 <= late < 0.4, f"started {late:+.2f} s after it was due"


async def test_rows_held_back_by_their_task_limit_start_as_slots_free(journal: FailingJournal) -> None:
    """Ten 0.1 s tasks of a task limited to 2 at a time: each finish makes room for the next
    row at once (about 0.5 s in all), instead of one claim per idle second (5 s)."""
    ids = [f"l{i}" for i in range(10)]
    await journal.ingest([pending(i, "ecoworker.sleep_limited", '{"seconds": 0.1}') for i in ids])
    started = time.monotonic()
    async with running(journal):
        await wait_done(journal, ids, within=15)
    assert time.monotonic() - started < 2.5


async def test_handlers_past_their_time_limit_are_cancelled_each_at_its_own_limit(journal: FailingJournal) -> None:
    """Handlers sleeping 30 s with time limits of 0.3, 0.6 and 0.9 s (the message's own limit)
    are cancelled at their limits: FAILURE 'timed out after …' (max_retries 0), each ending
    within 0.25 s of its limit, while a task within its limit succeeds."""
    now = time.time()
    rows = [NewTask(f"t{limit}", "ecoworker.sleep", "w1", "storage", "[]", '{"seconds": 30}', created_at=now,
                    not_before=now, timeout=limit, max_retries=0) for limit in (0.9, 0.3, 0.6)]
    rows.append(NewTask("ok", "ecoworker.sleep", "w1", "storage", "[]", '{"seconds": 0.1}', created_at=now,
                        not_before=now, timeout=0.6))
    await journal.ingest(rows)
    async with running(journal):
        await wait_done(journal, ["ok"], within=10)
        deadline = time.monotonic() + 10
        while True:
            done = {r["task_id"]: r for r in await journal.list_tasks(limit=100) if r["status"] == "FAILURE"}
            if len(done) == 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
    assert sorted(done) == ["t0.3", "t0.6", "t0.9"], done
    for task_id, row in done.items():
        limit = float(task_id[1:])
        assert row["error"] == f"gave up after 1 attempt(s): timed out after {limit:g}s"
        took = row["completed_at"] - row["started_at"]
        assert limit <= took < limit + 0.25, f"{task_id} ended {took:.2f} s after it started"


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
