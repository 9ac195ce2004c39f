"""Sink drain rate: the real Sink (staging COPY + upsert) against one INSERT … ON CONFLICT per row.

    python -m bench.bench_sink [--rows 100000] [--baseline-rows 5000] [--repeat 5] [--json PATH]

A journal holding `--rows` terminal, unsynced rows is built once in a scratch
directory under the repo (`.bench-tmp/`, removed afterwards) and copied for
every trial, so each trial starts from the same file. Each trial drains into a
freshly created, migrated PostgreSQL database (dropped after) on the server of
$POSTGRES_DSN, or of the local stack's env file (/tmp/ecoworker-stack/env).

(a) `Sink.sync_all()` with the default settings (5,000-row batches, a pool of
    2), timed end to end: journal reads, COPY into the staging table, upsert,
    commit, mark synced in the journal, plus opening its connection pool. The
    sink pipelines these, so each phase's busy time per batch is reported too;
    they overlap, so they add up to more than the wall time per batch.
(b) the baseline a row-at-a-time shipper pays: the same journal read, then one
    autocommitted `INSERT … ON CONFLICT` per row with asyncpg `execute`, then
    one mark-synced transaction — on `--baseline-rows` rows to keep it short.
(c) PostgreSQL's side alone, the ceiling (a) can approach on this machine: the
    same 5,000-row batches, read from the journal beforehand, shipped by the
    sink's own COPY + INSERT transaction on as many connections as its pool,
    with no journal reads or marks and nothing else running.

The two alternate, `--repeat` rounds of one each, so that the machine's load
bursts hit both alike; the figures are medians and the ratio is of medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from ecoworker import pgschema
from ecoworker.journal import Journal, NewTask
from ecoworker.settings import SinkSettings
from ecoworker.sink import NEWER_WINS, Sink

REPO = Path(__file__).resolve().parents[1]
SCRATCH_ROOT = REPO / ".bench-tmp"
STACK_ENV = Path(os.environ.get("ECOWORKER_STACK_DIR") or "/tmp/ecoworker-stack") / "env"
INGEST_BATCH = 500
BASELINE_UPSERT = """
INSERT INTO task_results AS t (task_id, task_name, queue, worker_name, status, args, kwargs, result, error,
    attempts, created_at, started_at, completed_at, synced_at)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8::jsonb, $9, $10, to_timestamp($11), to_timestamp($12),
    to_timestamp($13), now())
""" + NEWER_WINS


# ---------------------------------------------------------------- setup

def admin_dsn() -> str:
    """$POSTGRES_DSN, else the one the local stack wrote to its env file."""
    if os.environ.get("POSTGRES_DSN"):
        return os.environ["POSTGRES_DSN"]
    try:
        for line in STACK_ENV.read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            if key.strip() == "POSTGRES_DSN":
                return value.strip()
    except OSError:
        pass
    raise SystemExit(f"no PostgreSQL: set POSTGRES_DSN or start the stack ({STACK_ENV} not found)")


@asynccontextmanager
async def fresh_database(admin: str) -> AsyncIterator[str]:
    """A new database migrated to pgschema.LATEST; dropped on the way out."""
    name = f"ecoworker_bench_sink_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        dsn = urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))
        try:
            target = await asyncpg.connect(dsn)
            try:
                await pgschema.migrate(target)
            finally:
                await target.close()
            yield dsn
        finally:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def build_journal(path: Path, rows: int) -> None:
    """`rows` SUCCESS rows shaped like image uploads, unsynced, ingested 500 per commit."""
    now = time.time()
    kwargs = orjson.dumps({"bucket": "ecoworker-uploads", "content_type": "image/jpeg", "sizes": [256, 1024]})
    async with Journal.open(path) as journal:
        for start in range(0, rows, INGEST_BATCH):
            await journal.ingest([
                NewTask(f"bench-{i:08d}", "process_image", "bench-worker", "storage",
                        orjson.dumps([f"s3://ecoworker-uploads/raw/{i:08d}.jpg"]).decode(), kwargs.decode(),
                        status="SUCCESS", attempts=1, created_at=now + i * 1e-3, completed_at=now + i * 1e-3 + 0.5)
                for i in range(start, min(rows, start + INGEST_BATCH))
            ])
        await journal.checkpoint("TRUNCATE")  # one self-contained file to copy per trial
    # ingest cannot write results or start times: fill them in one statement, as a handler's output
    con = sqlite3.connect(path)
    try:
        con.execute("UPDATE task_wal SET started_at = created_at + 0.05, result = json_object("
                    "'variants', json_array('images/' || task_id || '-256.webp', 'images/' || task_id || "
                    "'-1024.webp'), 'width', 1024, 'height', 768, 'bytes', 183211)")
        con.commit()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()


def copy_journal(template: Path, target: Path) -> Path:
    shutil.copyfile(template, target)
    return target


def remove_journal(path: Path) -> None:
    for leftover in path.parent.glob(path.name + "*"):
        leftover.unlink()


# ---------------------------------------------------------------- trials

PHASES = ("journal_read", "copy", "upsert", "commit", "mark_synced")


class Timings:
    """Busy seconds of each call, per phase: the sink's calls into the journal and PostgreSQL."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {phase: [] for phase in PHASES}

    @asynccontextmanager
    async def timed(self, phase: str) -> AsyncIterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.calls[phase].append(time.perf_counter() - start)


