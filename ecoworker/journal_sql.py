"""The journal's statements and the jobs that run them, on a plain sqlite3 connection.

`ecoworker.journal` runs these jobs in SQLite's thread; the writer process
(`ecoworker.writerchild`) runs the same ones on its own connection. This module
imports no asyncio and no aiosqlite, so that process starts in a few tens of
milliseconds.
"""

from __future__ import annotations

import pickle
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache, partial
from itertools import chain
from operator import attrgetter
from typing import Any, Protocol, TypeVar

from ecoworker import schema
from ecoworker.schema import TERMINAL_SQL

T = TypeVar("T")

# A redelivered id is a duplicate and changes nothing, unless it is a `dlq replay` of a
# finished row (a higher `replays`) or a task `wal drain` handed off: then the row starts
# over from the new delivery.
_REPLAY_UPSERT = " ON CONFLICT (task_id) DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in schema.INGEST_COLUMNS if c != "task_id"
) + (", result = NULL, synced_to_postgres = 0, sync_error = NULL "
     f"WHERE (excluded.replays > task_wal.replays AND task_wal.status IN {TERMINAL_SQL}) "
     # a task `wal drain` handed back to the broker may come back here: run it
     "OR task_wal.status = 'HANDED_OFF'")
#: what the sink ships of a row, in this order (`unsynced_page` tuples, the staging table)
UNSYNCED_COLUMNS = ("task_id", "task_name", "queue", "worker_name", "status", "args", "kwargs",
                    "result", "error", "attempts", "created_at", "started_at", "completed_at")
_COMPLETED_AT = UNSYNCED_COLUMNS.index("completed_at")
# a claim's rows as one JSON text (see `claim`); REALs as printf('%!.17g') text, which reads back
# bit-exact, where SQLite 3.40's JSON keeps 15 digits
_CLAIM_JSON = (
    "json_group_array(json_array(rowid, task_id, task_name, queue, args, kwargs, attempts + 1, max_retries, "
    "iif(timeout IS NULL, NULL, printf('%!.17g', timeout)), "
    "iif(expires_at IS NULL, NULL, printf('%!.17g', expires_at)), retry_count))"
)
# … and the rows of that text, by rowid (its first element), moved to RUNNING
_CLAIM_UPDATE = ("UPDATE task_wal SET status = 'RUNNING', attempts = attempts + 1, started_at = ? "
                 "WHERE rowid IN (SELECT json_extract(value, '$[0]') FROM json_each(?))")


@dataclass(slots=True)
class NewTask:
    """One row for `Journal.ingest`, in `schema.INGEST_COLUMNS` order."""

    task_id: str
    task_name: str
    worker_name: str
    queue: str | None
    args: str  # JSON text
    kwargs: str  # JSON text
    status: str = "PENDING"
    error: str | None = None
    retry_count: int = 0
    attempts: int = 0
    max_retries: int | None = None
    created_at: float = 0.0
    completed_at: float | None = None
    not_before: float | None = None
    expires_at: float | None = None
    timeout: float | None = None
    dl_state: int = 0
    raw_body: bytes | None = None
    raw_headers: str | None = None
    replays: int = 0  # `dlq replay` count: a higher one revives a finished row
    started_at: float | None = None  # set when the row is journaled straight as RUNNING (see `started`)

    def started(self, now: float) -> ClaimedTask:
        """Journal this row as already claimed (RUNNING, first attempt): one write instead of
        ingest + claim. The scheduler runs the returned task once `ingest` reports the row new."""
        self.status, self.attempts, self.started_at = "RUNNING", 1, now
        return ClaimedTask(self.task_id, self.task_name, self.queue, self.args, self.kwargs, 1,
                           self.max_retries, self.timeout, self.expires_at, self.retry_count)


_NEW_TASK_FIELDS = tuple(f.name for f in fields(NewTask))
assert _NEW_TASK_FIELDS == schema.INGEST_COLUMNS
# Most deliveries leave these columns at their table defaults (no error, no expiry, no time
# limit, nothing kept raw). Such "lean" rows are inserted naming only the other columns and
# SQLite fills in the defaults: each bound value costs, and a lean row binds 12 instead of 21
# (the multi-row INSERT took 40 % less CPU). The values must equal the schema's defaults.
_DEFAULTED = {"error": None, "retry_count": 0, "completed_at": None, "expires_at": None, "timeout": None,
              "dl_state": 0, "raw_body": None, "raw_headers": None, "replays": 0}
