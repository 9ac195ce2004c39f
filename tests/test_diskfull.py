"""A journal on a file system that fills up: the worker stops taking work, loses nothing, and resumes by itself.

The journal lives on a size-limited tmpfs mounted for the test (root only). A
filler file takes almost all of it; tasks with 20 KB arguments then fill the rest.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
import pytest

from tests.tcp_proxy import TcpProxy
from tests.workers import (
    WorkerProcess,
    descendants,
    env_for_worker,
    fresh_database,
    journal_rows,
    statuses,
    wait_for,
)

KiB = 1024
MiB = 1024 * KiB
PAD = "x" * (20 * KiB)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted under tmp_path; unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@pytest.fixture
def journal_worker(small_fs: Path, tmp_path: Path, stack_env: dict[str, str]) -> Iterator[Any]:
    """Factory: a worker whose journal is on the small file system (killed after the test)."""
    started: list[WorkerProcess] = []

    def make(queue: str, **env: str) -> WorkerProcess:
        env = {"POSTGRES_DSN": "", **env}
        w = WorkerProcess(small_fs / "journal.db", [queue], env_for_worker(stack_env, **env), tmp_path / "worker.log")
        started.append(w)
        return w.start()

    yield make
    for w in started:
        w.kill()


def fill(directory: Path, leave: int = 0) -> Path:
    """Write a filler file so that only about `leave` bytes stay free (0: not one byte)."""
    filler = directory / "filler"
    remaining = shutil.disk_usage(directory).free - leave
    block = b"\xff" * (64 * KiB)
    with filler.open("wb", buffering=0) as f:
        try:
            while remaining > 0:
                remaining -= f.write(block[:remaining])
        except OSError as exc:  # ENOSPC: full, as asked
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def _readyz(w: WorkerProcess) -> tuple[int, dict[str, Any]]:
    code, body = w.http("/readyz")
    return code, orjson.loads(body) if body else {}


class TestDiskFull:
    async def test_full_disk_stops_acking_then_resumes_by_itself(self, amqp, queue_name, journal_worker, small_fs):
        """Full journal volume: alive, nacks back, unready naming the journal; once freed, every task runs once."""
        await amqp.declare(queue_name)
        w = journal_worker(queue_name, ECOWORKER_MIN_FREE_DISK_BYTES=str(256 * KiB))
        await asyncio.to_thread(w.wait_ready)
        filler = fill(small_fs, leave=3072 * KiB)
        # 160 x 20 KiB of arguments alone is more than the 3 MiB left, so the journal cannot take them all
        # whatever SQLite's checkpoint timing (120 once fitted in the WAL when no checkpoint ran in between)
        ids = await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"n": i, "pad": PAD} for i in range(160)])

        reasons: set[str] = set()
        depths: list[int] = []

        async def unready() -> bool:
            code, body = _readyz(w)
            if code == 503:
                reasons.add(body.get("reason", ""))
            return code == 503

        await wait_for(unready, 30, message=lambda: w.log_text()[-2000:])
        # watch it for a while: it must stay alive and keep the rest in the broker
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            assert w.alive, "the worker died on a full disk:\n" + w.log_text()[-3000:]
            await unready()
            depths.append(await amqp.depth(queue_name))
            await asyncio.sleep(0.3)
        print(f"readyz reasons while full: {sorted(reasons)}; queue depth {min(depths)}..{max(depths)}")
        # each retry takes a burst into the prefetch window for a moment, so look at most samples, not every one
        assert sum(d > 0 for d in depths) >= len(depths) * 0.8, (
            f"deliveries must stay in (or go back to) the broker while the journal is full: depths {depths}")
        assert any("journal" in r or "disk" in r for r in reasons), reasons
        log = w.log_text()
        assert "journal write failed" in log or "consumer paused: disk nearly full" in log, log[-3000:]
        # retries back off (1, 2, 4 … s) instead of pulling a burst into a full journal every second
        assert log.count("journal write failed") <= 5, log[-3000:]
        done_while_full = sum(s == "SUCCESS" for s in statuses(w.wal).values())
        assert done_while_full < len(ids)

        filler.unlink()
        await wait_for(lambda: _all_succeeded(amqp, queue_name, w, ids), 60, message=lambda: (
            f"every task to succeed once space returned; journal: {_by_status(w)} (PENDING rows that never run: "
            "see test_journaled_tasks_due_while_the_disk_is_full_run_after_it_frees)\n" + w.log_text()[-3000:]))
        rows = journal_rows(w.wal)
        assert sorted(r["task_id"] for r in rows) == sorted(ids)
        assert all(r["attempts"] == 1 for r in rows)
        assert orjson.loads(rows[0]["result"])["pad"] == PAD
        assert w.alive and w.starts == 1
        await wait_for(lambda: _readyz(w)[0] == 200, 10)

    async def test_journaled_tasks_due_while_the_disk_is_full_run_after_it_frees(self, amqp, queue_name,
                                                                               journal_worker, small_fs):
        """Journaled tasks falling due while the volume is full run once space returns."""
        await amqp.declare(queue_name)
        w = journal_worker(queue_name, ECOWORKER_MIN_FREE_DISK_BYTES=str(256 * KiB))
        await asyncio.to_thread(w.wait_ready)
        eta = datetime.fromtimestamp(time.time() + 4, UTC).isoformat()
        ids = [f"due-{i}-{queue_name}" for i in range(20)]
        for task_id in ids:
            body = orjson.dumps({"id": task_id, "task": "ecoworker.noop", "kwargs": {"pad": PAD}, "eta": eta})
            await amqp.publish(queue_name, body, content_type="application/json", message_id=task_id)
        await wait_for(lambda: _by_status(w) == {"PENDING": 20}, 10)
        filler = fill(small_fs)
        await asyncio.sleep(8)  # the ETA passes while not one byte is free
        assert w.alive, w.log_text()[-3000:]
        assert _by_status(w) == {"PENDING": 20}
        filler.unlink()
        await wait_for(lambda: _by_status(w) == {"SUCCESS": 20}, 20, message=lambda: (
            f"the tasks to run once space returned; journal: {_by_status(w)}. A claim that fails on a full disk "
            "must be retried: ecoworker/scheduler.py _claim_loop lets the OperationalError end the claim loop, "
            "and Scheduler.run then waits forever on its finisher, so the worker stays up and ready but never "
            "runs anything again.\n" + w.log_text()[-2000:]))
        assert w.alive and w.starts == 1

    async def test_results_shipped_while_the_disk_is_full_are_not_fatal(self, amqp, queue_name, journal_worker,
                                                                        small_fs, stack_env):
        """Results shipped while the journal volume is full: the worker survives and marks them synced later."""
        async with fresh_database(stack_env["POSTGRES_DSN"]) as dsn:
            conn = await asyncpg.connect(dsn)
            try:
                with TcpProxy(*_host_port(dsn)) as proxy:
                    proxy.refuse()
                    w = journal_worker(queue_name, POSTGRES_DSN=proxy.url(dsn), ECOWORKER_SYNC_BACKOFF_MAX="1",
                                       ECOWORKER_MIN_FREE_DISK_BYTES=str(256 * KiB))
                    ids = await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"n": i} for i in range(200)])
                    await wait_for(lambda: _all_succeeded(amqp, queue_name, w, ids), 30, message=w.log_text)
                    filler = fill(small_fs)
                    proxy.pass_()
                    await wait_for(lambda: _shipped(conn, ids), 20, message=lambda: w.log_text()[-2000:])
                    await asyncio.sleep(3)
                    assert w.alive, ("the worker died when it could not mark shipped rows synced:\n"
                                     + w.log_text()[-3000:])
                    filler.unlink()
                    await wait_for(lambda: _unsynced(w) == 0, 20, message=lambda: (
                        f"shipped rows to be marked synced once space returned ({_unsynced(w)} unsynced; worker "
                        f"alive={w.alive}, /readyz={w.http('/readyz')}, /healthz={w.http('/healthz')[0]}). A failed "
                        "mark_synced must be retried: ecoworker/sink.py Sink.run lets the journal's OperationalError "
                        "escape, which takes the worker's TaskGroup down, and Scheduler.run then hangs in "
                        "`await finisher`, so the process stays up doing nothing.\n" + w.log_text()[-2000:]))
                    rows = await conn.fetch("SELECT task_id, status FROM task_results")
                    assert sorted(r["task_id"] for r in rows) == sorted(ids)
                    assert {r["status"] for r in rows} == {"SUCCESS"}
                    assert w.alive and w.starts == 1
            finally:
                await conn.close()


class TestJournalWriteErrors:
    async def test_failing_journal_with_free_space_retries_with_backoff(self, amqp, queue_name, tmp_path,
                                                                        stack_env):
        """A journal that fails with space free (a file-size limit): retries back off, then every task runs once."""
        w = WorkerProcess(tmp_path / "journal.db", [queue_name], env_for_worker(stack_env, POSTGRES_DSN=""),
                          tmp_path / "worker.log")
        await amqp.declare(queue_name)
        w.start()
        try:
            await asyncio.to_thread(w.wait_ready)
            assert w.proc is not None
            # the worker may not grow any file past 2 MiB (EFBIG; Python ignores SIGXFSZ), the disk stays roomy
            limit = (w.wal.stat().st_size if w.wal.exists() else 0) + 2 * MiB
            family = [w.proc.pid, *descendants(w.proc.pid)]  # the worker, its resource tracker, …
            assert len(family) >= 2, family
            for pid in family:
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            ids = await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"n": i, "pad": PAD} for i in range(200)])
            await wait_for(lambda: "journal write failed" in w.log_text(), 30, message=lambda: w.log_text()[-2000:])
            depths, reasons = [], set()
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline:  # sampled: each retry briefly resumes consuming
                depths.append(await amqp.depth(queue_name))
                code, body = _readyz(w)
                reasons.add(body.get("reason", "") if code == 503 else "ready")
                await asyncio.sleep(0.5)
            assert w.alive, w.log_text()[-3000:]
            failures = w.log_text().count("journal write failed")
            # every second without a back-off (12 here, measured); 1, 2, 4, 8 s apart with it. A write
            # can succeed in between (a checkpoint let SQLite reuse the WAL from its start, which
            # grows no file), and a success rightly resets the back-off: 7 was seen once, so 8
            assert 1 <= failures <= 8, f"{failures} failed writes in ~12 s:\n" + w.log_text()[-3000:]
            assert any("journal not writable" in r for r in reasons), reasons
            assert max(depths) > 0, "the rest must wait in the broker"

            for pid in [w.proc.pid, *descendants(w.proc.pid)]:
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            await wait_for(lambda: _all_succeeded(amqp, queue_name, w, ids), 40, message=lambda: (
                f"every task to succeed once the journal could grow; journal: {_by_status(w)}\n"
                + w.log_text()[-3000:]))
            rows = journal_rows(w.wal)
            assert sorted(r["task_id"] for r in rows) == sorted(ids)
            assert all(r["attempts"] == 1 for r in rows)
            await wait_for(lambda: _readyz(w)[0] == 200, 10)
        finally:
            w.kill()


def _host_port(dsn: str) -> tuple[str, int]:
    parts = urlsplit(dsn)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


async def _shipped(conn: asyncpg.Connection, ids: list[str]) -> bool:
    count = await conn.fetchval("SELECT count(*) FROM task_results WHERE task_id = ANY($1::text[])", ids)
    return int(count) == len(ids)


def _unsynced(w: WorkerProcess) -> int:
    return int(journal_rows(w.wal, "SELECT count(*) FROM task_wal WHERE synced_to_postgres = 0")[0][0])


def _by_status(w: WorkerProcess) -> dict[str, int]:
    return dict(Counter(statuses(w.wal).values()))


async def _all_succeeded(amqp: Any, queue: str, w: WorkerProcess, ids: list[str]) -> bool:
    st = statuses(w.wal)
    return all(st.get(i) == "SUCCESS" for i in ids) and await amqp.depth(queue) == 0
