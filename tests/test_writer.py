"""The journal's writer process (ecoworker.writer): its lifetime, its failures, its durability.

test_journal.py runs every journal test in both modes; these are the cases only a
second process has: it dies, the worker dies, signals, and what it tells SQLite.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ecoworker import writerchild
from ecoworker.errors import JournalError
from ecoworker.journal import Journal, NewTask, Outcome
from ecoworker.journal_sql import row_values
from tests.workers import REPO, descendants, process_alive, wait_for


def task(task_id: str) -> NewTask:
    now = time.time()
    return NewTask(task_id, "ecoworker.noop", "w1", "storage", "[]", "{}", created_at=now, not_before=now)


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    async with Journal.open(tmp_path / "journal.db", writer_process=True) as j:
        yield j


async def test_hot_writes_run_in_a_child_process(journal: Journal) -> None:
    """Ingest, claim, finish and the sink's read go to a child of this process, and their
    effects are in the file."""
    pid = journal.writer_pid
    assert pid is not None and pid != os.getpid()
    assert pid in descendants(os.getpid())
    assert await journal.ingest([task("a"), task("b")]) == {"a", "b"}
    claimed = await journal.claim(time.time(), 5)
    assert [c.task_id for c in claimed] == ["a", "b"]
    await journal.finish([Outcome("a", "SUCCESS", result="1", completed_at=time.time())])
    rows, _ = await journal.unsynced_page(10)
    assert [r[0] for r in rows] == ["a"]
    con = sqlite3.connect(journal.path)
    assert dict(con.execute("SELECT task_id, status FROM task_wal")) == {"a": "SUCCESS", "b": "RUNNING"}
    con.close()


async def test_an_error_in_the_child_is_raised_here_as_itself(journal: Journal) -> None:
    """A statement that fails in the child raises the same sqlite3 exception in the worker,
    and the child goes on serving."""
    with pytest.raises(sqlite3.OperationalError, match="no such table: nowhere"):
        await journal._hot("atomically", ([("INSERT INTO nowhere VALUES (1)", [])],))
    pid = journal.writer_pid
    assert await journal.ingest([task("a")]) == {"a"}
    assert journal.writer_pid == pid


async def test_a_cancelled_write_leaves_no_reply_for_the_next_one(journal: Journal) -> None:
    """A caller cancelled while the child works (a shutdown, a timeout) does not desynchronise
    the socket: the next call waits for that reply and then gets its own."""
    await journal.ingest([task("a")])
    slow = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) "
            "SELECT count(*) FROM c")
    busy = asyncio.create_task(journal._hot("atomically", ([(slow, [])],)))
    await asyncio.sleep(0.05)
    busy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await busy
    claimed = await journal.claim(time.time(), 5)
    assert [c.task_id for c in claimed] == ["a"]
    assert await journal.ingest([task("b")]) == {"b"}


async def test_a_killed_writer_fails_one_write_and_the_next_starts_a_new_one(journal: Journal) -> None:
    """kill -9 of the child: the write in flight fails with a JournalError that says what
    happened; committed rows are intact and the next write runs in a new child."""
    await journal.ingest([task("a")])
    old = journal.writer_pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    await wait_for(lambda: not process_alive(old), 10)
    with pytest.raises(JournalError, match=r"writer process ended \(killed by signal 9\) during a ingest"):
        await journal.ingest([task("b")])
    assert await journal.ingest([task("c")]) == {"c"}
    assert journal.writer_pid not in (None, old)
    assert {c.task_id for c in await journal.claim(time.time(), 10)} <= {"a", "b", "c"}
    con = sqlite3.connect(journal.path)
    assert {"a", "c"} <= {r[0] for r in con.execute("SELECT task_id FROM task_wal")}
    con.close()


async def test_signals_leave_the_child_to_the_worker(journal: Journal) -> None:
    """SIGTERM and SIGINT (a terminal's Ctrl-C reaches the whole process group) do not stop
    the child: the worker's graceful shutdown still has its journal. Closing the journal
    ends the child cleanly."""
    pid = journal.writer_pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    await asyncio.sleep(0.3)
    assert await journal.ingest([task("a")]) == {"a"}
    assert journal.writer_pid == pid
    proc = journal._process._proc  # type: ignore[union-attr]
    assert proc is not None
    await journal.close()
    assert proc.returncode == 0


_ORPHAN = """
import asyncio, sys, time
from ecoworker.journal import Journal, NewTask

async def main():
    j = await Journal.connect(sys.argv[1], writer_process=True)
    await j.ingest([NewTask("a", "ecoworker.noop", "w", "q", "[]", "{}", created_at=time.time(), not_before=0)])
    print(j.writer_pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_the_child_exits_when_the_worker_is_killed(tmp_path: Path) -> None:
    """kill -9 of the worker leaves no writer behind: the kernel closes the worker's end of
    the socket and the child's next read ends it."""
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN, str(tmp_path / "journal.db")],
                            stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert process_alive(child)
        proc.kill()
        proc.wait()
        asyncio.run(wait_for(lambda: not process_alive(child), 10,
                             message=f"writer process {child} outlived its worker"))
    finally:
        proc.kill()
        proc.wait()
    con = sqlite3.connect(tmp_path / "journal.db")
    assert con.execute("SELECT task_id FROM task_wal").fetchall() == [("a",)]
    con.close()


def test_ingest_commits_at_full_in_the_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child switches its connection to synchronous=FULL before every ingest (what each ack
    waits on) and runs claims at NORMAL, as SQLite's thread does: `serve` on a traced connection."""
    path = tmp_path / "journal.db"
    asyncio.run(_create(path))
    traced: list[str] = []
    connect = sqlite3.connect

    def traced_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db = connect(*args, **kwargs)
        db.set_trace_callback(traced.append)
        return db

    monkeypatch.setattr(sqlite3, "connect", traced_connect)
    ours, theirs = socket.socketpair()
    server = threading.Thread(target=writerchild.serve, args=(str(path), theirs))
    server.start()
    try:
        assert ours.recv(1) == b"R", "the child says it is ready before anything else"
        assert _ask(ours, "ingest", ([row_values(task("a"))],), True) == (True, None)
        ok, text = _ask(ours, "claim", (9e9, 1, ()), False)
        assert ok and "\"a\"" in text
        assert _ask(ours, "ingest", ([row_values(task("b"))],), True) == (True, None)
    finally:
        ours.close()
        server.join(10)
    assert not server.is_alive(), "serve() did not return when the worker's end closed"
    kinds = ["FULL" if "synchronous = FULL" in t else "NORMAL" if "synchronous = NORMAL" in t else t.split()[0]
             for t in traced if "synchronous" in t or t.startswith(("INSERT", "UPDATE"))]
    # PRAGMAS set FULL on open; the claim needs NORMAL; the second ingest must switch back first
    assert kinds[-5:] == ["INSERT", "NORMAL", "UPDATE", "FULL", "INSERT"], kinds


async def _create(path: Path) -> None:
    async with Journal.open(path):
        pass


def _ask(sock: socket.socket, op: str, args: tuple[Any, ...], durable: bool) -> Any:
    data = pickle.dumps((op, args, durable))
    sock.sendall(len(data).to_bytes(4, "little") + data)
    stream = sock.makefile("rb")
    size = int.from_bytes(stream.read(4), "little")
    return pickle.loads(stream.read(size))