class TimedJournal(Journal):
    """The real journal, timing the sink's two calls into it."""

    timings = Timings()

    async def unsynced_page(self, limit: int, after: Any = None) -> Any:
        async with self.timings.timed("journal_read"):
            return await super().unsynced_page(limit, after)

    async def mark_synced(self, task_ids: Any, *args: Any) -> None:
        async with self.timings.timed("mark_synced"):
            await super().mark_synced(task_ids, *args)


class TimedSink(Sink):
    """The real sink, timing its COPY, its upsert and (what is left of a batch's transaction) the commit."""

    timings = Timings()

    async def _copy(self, conn: Any, records: Any) -> None:
        async with self.timings.timed("copy"):
            await super()._copy(conn, records)

    async def _upsert(self, conn: Any) -> None:
        async with self.timings.timed("upsert"):
            await super()._upsert(conn)

    async def _write(self, conn: Any, records: Any) -> None:
        async with self.timings.timed("commit"):  # the whole transaction; the COPY and upsert come off below
            await super()._write(conn, records)


@dataclass
class SinkRun:
    seconds: float
    busy_s: dict[str, list[float]]  # per phase, one entry per call

    @property
    def batches(self) -> int:
        return len(self.busy_s["copy"])

    def per_batch_ms(self) -> dict[str, float]:
        """Median busy milliseconds of each phase for one batch."""
        return {phase: round(statistics.median(calls) * 1000, 1) if calls else 0.0
                for phase, calls in self.busy_s.items()}


async def run_sink(admin: str, journal_path: Path, rows: int) -> SinkRun:
    """Time Sink.sync_all() draining the journal into a fresh database."""
    timings = Timings()
    async with fresh_database(admin) as dsn, TimedJournal.open(journal_path) as journal:
        assert isinstance(journal, TimedJournal)
        journal.timings = timings
        sink = TimedSink(SinkSettings(dsn=dsn), journal)  # the defaults: 5,000-row batches, a pool of 2
        sink.timings = timings
        try:
            start = time.perf_counter()
            shipped = await sink.sync_all()
            seconds = time.perf_counter() - start
        finally:
            await sink.close()
        await check_drained(dsn, journal, shipped, rows)
    remove_journal(journal_path)
    busy = timings.calls
    busy["commit"] = [t - c - u for t, c, u in zip(busy["commit"], busy["copy"], busy["upsert"], strict=True)]
    return SinkRun(seconds, busy)


async def run_baseline(admin: str, journal_path: Path, rows: int) -> float:
    """Seconds to ship `rows` rows with one autocommitted INSERT … ON CONFLICT each."""
    async with fresh_database(admin) as dsn, Journal.open(journal_path) as journal:
        conn = await asyncpg.connect(dsn)
        try:
            start = time.perf_counter()
            batch, _ = await journal.unsynced_page(rows)  # tuples in UNSYNCED_COLUMNS order
            for r in batch:
                await conn.execute(BASELINE_UPSERT, *r)
            await journal.mark_synced([r[0] for r in batch])
            seconds = time.perf_counter() - start
        finally:
            await conn.close()
        await check_drained(dsn, journal, len(batch), rows, left=None)
    remove_journal(journal_path)
    return seconds


