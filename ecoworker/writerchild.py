"""The journal's writer process itself: `python -m ecoworker.writerchild JOURNAL FD`.

A plain blocking loop on one sqlite3 connection: read a request from the socket
FD, run the named job from `ecoworker.journal_sql.PROCESS_JOBS`, send back its
result or the exception it raised. See `ecoworker.writer` for why it exists and
for the worker's side. It imports no asyncio, so it is ready about 0.05 s after
it is started.
"""

from __future__ import annotations

import pickle
import signal
import socket
import sqlite3
import sys

from ecoworker.errors import JournalError
from ecoworker.journal_sql import PROCESS_JOBS
from ecoworker.schema import PRAGMAS

HEADER = 4  # little-endian length of the pickle that follows
# The child's page cache, KiB. Its statements touch the newest rows and the small
# partial indexes; the OS page cache holds the rest. 2 MB (SQLite's default) instead
# of the journal's 16 MB kept its peak about 3 MB lower at the same rate in a 20,000-task
# flood (the pod's memory target counts the child with the worker).
CACHE_KIB = 2000
READY = b"R"  # the child's first byte: the journal is open
LEFT_TO_THE_WORKER = {signal.SIGINT, signal.SIGTERM}


def serve(path: str, sock: socket.socket) -> None:
    """Answer requests until the worker's end closes."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in PRAGMAS:
        db.execute(pragma)
    db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    db.execute("PRAGMA busy_timeout = 5000")  # the worker's own connection or `ecoworker wal` may write
    mode = "FULL"
    sock.sendall(READY)
    stream = sock.makefile("rb")
    while True:
        header = stream.read(HEADER)
        if len(header) < HEADER:
            return  # the worker closed its end, or died
        op, args, durable = pickle.loads(stream.read(int.from_bytes(header, "little")))
        try:
            want = "FULL" if durable else "NORMAL"  # ingest, which every ack waits on: FULL
            if mode != want:
                db.execute(f"PRAGMA synchronous = {want}")
                mode = want
            reply = (True, PROCESS_JOBS[op](db, *args))
        except Exception as exc:  # raised again in the worker
            reply = (False, exc)
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an exception that does not pickle: its text still goes back
            data = pickle.dumps((False, JournalError(f"{op} failed: {reply[1]!r} ({exc})")))
        try:
            sock.sendall(len(data).to_bytes(HEADER, "little") + data)
        except OSError:
            return  # the worker is gone


def main() -> None:
    for signum in LEFT_TO_THE_WORKER:  # the worker decides when we stop: it closes our socket
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, LEFT_TO_THE_WORKER)  # blocked by the worker till now
    path, fd = sys.argv[1], int(sys.argv[2])
    serve(path, socket.socket(fileno=fd))


if __name__ == "__main__":
    main()