LEAN_COLUMNS = tuple(c for c in schema.INGEST_COLUMNS if c not in _DEFAULTED)
_defaulted_values = attrgetter(*_DEFAULTED)
_DEFAULT_VALUES = tuple(_DEFAULTED.values())
row_values = attrgetter(*_NEW_TASK_FIELDS)  # a row's values as a tuple, in C
_lean_values = attrgetter(*LEAN_COLUMNS)


class _HasTaskId(Protocol):
    @property
    def task_id(self) -> str: ...


_WithId = TypeVar("_WithId", bound=_HasTaskId)


def first_per_id(items: Sequence[_WithId]) -> Sequence[_WithId]:
    """`items` without the later ones of a repeated task id (most batches have none)."""
    if len({item.task_id for item in items}) == len(items):
        return items
    seen: set[str] = set()
    first = []
    for item in items:
        if item.task_id not in seen:
            seen.add(item.task_id)
            first.append(item)
    return first


def is_lean(row: NewTask) -> bool:
    return _defaulted_values(row) == _DEFAULT_VALUES


def _by_shape(rows: Sequence[NewTask]) -> list[tuple[list[NewTask], bool]]:
    """The non-empty parts of `rows` as (rows, lean), full rows first; each row checked once."""
    lean: list[NewTask] = []
    full: list[NewTask] = []
    for row in rows:
        (lean if is_lean(row) else full).append(row)
    return [(part, is_lean) for part, is_lean in ((full, False), (lean, True)) if part]


def ingest_statements(rows: Sequence[NewTask], returning: bool = False) -> list[tuple[str, list[Any], int]]:
    """(sql, params, row count) for `rows`: lean rows and full rows apart, each cut into pieces
    of power-of-two sizes, largest first (500 rows: 256 + 128 + 64 + 32 + 16 + 4).

    One statement per batch size would compile a new statement for each size seen, and keep up
    to the connection's 128 cached: 2.5 ms to compile a 450-row one, and 128 of them held 80 MB.
    At most 10 sizes per shape stay compiled instead."""
    parts = _by_shape(rows)
    if len(parts) > 1:  # shapes are inserted apart: the first copy of an id wins, as in one statement
        parts = _by_shape(first_per_id(rows))
    statements = []
    for part, is_lean in parts:
        values = _lean_values if is_lean else row_values
        start = 0
        while start < len(part):
            size = 1 << (len(part) - start).bit_length() - 1
            piece = part[start:start + size]
            statements.append((_ingest_sql(size, is_lean, returning),
                               list(chain.from_iterable(map(values, piece))), size))
            start += size
    return statements


@lru_cache(maxsize=32)
def _ingest_sql(n: int, lean: bool = False, returning: bool = False) -> str:
    """The multi-row ingest statement for `n` rows (one text per batch size and shape), with
    `RETURNING task_id` for the batches that hold an id the journal already has."""
    columns = LEAN_COLUMNS if lean else schema.INGEST_COLUMNS
    return (f"INSERT INTO task_wal ({', '.join(columns)}) VALUES {_placeholders(n, len(columns))}"
            + _REPLAY_UPSERT  # `excluded` holds the filled-in defaults, so the upsert is the same
            + (" RETURNING task_id" if returning else ""))


class _KnownId(Exception):
    """The batch holds an id the journal already has: run it again with RETURNING."""


def ingest_job(db: sqlite3.Connection, rows: Sequence[NewTask],
                statements: Sequence[tuple[str, list[Any], int]]) -> set[str] | None:
    """Run the ingest statements in one transaction. None when every row was written (the usual
    batch: no id seen before); otherwise the ids written, from the batch run again with RETURNING.

    A RETURNING row is one sqlite3_step, and each step gives the GIL back and waits to take it
    again from the busy event loop: a 500-row batch paid that 500 times. Counting changes costs
    nothing, and a batch with a known id (a redelivery) is rare."""

    def insert(db: sqlite3.Connection) -> None:
        before = db.total_changes
        _run_all(db, [(sql, params) for sql, params, _ in statements])
        if db.total_changes - before != sum(count for _, _, count in statements):
            raise _KnownId  # rolled back by in_transaction

    try:
        in_transaction(db, insert)
        return None
    except _KnownId:
        again = [(sql, params) for sql, params, _ in ingest_statements(rows, returning=True)]
        return {r[0] for r in in_transaction(db, partial(_run_all, statements=again))}


