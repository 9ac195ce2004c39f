"""One worker per journal: an advisory lock file beside it.

The worker holds `<journal>.lock` (flock, released by the kernel even on
kill -9) for as long as it runs. A second worker on the same file, or an
operation that would fight a running worker (`wal drain`, `wal recover
--stale-after`), finds it taken and refuses with the holder's pid.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ecoworker.errors import JournalError


class JournalLock:
    """`with JournalLock(path, "why it matters")`: exclusive use of a journal file."""

    def __init__(self, journal: Path, purpose: str) -> None:
        self.path = journal.with_name(journal.name + ".lock")
        self.purpose = purpose
        self._fd: int | None = None

    def __enter__(self) -> JournalLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise JournalError(f"journal {self.path.with_suffix('')} is in use by a running worker "
                               f"(pid {holder}); {self.purpose}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None
