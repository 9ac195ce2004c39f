"""Child process of test_journal_crash: ingest batches until killed, reporting each one.

Run as ``python -m tests.journal_crash_child DB_PATH ROUND`` from the repository root.
Protocol on stdout, one flushed line each:

* ``ready`` once the journal is open;
* ``begin KEY SIZE`` before a batch of SIZE rows with ids ``KEY-0`` … ``KEY-(SIZE-1)`` is ingested;
* ``done ID ID …`` only after ``Journal.ingest`` returned for that batch;
* ``error …`` if ingest did not report exactly the batch's ids as new (then it exits 1).

The parent kills it with SIGKILL at a random moment, so any line may be the last.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time

from ecoworker.journal import Journal, NewTask


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def ingest_forever(path: str, round_no: str) -> int:
    rng = random.Random(os.getpid())
    async with Journal.open(path) as journal:
        say("ready")
        batch = 0
        while True:
            key = f"r{round_no}-b{batch}"
            size = rng.randint(1, 300)
            now = time.time()
            # a varying payload makes the WAL grow past wal_autocheckpoint, so kills also land mid-checkpoint
            rows = [
                NewTask(f"{key}-{i}", "crash.test", f"child-{os.getpid()}", "crash", f'["{"x" * rng.randint(0, 400)}"]',
                        "{}", created_at=now, not_before=now)
                for i in range(size)
            ]
            say(f"begin {key} {size}")
            new = await journal.ingest(rows)
            if new != {r.task_id for r in rows}:
                say(f"error {key}: ingest reported {len(new)} new ids for a batch of {size} unique ids")
                return 1
            say("done " + " ".join(r.task_id for r in rows))
            batch += 1


if __name__ == "__main__":
    sys.exit(asyncio.run(ingest_forever(sys.argv[1], sys.argv[2])))
