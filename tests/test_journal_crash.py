"""kill -9 against a real process ingesting into the journal: what ingest reported is on disk."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ecoworker.journal import Journal

REPO_ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 9
READY_TIMEOUT_S = 30.0

pytestmark = pytest.mark.timeout(180)


@dataclass
class Round:
    """What one child printed before it was killed."""

    number: int
    acked: set[str] = field(default_factory=set)  # ids of batches whose ingest had returned
    in_flight: tuple[str, int] | None = None  # (key, size) of the batch ingest had not returned for
    errors: list[str] = field(default_factory=list)
    returncode: int | None = None
    stderr: str = ""


def parse(rnd: Round, lines: list[bytes]) -> None:
    """Fold the child's complete lines into `rnd` (a torn last line, cut by the kill, is ignored)."""
    for raw in lines:
        if not raw.endswith(b"\n"):
            continue
        word, _, rest = raw.decode().strip().partition(" ")
        if word == "begin":
            key, size = rest.split()
            rnd.in_flight = (key, int(size))
        elif word == "done":
            rnd.acked.update(rest.split())
            rnd.in_flight = None
        elif word == "error":
            rnd.errors.append(rest)


async def run_round(db: Path, number: int, rng: random.Random) -> Round:
    """Start a child on `db`, let it ingest for 0.05-0.6 s after it is ready, then SIGKILL it."""
    rnd = Round(number)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.journal_crash_child", str(db), str(number),
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[bytes] = []
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
        assert first == b"ready\n", f"round {number}: child did not get ready: {first!r}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + rng.uniform(0.05, 0.6)
        while (left := deadline - loop.time()) > 0:
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), left)
            except TimeoutError:
                break
            if not line:
                break  # the child exited by itself: returncode below tells
            lines.append(line)
    finally:
        if proc.returncode is None:
            proc.kill()
        rnd.returncode = await proc.wait()
    lines.extend((await proc.stdout.read()).splitlines(keepends=True))
    rnd.stderr = (await proc.stderr.read()).decode(errors="replace")
    parse(rnd, lines)
    return rnd


async def test_kill_9_loses_no_acknowledged_ingest(tmp_path: Path) -> None:
    """After repeated kill -9 mid-ingest, every batch ingest returned for is on disk, once, and the file is intact."""
    db = tmp_path / "journal.db"
    rng = random.Random()
    rounds = [await run_round(db, n, rng) for n in range(ROUNDS)]

    for rnd in rounds:
        assert rnd.errors == [], f"round {rnd.number}: {rnd.errors}"
        assert rnd.returncode == -signal.SIGKILL, f"round {rnd.number} exited {rnd.returncode}:\n{rnd.stderr}"
    acked = set().union(*(r.acked for r in rounds))
    killed_mid_batch = [r.in_flight for r in rounds if r.in_flight is not None]
    assert sum(1 for r in rounds if r.acked) >= ROUNDS // 2, "too few rounds got a batch in before the kill"

    async with Journal.open(db) as journal:
        reader = await journal.reader()
        assert [tuple(r) for r in await reader.execute_fetchall("PRAGMA integrity_check")] == [("ok",)]
        stored = [r[0] for r in await reader.execute_fetchall("SELECT task_id FROM task_wal")]
        in_flight_counts = {
            key: list(await reader.execute_fetchall(
                "SELECT count(*) FROM task_wal WHERE task_id LIKE ? || '-%'", (key,)))[0][0]
            for key, _size in killed_mid_batch
        }

    assert len(stored) == len(set(stored)), "an id is stored twice"
    missing = acked - set(stored)
    assert not missing, f"{len(missing)} acknowledged ids lost, e.g. {sorted(missing)[:5]}"
    # a batch cut by the kill is all-or-nothing: one transaction
    for key, size in killed_mid_batch:
        assert in_flight_counts[key] in (0, size), f"batch {key} is torn: {in_flight_counts[key]} of {size} rows"
    unexplained = set(stored) - acked - {
        f"{key}-{i}" for key, size in killed_mid_batch if in_flight_counts[key] == size for i in range(size)
    }
    assert not unexplained, f"rows nobody ingested: {sorted(unexplained)[:5]}"