def ingest_tuples(db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> set[str] | None:
    """`ingest_job` for rows sent as tuples of their fields (the writer process's form: a
    tuple pickles 3.5x faster than the dataclass)."""
    tasks = [NewTask(*row) for row in rows]
    return ingest_job(db, tasks, ingest_statements(tasks))


def claim_text(db: sqlite3.Connection, now: float, limit: int, excluded: Sequence[str]) -> str:
    """Move up to `limit` due PENDING rows to RUNNING in one transaction; the rows as JSON text
    (see `Journal.claim`)."""
    skip = f"AND task_name NOT IN ({', '.join('?' * len(excluded))})" if excluded else ""
    pick = (f"SELECT {_CLAIM_JSON} FROM (SELECT rowid, * FROM task_wal WHERE status = 'PENDING' "
            f"AND not_before <= ? {skip} ORDER BY not_before LIMIT ?)")

    def job(db: sqlite3.Connection) -> str:
        (text,) = db.execute(pick, [now, *excluded, limit]).fetchone()
        if text != "[]":
            db.execute(_CLAIM_UPDATE, (now, text))
        return str(text)

    return in_transaction(db, job)


def _placeholders(rows: int, width: int) -> str:
    """`(?, ?), (?, ?)` for a multi-row VALUES list."""
    return ", ".join(["(" + ", ".join("?" * width) + ")"] * rows)


def values_chunks(rows: Sequence[tuple[Any, ...]], width: int, chunk: int) -> list[tuple[int, list[Any]]]:
    """`rows` (tuples of `width` values) for `WITH v(…) AS (VALUES …) UPDATE … FROM v` statements,
    `chunk` (a power of two) at a time: (rows in the statement, flat params). A short chunk is
    padded with NULL rows, which join nothing, up to a power of two, so a few statement texts
    cover every size and stay compiled in the connection's cache."""
    chunks = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        size = 1 << (len(part) - 1).bit_length()
        params = list(chain.from_iterable(part))
        params += [None] * (width * (size - len(part)))
        chunks.append((size, params))
    return chunks


FINISH_CHUNK = 256  # outcomes per UPDATE statement
_FINISH_COLUMNS = {  # the VALUES columns of each shape, and what the UPDATE sets from them
    True: (("task_id", "result", "completed_at"),
           "status = 'SUCCESS', result = o.result, error = NULL, completed_at = o.completed_at"),
    False: (("task_id", "status", "result", "error", "completed_at", "not_before", "retry_inc",
             "attempts_inc", "dl_state"),
            "status = o.status, result = o.result, error = o.error, completed_at = o.completed_at, "
            "not_before = COALESCE(o.not_before, task_wal.not_before), "
            "retry_count = task_wal.retry_count + o.retry_inc, "
            "attempts = task_wal.attempts + o.attempts_inc, dl_state = MAX(task_wal.dl_state, o.dl_state)"),
}
_finish_values = {lean: attrgetter(*columns) for lean, (columns, _) in _FINISH_COLUMNS.items()}


def is_plain_success(o: Outcome) -> bool:
    return (o.status == "SUCCESS" and o.error is None and o.not_before is None and not o.retry_inc
            and not o.attempts_inc and not o.dl_state)


@lru_cache(maxsize=32)
def _finish_sql(n: int, lean: bool) -> str:
    """One UPDATE for `n` outcomes of a shape, joined on task_id; only RUNNING rows change."""
    columns, assignments = _FINISH_COLUMNS[lean]
    return (f"WITH o({', '.join(columns)}) AS (VALUES {_placeholders(n, len(columns))}) "
            f"UPDATE task_wal SET {assignments} FROM o "
            "WHERE task_wal.task_id = o.task_id AND task_wal.status = 'RUNNING'")


def finish_statements(outcomes: Sequence[Outcome], lean: bool) -> list[tuple[str, list[Any]]]:
    width = len(_FINISH_COLUMNS[lean][0])
    rows = list(map(_finish_values[lean], outcomes))
    return [(_finish_sql(size, lean), params) for size, params in values_chunks(rows, width, FINISH_CHUNK)]


MARK_CHUNK = 1024  # shipped rows per mark-synced statement


@lru_cache(maxsize=16)
def mark_synced_sql(n: int) -> str:
    """Mark `n` shipped rows synced, each only if it is unchanged since it was read (the same
    completed_at, bound as a value so the IS guard is bit-exact)."""
    return (f"WITH shipped(task_id, completed_at) AS (VALUES {_placeholders(n, 2)}) "
            "UPDATE task_wal SET synced_to_postgres = 1 FROM shipped WHERE task_wal.task_id = "
            "shipped.task_id AND task_wal.completed_at IS shipped.completed_at")


def _run_all(db: sqlite3.Connection, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
    """Execute each (sql, params) in order; the rows they return (RETURNING), all together."""
    return [row for sql, params in statements for row in db.execute(sql, params).fetchall()]


@dataclass(frozen=True, slots=True)
class ClaimedTask:
    """A row the scheduler moved to RUNNING (attempts already incremented and committed)."""

    task_id: str
    task_name: str
    queue: str | None
    args: str
    kwargs: str
    attempts: int
    max_retries: int | None
    timeout: float | None
    expires_at: float | None
    retry_count: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """A state change for one RUNNING row, applied by `Journal.finish` in batches."""

    task_id: str
    status: str  # SUCCESS | FAILURE | EXPIRED | DEAD | PENDING (retry or release)
    result: str | None = None  # JSON text
    error: str | None = None
    completed_at: float | None = None
    not_before: float | None = None
    retry_inc: int = 0
    attempts_inc: int = 0  # -1 when a shutdown hands the task back unrun
    dl_state: int = 0


def atomically(db: sqlite3.Connection, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
    """`_run_all` as one transaction. A lone statement runs in autocommit mode, which is its own
    transaction: BEGIN and COMMIT would be two more SQLite calls, each giving the GIL back and
    waiting to take it from the event loop again."""
    if len(statements) == 1:
        return _run_all(db, statements)
    return in_transaction(db, partial(_run_all, statements=statements))


Cursor = tuple[float | None, int] | None
Page = tuple[list[tuple[Any, ...]], Cursor]
PACK_ROWS = 500  # rows per pickle in a packed page


def read_unsynced_page(db: sqlite3.Connection, sql: str, params: Sequence[Any], limit: int) -> Page:
    """Run `Journal.unsynced_page`'s query: the rows, and the cursor after the last one."""
    chunks, after = _read_page(db, sql, params, limit, lambda rows: rows)
    return [row for chunk in chunks for row in chunk], after


def read_unsynced_packed(db: sqlite3.Connection, sql: str, params: Sequence[Any],
                         limit: int) -> tuple[list[bytes], Cursor]:
    """`read_unsynced_page` for the writer process: the rows as pickles of PACK_ROWS rows each
    (`unpack` reads them), so the child never holds a whole page of row objects. Read whole,
    5,000 rows were 6 MB of the child's peak memory."""
    return _read_page(db, sql, params, limit, lambda rows: pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL))


def unpack(packs: Sequence[bytes]) -> list[tuple[Any, ...]]:
    """The rows of `read_unsynced_packed`'s pickles, in order."""
    return [row for pack in packs for row in pickle.loads(pack)]


def _read_page(db: sqlite3.Connection, sql: str, params: Sequence[Any], limit: int,
               keep: Callable[[list[tuple[Any, ...]]], T]) -> tuple[list[T], Cursor]:
    cursor = db.cursor()
    cursor.row_factory = None  # tuples, not Row objects the caller would copy again
    cursor.execute("BEGIN")  # the page and its last row's rowid from one snapshot
    try:
        cursor.execute(sql, [*params, limit])
        kept: list[T] = []
        count, last = 0, None
        while rows := cursor.fetchmany(PACK_ROWS):
            kept.append(keep(rows))
            count, last = count + len(rows), rows[-1]
        if count < limit or last is None:
            return kept, None
        (rowid,) = cursor.execute("SELECT rowid FROM task_wal WHERE task_id = ?", (last[0],)).fetchone()
        return kept, (last[_COMPLETED_AT], rowid)
    finally:
        cursor.execute("COMMIT")


# The jobs the writer process may run, by name: module-level, so the child reaches them by
# importing this module, and each takes only values that pickle.
PROCESS_JOBS: dict[str, Callable[..., Any]] = {"ingest": ingest_tuples, "claim": claim_text,
                                                "atomically": atomically, "unsynced": read_unsynced_packed}


def in_transaction(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
        db.execute("COMMIT")
        return result
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