async def run_postgres_only(admin: str, journal_path: Path, rows: int) -> float:
    """Seconds for the sink's COPY + INSERT transactions alone to take every row, the batches
    read into memory first and shipped on `pool_size` connections at once."""
    settings = SinkSettings()
    async with Journal.open(journal_path) as journal, fresh_database(admin) as dsn:
        batches: list[list[tuple[Any, ...]]] = []
        after = None
        while True:
            page, after = await journal.unsynced_page(settings.batch_size, after)
            batches.extend([page] if page else [])
            if after is None or not page:
                break
        sink = Sink(replace(settings, dsn=dsn), journal)  # only its PostgreSQL side is used
        pool = await sink._ensure_pool()

        async def ship(queue: list[list[tuple[Any, ...]]]) -> None:
            async with pool.acquire() as conn:
                while queue:
                    await sink._write(conn, queue.pop())

        try:
            start = time.perf_counter()
            await asyncio.gather(*(ship(batches) for _ in range(settings.pool_size)))
            seconds = time.perf_counter() - start
            async with pool.acquire() as conn:
                in_pg = await conn.fetchval("SELECT count(*) FROM task_results")
        finally:
            await sink.close()
    remove_journal(journal_path)
    if in_pg != rows:
        raise SystemExit(f"drain check failed: {in_pg} rows in PostgreSQL, expected {rows}")
    return seconds


async def check_drained(dsn: str, journal: Journal, shipped: int, rows: int, left: int | None = 0) -> None:
    """Refuse a figure from a run that did not really ship everything it claims."""
    conn = await asyncpg.connect(dsn)
    try:
        in_pg = await conn.fetchval("SELECT count(*) FROM task_results")
    finally:
        await conn.close()
    unsynced = (await journal.counts())["unsynced"]
    if shipped != rows or in_pg != rows or (left is not None and unsynced != left):
        raise SystemExit(f"drain check failed: shipped {shipped}, in PostgreSQL {in_pg}, expected {rows}, "
                         f"{unsynced} left unsynced")


