"""Journal ingest throughput: group commit against one commit per task, both at synchronous=FULL.

    python -m bench.bench_journal [--rows N] [--single-rows M] [--repeat R] [--json PATH]

Every trial ingests into a fresh journal file in a scratch directory under the
current directory (`.bench-tmp/`, removed afterwards) — not /tmp, which may be a
tmpfs where fsync costs nothing. Each mode runs `--repeat` times, interleaved,
and the median counts. The file system, a raw fsync probe in the same directory
and `PRAGMA synchronous` read on the writer during every trial are printed, so
the figures can be read as "what a durable commit costs here".

Rows get sequential ids, except in the "uuid4 ids" mode: random ids (what Celery
sends) land all over the primary-key index, so each commit writes more pages;
"uuid7 ids" are the time-ordered ids ecoworker.client makes.

A control row (one commit per task at synchronous=NORMAL, which never fsyncs
a WAL commit) shows how much of the single-commit cost is the fsync; it is not
a durability mode ecoworker uses for ingest and is left out of the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ecoworker.client import new_task_id
from ecoworker.journal import Journal, NewTask


@dataclass(frozen=True)
class Mode:
    name: str
    batch: int
    rows: int
    synchronous: str = "FULL"  # what the trial runs at; FULL is what ingest uses
    ids: str = "sequential"  # or "uuid4" (Celery's random ids) or "uuid7" (ecoworker.client's)

    @property
    def control(self) -> bool:
        return self.synchronous != "FULL"


@dataclass
class Trial:
    mode: str
    repeat: int
    rows: int
    commits: int
    seconds: float
    synchronous_during_run: int

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def ms_per_commit(self) -> float:
        return 1000 * self.seconds / self.commits


# ---------------------------------------------------------------- environment evidence

def filesystem_of(path: Path) -> dict[str, str]:
    """The mount holding `path` (longest mount-point prefix in /proc/self/mountinfo)."""
    best = {"mount_point": "?", "fstype": "?", "source": "?"}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best
    resolved = str(path.resolve())
    for line in lines:
        left, _, right = line.partition(" - ")
        mount_point = left.split()[4].replace("\\040", " ")
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best["mount_point"].replace("?", "")):
            fstype, source = right.split()[:2]
            best = {"mount_point": mount_point, "fstype": fstype, "source": source}
    return best


def fsync_probe(directory: Path, count: int = 200) -> dict[str, float]:
    """Median milliseconds of write(4 KiB)+fsync and write(4 KiB)+fdatasync on a file in `directory`."""
    path = directory / "fsync-probe"
    block = os.urandom(4096)
    result: dict[str, float] = {}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for name, sync in (("fsync_ms", os.fsync), ("fdatasync_ms", os.fdatasync)):
            times = []
            for _ in range(count):
                os.write(fd, block)
                start = time.perf_counter()
                sync(fd)
                times.append(1000 * (time.perf_counter() - start))
            result[name] = round(statistics.median(times), 3)
    finally:
        os.close(fd)
        path.unlink()
    return result


# ---------------------------------------------------------------- one trial

def make_rows(prefix: str, n: int, ids: str = "sequential") -> list[NewTask]:
    """`n` rows shaped like a real delivery (an S3 upload with a few kwargs), with ids
    `prefix-00000001`…, random uuid4 strings as Celery makes them, or time-ordered uuid7."""
    now = time.time()
    make_id = {"sequential": lambda i: f"{prefix}-{i:08d}", "uuid4": lambda i: str(uuid.uuid4()),
               "uuid7": lambda i: new_task_id()}[ids]
    kwargs = orjson.dumps({"bucket": "ecoworker-uploads", "content_type": "image/jpeg"}).decode()
    return [
        NewTask(make_id(i), "upload_to_s3", "bench-worker", "storage",
                orjson.dumps([f"/srv/uploads/{i:08d}.jpg", f"images/{i:08d}.jpg"]).decode(), kwargs,
                max_retries=3, created_at=now, not_before=now)
        for i in range(n)
    ]


def remove_journal(path: Path) -> None:
    """Delete a closed journal and its -wal/-shm files, so the scratch dir stays small."""
    for leftover in path.parent.glob(path.name + "*"):
        leftover.unlink()


async def run_trial(directory: Path, mode: Mode, repeat: int) -> Trial:
    path = directory / f"{mode.name.replace(' ', '-')}-{repeat}.db"
    rows = make_rows(f"{mode.name}-{repeat}", mode.rows, mode.ids)
    batches = [rows[i:i + mode.batch] for i in range(0, len(rows), mode.batch)]
    async with Journal.open(path) as journal:
        writer = journal._db  # synchronous is per connection: set and read it on the writer itself
        if mode.control:
            await writer.execute(f"PRAGMA synchronous = {mode.synchronous}")
        start = time.perf_counter()
        for batch in batches:
            new = await journal.ingest(batch)
            assert len(new) == len(batch), "every bench row is new"
        seconds = time.perf_counter() - start
        synchronous = list(await writer.execute_fetchall("PRAGMA synchronous"))[0][0]
    remove_journal(path)
    return Trial(mode.name, repeat, mode.rows, len(batches), seconds, synchronous)


# ---------------------------------------------------------------- the run

async def bench(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    modes = [
        Mode("group x1000", 1000, args.rows),  # the largest batch ingest takes (ECOWORKER_INGEST_BATCH_MAX)
        Mode("group x500", 500, args.rows),  # the default batch cap
        Mode("group x100", 100, args.rows),
        Mode("x500 uuid4 ids", 500, args.rows, ids="uuid4"),
        Mode("x500 uuid7 ids", 500, args.rows, ids="uuid7"),
        Mode("single", 1, args.single_rows),
        Mode("single NORMAL", 1, args.single_rows, synchronous="NORMAL"),
    ]
    trials: list[Trial] = []
    for repeat in range(args.repeat):
        for mode in modes:  # interleaved, so drift in disk speed hits every mode alike
            trial = await run_trial(scratch, mode, repeat)
            expected = 1 if mode.control else 2
            if trial.synchronous_during_run != expected:
                raise SystemExit(f"{mode.name}: PRAGMA synchronous was {trial.synchronous_during_run}, "
                                 f"expected {expected}")
            trials.append(trial)
            print(f"  {mode.name:<14} run {repeat + 1}: {trial.rows_per_s:>10,.0f} rows/s "
                  f"({trial.ms_per_commit:.3f} ms/commit, synchronous={trial.synchronous_during_run})",
                  file=sys.stderr)

    results: list[dict[str, Any]] = []
    for mode in modes:
        mine = [t for t in trials if t.mode == mode.name]
        results.append({
            "mode": mode.name, "batch": mode.batch, "rows": mode.rows, "synchronous": mode.synchronous,
            "control": mode.control, "commits": mine[0].commits,
            "rows_per_s": [round(t.rows_per_s, 1) for t in mine],
            "median_rows_per_s": round(statistics.median(t.rows_per_s for t in mine), 1),
            "median_ms_per_commit": round(statistics.median(t.ms_per_commit for t in mine), 3),
            "synchronous_during_run": sorted({t.synchronous_during_run for t in mine}),
        })
    single = next(r for r in results if r["mode"] == "single")["median_rows_per_s"]
    ratios = {r["mode"]: round(r["median_rows_per_s"] / single, 1)
              for r in results if not r["control"] and r["mode"] != "single"}
    return {"results": results, "ratios_group_over_single": ratios}


def print_report(report: dict[str, Any]) -> None:
    fs, probe = report["filesystem"], report["fsync_probe"]
    print(f"journal ingest — {report['loop']}, SQLite {report['sqlite']}, Python {report['python']}")
    print(f"scratch dir on {fs['fstype']} ({fs['source']} at {fs['mount_point']}); "
          f"raw 4 KiB write+fsync {probe['fsync_ms']:.3f} ms, +fdatasync {probe['fdatasync_ms']:.3f} ms (median)")
    single = next(r for r in report["results"] if r["mode"] == "single")["median_rows_per_s"]
    print()
    print(f"{'mode':<15}{'batch':>6}{'rows':>8}{'sync':>8}{'rows/s (median)':>17}{'ms/commit':>11}{'÷ single':>10}")
    for r in report["results"]:
        ratio = f"{r['median_rows_per_s'] / single:.1f}x"
        sync = r["synchronous"] + ("*" if r["control"] else "")
        print(f"{r['mode']:<15}{r['batch']:>6}{r['rows']:>8}{sync:>8}{r['median_rows_per_s']:>17,.0f}"
              f"{r['median_ms_per_commit']:>11.3f}{ratio:>10}")
    print()
    print("PRAGMA synchronous read on the writer after every FULL trial: "
          + ", ".join(str(v) for r in report["results"] if not r["control"] for v in r["synchronous_during_run"]))
    print("* control only: NORMAL skips the per-commit WAL fsync; ingest never runs at NORMAL")


def loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    try:
        import uvloop
    except ImportError:
        return None, "asyncio"
    return uvloop.new_event_loop, f"uvloop {importlib.metadata.version('uvloop')}"


def run(coro: Coroutine[Any, Any, dict[str, Any]], factory: Callable[[], asyncio.AbstractEventLoop] | None) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_journal", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows per group-commit trial (default 20000)")
    parser.add_argument("--single-rows", type=int, default=2_000,
                        help="rows per one-commit-per-task trial (default 2000)")
    parser.add_argument("--repeat", type=int, default=3, help="trials per mode; the median counts (default 3)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)

    root = Path.cwd() / ".bench-tmp"
    root.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="journal-", dir=root))
    factory, loop_name = loop_factory()
    try:
        fs = filesystem_of(scratch)
        if fs["fstype"] in ("tmpfs", "ramfs"):
            print(f"warning: {scratch} is on {fs['fstype']}: fsync is free there, the figures flatter "
                  "one-commit-per-task", file=sys.stderr)
        report: dict[str, Any] = {
            "loop": loop_name, "sqlite": sqlite3.sqlite_version, "python": platform.python_version(),
            "filesystem": fs, "fsync_probe": fsync_probe(scratch),
            "config": {"rows": args.rows, "single_rows": args.single_rows, "repeat": args.repeat},
        }
        report.update(run(bench(args, scratch), factory))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            root.rmdir()  # only when no other bench left files in it
        except OSError:
            pass
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
