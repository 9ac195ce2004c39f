"""The journal's hot writes in a child process, which has its own GIL.

In one process, SQLite's thread gives the GIL back around every SQLite call and
then waits to take it again from the busy event loop: in a 20,000-task profile
it spent 3.8 s in jobs for 1.1 s of CPU. Here ingest, claim, finish and mark
synced run in `python -m ecoworker.writerchild`, a plain blocking loop on its own
connection, while the event loop only sends requests and reads replies.

Nothing about durability changes: the child runs the very statements the
in-thread path runs (`ecoworker.journal_sql`), one request at a
time, and a reply is sent only after COMMIT returned. Requests and replies are
length-prefixed pickles on a socketpair (only the worker and its child hold the
two ends).

Lifetimes: the child ignores SIGINT and SIGTERM, so a terminal's Ctrl-C or a
signal to the process group leaves the worker's graceful shutdown its journal.
It exits when the worker closes its end, and when the worker dies: even after
`kill -9` the kernel closes the socket, and the child's next read sees the end.
If the child dies, the write in flight fails with `JournalError` (the caller
handles it like any failed write: an ingest nacks its deliveries back) and the
next write starts a new child.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from ecoworker.errors import JournalError
from ecoworker.writerchild import HEADER, LEFT_TO_THE_WORKER, READY

log = logging.getLogger("ecoworker.journal")
STOP_SECONDS = 10.0  # a closing worker waits this long for its child to finish the write in hand


class WriterProcess:
    """The worker's side: starts the child and sends it one request at a time.

    Callers serialise `call` (the journal's write lock does): requests and replies are not
    tagged, so a second concurrent call would read the first one's reply."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ready = False  # the child said it has the journal open
        # the exchange of a caller that was cancelled while the child worked: its reply comes
        # first, so the next call waits for it (the write itself may well be committed)
        self._orphan: asyncio.Future[tuple[bool, Any]] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the child; it opens the journal while the worker goes on (it is already
        migrated). The first `call` waits for it."""
        self._proc, mine = self._spawn()
        self._reader, self._writer = await asyncio.open_connection(sock=mine)
        self._ready = False

    async def ready(self) -> None:
        """Wait until the child has the journal open (Python's start-up and imports, about 0.1 s:
        the worker awaits this once it has connected to the broker, so the two overlap)."""
        if self._writer is None or self._writer.is_closing():
            await self.start()
        if self._ready:
            return
        assert self._reader is not None
        try:
            await self._reader.readexactly(len(READY))
        except (OSError, asyncio.IncompleteReadError) as exc:
            code = await self._reap()
            raise JournalError(f"journal {self.path}: its writer process ended ({_exit(code)}) while "
                               "starting; see the lines above for why") from exc
        self._ready = True

    def _spawn(self) -> tuple[subprocess.Popen[bytes], socket.socket]:
        """The child and our end of its socket (a fork and exec: quick enough for the loop)."""
        mine, theirs = socket.socketpair()
        # the child starts with SIGINT and SIGTERM blocked (a mask survives exec), so one that
        # arrives before it has ignored them cannot kill it; this thread's mask comes back at once
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, LEFT_TO_THE_WORKER)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ecoworker.writerchild", str(self.path), str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except OSError as exc:
            mine.close()
            raise JournalError(f"journal {self.path}: cannot start its writer process ({exc})") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            theirs.close()
        return proc, mine

    async def call(self, op: str, args: tuple[Any, ...], durable: bool) -> Any:
        """Run journal job `op` with `args` in the child, committed at synchronous=FULL when
        `durable`; its result, or the exception it raised, raised here."""
        await self._settle_orphan()
        await self.ready()
        data = pickle.dumps((op, args, durable), protocol=pickle.HIGHEST_PROTOCOL)
        # a request and its reply are one task: a cancelled caller must not leave a reply behind
        # for the next call to read as its own
        exchange = asyncio.ensure_future(self._exchange(op, data))
        try:
            ok, value = await asyncio.shield(exchange)
        except asyncio.CancelledError:
            if not exchange.done():
                self._orphan = exchange
                exchange.add_done_callback(_retrieve)
            raise
        if not ok:
            raise value
        return value

    async def _exchange(self, op: str, data: bytes) -> tuple[bool, Any]:
        assert self._reader is not None and self._writer is not None
        try:
            self._writer.write(len(data).to_bytes(HEADER, "little") + data)
            size = int.from_bytes(await self._reader.readexactly(HEADER), "little")
            reply: tuple[bool, Any] = pickle.loads(await self._reader.readexactly(size))
            return reply
        except (OSError, asyncio.IncompleteReadError) as exc:
            code = await self._reap()
            raise JournalError(
                f"journal {self.path}: its writer process ended ({_exit(code)}) during a {op}; that "
                "write may or may not be committed, and the next write starts a new writer process"
            ) from exc

    async def close(self) -> None:
        """Close our end: the child finishes the write in hand, if any, and exits."""
        await self._settle_orphan()
        await self._reap()

    async def _settle_orphan(self) -> None:
        if self._orphan is not None:
            await asyncio.wait([self._orphan])
            self._orphan = None

    async def _reap(self) -> int | None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            return await asyncio.to_thread(proc.wait, STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.error("the journal's writer process %d did not exit within %.0fs of being closed: killed",
                      proc.pid, STOP_SECONDS)
            proc.kill()
            return await asyncio.to_thread(proc.wait)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # nobody awaits an orphan's outcome: do not log it as never retrieved


def _exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