async def bench(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    admin = admin_dsn()
    load = os.getloadavg()
    template = scratch / "template.db"
    started = time.perf_counter()
    await build_journal(template, args.rows)
    print(f"built a journal of {args.rows:,} unsynced rows in {time.perf_counter() - started:.1f} s "
          f"({template.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)

    runs: list[SinkRun] = []
    baseline_seconds: list[float] = []
    pg_seconds: list[float] = []
    baseline_rows = min(args.baseline_rows, args.rows)
    for repeat in range(args.repeat):  # one of each per round: a burst of load hits both alike
        run = await run_sink(admin, copy_journal(template, scratch / f"sink-{repeat}.db"), args.rows)
        runs.append(run)
        split = ", ".join(f"{phase.replace('_', ' ')} {ms:.0f}" for phase, ms in run.per_batch_ms().items())
        print(f"  round {repeat + 1}: sink    {args.rows / run.seconds:>9,.0f} rows/s ({run.seconds:.2f} s, "
              f"{run.batches} batches; ms per batch: {split})", file=sys.stderr)
        seconds = await run_baseline(admin, copy_journal(template, scratch / f"baseline-{repeat}.db"), baseline_rows)
        baseline_seconds.append(seconds)
        print(f"  round {repeat + 1}: per-row {baseline_rows / seconds:>9,.0f} rows/s ({seconds:.2f} s)",
              file=sys.stderr)
        seconds = await run_postgres_only(admin, copy_journal(template, scratch / f"pg-{repeat}.db"), args.rows)
        pg_seconds.append(seconds)
        print(f"  round {repeat + 1}: PostgreSQL alone {args.rows / seconds:>9,.0f} rows/s ({seconds:.2f} s)",
              file=sys.stderr)

    sink_seconds = [r.seconds for r in runs]
    median_run = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    sink_rate = args.rows / statistics.median(sink_seconds)
    baseline_rate = baseline_rows / statistics.median(baseline_seconds)
    return {
        "benchmark": "sink",
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "postgres": f"{urlsplit(admin).hostname}:{urlsplit(admin).port or 5432}",
        "server_version": await server_version(admin),
        "results": [
            {"mode": "sink (COPY + upsert, 5,000-row batches)", "rows": args.rows, "runs": args.repeat,
             "seconds": [round(s, 3) for s in sink_seconds], "rows_per_s": round(sink_rate, 1),
             "median_run": {"seconds": round(median_run.seconds, 3), "batches": median_run.batches,
                            "wall_ms_per_batch": round(median_run.seconds / median_run.batches * 1000, 1),
                            "busy_ms_per_batch": median_run.per_batch_ms(),
                            "busy_s_total": {phase: round(sum(calls), 3)
                                             for phase, calls in median_run.busy_s.items()}}},
            {"mode": "per-row INSERT … ON CONFLICT", "rows": baseline_rows, "runs": args.repeat,
             "seconds": [round(s, 3) for s in baseline_seconds], "rows_per_s": round(baseline_rate, 1)},
            {"mode": "PostgreSQL alone (ceiling)", "rows": args.rows, "runs": args.repeat,
             "seconds": [round(s, 3) for s in pg_seconds],
             "rows_per_s": round(args.rows / statistics.median(pg_seconds), 1)},
        ],
        "ratio_sink_over_per_row": round(sink_rate / baseline_rate, 1),
        "ratio_per_round": [round((args.rows / a) / (baseline_rows / b), 1)
                            for a, b in zip(sink_seconds, baseline_seconds, strict=True)],
        "load_average": [round(x, 2) for x in load],
        "cpus": os.cpu_count(),
        "targets": {"rows_per_s": 80_000, "ratio": 25},
    }


async def server_version(admin: str) -> str:
    conn = await asyncpg.connect(admin)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def print_report(report: dict[str, Any]) -> None:
    print(f"sink drain — {report['loop']}, PostgreSQL {report['server_version']} at {report['postgres']}; "
          f"{report['cpus']} CPUs, load average {report['load_average'][0]:.2f} at the start")
    run = report["results"][0]["median_run"]
    split = ", ".join(f"{phase.replace('_', ' ')} {ms:.0f}" for phase, ms in run["busy_ms_per_batch"].items())
    print(f"median sink run: {run['seconds']:.2f} s, {run['batches']} batches, {run['wall_ms_per_batch']:.0f} ms "
          f"of wall time per batch; busy ms per batch (overlapping): {split}")
    print()
    print(f"{'mode':<42}{'rows':>9}{'runs':>6}{'rows/s':>12}")
    for r in report["results"]:
        print(f"{r['mode']:<42}{r['rows']:>9,}{r['runs']:>6}{r['rows_per_s']:>12,.0f}")
    sink, per_row, ceiling = (r["rows_per_s"] for r in report["results"])
    targets = report["targets"]
    print()
    print(f"sink ÷ PostgreSQL alone: {sink / ceiling:.2f}   sink ÷ per-row: {report['ratio_sink_over_per_row']:.1f}x   "
          f"(targets: ≥ {targets['rows_per_s']:,} rows/s {'met' if sink >= targets['rows_per_s'] else 'MISSED'}, "
          f"≥ {targets['ratio']}x {'met' if sink / per_row >= targets['ratio'] else 'MISSED'})")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_sink", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows the sink drains per run (100,000)")
    parser.add_argument("--baseline-rows", type=int, default=5_000, help="rows for the per-row baseline (5,000)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="rounds of one sink and one per-row run; medians count (5)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this path")
    args = parser.parse_args()

    SCRATCH_ROOT.mkdir(exist_ok=True)
    scratch = SCRATCH_ROOT / f"sink-{uuid.uuid4().hex[:8]}"
    scratch.mkdir()
    try:
        import uvloop

        report = uvloop.run(bench(args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_report(report)
    if args.json:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
