"""Operations subcommands: `wal …`, `db migrate`, `publish`, `dlq …`.

They work on a journal file beside a running worker (SQLite WAL allows
readers, and writes here are short transactions), print one clear line on
error and exit non-zero.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiormq
import orjson

from ecoworker.errors import ConfigError
from ecoworker.lockfile import JournalLock
from ecoworker.settings import DEFAULT_WAL_PATH, Settings, environ, redact_url


def add_commands(sub: Any) -> None:
    wal = sub.add_parser("wal", help="inspect and operate on a journal file").add_subparsers(
        dest="wal_command", required=True)

    def wal_cmd(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = wal.add_parser(name, help=help_text)
        p.add_argument("--db", help=f"journal file (default: $WAL_DB_PATH or {DEFAULT_WAL_PATH})")
        p.set_defaults(func=lambda a: _run(func(a)))
        return p

    p = wal_cmd("stats", wal_stats, "counts by status, sync totals, size (the seed's get_stats)")
    p.add_argument("--json", action="store_true")
    p = wal_cmd("list", wal_list, "list tasks, newest first")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p = wal_cmd("checkpoint", wal_checkpoint, "checkpoint the SQLite WAL into the database")
    p.add_argument("--mode", default="passive", choices=("passive", "full", "restart", "truncate"))
    p = wal_cmd("cleanup", wal_cleanup, "delete synced terminal rows older than --days")
    p.add_argument("--days", type=float, default=7.0)
    p = wal_cmd("sync", wal_sync, "ship every unsynced result to PostgreSQL now")
    p = wal_cmd("recover", wal_recover, "list unfinished tasks; optionally fail stale RUNNING rows")
    p.add_argument("--stale-after", help="mark RUNNING rows started longer ago failed, e.g. 1h, 30m")
    p = wal_cmd("retry-failed", wal_retry_failed, "put FAILURE/DEAD rows back to PENDING")
    p.add_argument("--task")
    p.add_argument("--since", help="only rows completed after this ISO time or duration (e.g. 2h)")
    p.add_argument("--include-dead", action="store_true", help="also DEAD rows (poison, crash loops)")
    p = wal_cmd("drain", wal_drain, "republish unfinished tasks to the broker and hand them off")

    db = sub.add_parser("db", help="PostgreSQL schema").add_subparsers(dest="db_command", required=True)
    p = db.add_parser("migrate", help="create or upgrade the task_results schema")
    p.set_defaults(func=lambda a: _run(db_migrate(a)))

    p = sub.add_parser("publish", help="publish tasks (native envelope, publisher confirms)")
    p.add_argument("task")
    p.add_argument("--queue", required=True)
    p.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
    p.add_argument("--args", default="[]", help="JSON array of positional arguments")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--id", dest="task_id", help="task id (only with --count 1)")
    p.set_defaults(func=lambda a: _run(publish(a)))

    dlq = sub.add_parser("dlq", help="dead-letter queues").add_subparsers(dest="dlq_command", required=True)
    p = dlq.add_parser("list", help="show dead letters without removing them")
    p.add_argument("--queue", required=True)
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=lambda a: _run(dlq_list(a)))
    p = dlq.add_parser("replay", help="move dead letters back to their queue")
    p.add_argument("--queue", required=True)
    p.add_argument("--limit", type=int, default=0, help="0: all")
    p.set_defaults(func=lambda a: _run(dlq_replay(a)))


def _run(coro: Any) -> int:
    from ecoworker import logs
    from ecoworker.cli import run_async

    logs.setup("WARNING", "text")  # library chatter stays out of a command's one-line errors

    async def wrapper() -> int:
        try:
            return int(await coro or 0)
        except aiormq.exceptions.AMQPConnectionError as exc:
            raise ConfigError(f"cannot connect to RabbitMQ at {redact_url(_settings().rabbitmq_url)}: {exc}; "
                              "check RABBITMQ_URL and that the broker is up") from None

    return run_async(wrapper)


def _settings() -> Settings:
    return Settings.from_env(environ())


def _db_path(args: argparse.Namespace) -> Path:
    path = Path(args.db) if args.db else _settings().wal_path
    if not path.exists():
        raise ConfigError(f"journal {path} does not exist; pass --db PATH or set WAL_DB_PATH")
    return path


def _open(args: argparse.Namespace) -> Any:
    from ecoworker.journal import Journal

    return Journal.open(_db_path(args))


def _ts(value: Any) -> str:
    return "" if value is None else datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%d %H:%M:%S")


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise ConfigError(f"{text!r} is not a duration: use e.g. 90s, 30m, 1h, 2d") from None


def _since(text: str | None) -> float | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    except ValueError:
        return time.time() - _duration(text)


async def wal_stats(args: argparse.Namespace) -> int:
    async with _open(args) as j:
        stats = await j.get_stats()
    if args.json:
        print(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"journal      {j.path}  ({stats['wal_size_mb']:.2f} MB)")
    for status, count in sorted(stats["by_status"].items()):
        print(f"  {status:<11} {count:>10}")
    sync = stats["sync"]
    print(f"terminal     {sync['total']:>10}   synced {sync['synced']}   unsynced {sync['unsynced']}")
    return 0


async def wal_list(args: argparse.Namespace) -> int:
    async with _open(args) as j:
        rows = await j.list_tasks(args.status.upper() if args.status else None, args.limit)
    if args.json:
        print(orjson.dumps(rows).decode())
        return 0
    print(f"{'task_id':<38} {'task':<28} {'status':<10} {'att':>3} {'completed':<19} error")
    for r in rows:
        print(f"{r['task_id'][:38]:<38} {r['task_name'][:28]:<28} {r['status']:<10} {r['attempts']:>3} "
              f"{_ts(r['completed_at']):<19} {(r['error'] or '')[:60]}")
    return 0


async def wal_checkpoint(args: argparse.Namespace) -> int:
    async with _open(args) as j:
        before = j.wal_file.stat().st_size if j.wal_file.exists() else 0
        busy, _pages, _done = await j.checkpoint(args.mode.upper())
        after = j.wal_file.stat().st_size if j.wal_file.exists() else 0
    print(f"{args.mode.upper()} checkpoint: -wal file {before} → {after} bytes"
          + (" (readers kept it from finishing; run again)" if busy else ""))
    return 1 if busy else 0


async def wal_cleanup(args: argparse.Namespace) -> int:
    async with _open(args) as j:
        deleted = await j.cleanup_old_tasks(args.days)
    print(f"deleted {deleted} synced terminal row(s) older than {args.days:g} days")
    return 0


async def wal_sync(args: argparse.Namespace) -> int:
    from ecoworker.sink import UNAVAILABLE, Sink

    settings = _settings()
    if not settings.sink.dsn:
        raise ConfigError("no PostgreSQL configured: set POSTGRES_DSN (or POSTGRES_HOST …)")
    async with _open(args) as j:
        sink = Sink(settings.sink, j)
        try:
            shipped = await sink.sync_all()
        except UNAVAILABLE as exc:
            raise ConfigError(f"cannot reach PostgreSQL at {redact_url(settings.sink.dsn)} "
                              f"({type(exc).__name__}: {exc}); nothing was marked synced") from None
        finally:
            await sink.close()
    print(f"shipped {shipped} row(s) to PostgreSQL")
    return 0


async def wal_recover(args: argparse.Namespace) -> int:
    if args.stale_after:
        with JournalLock(_db_path(args), "stop it before marking its RUNNING tasks failed"):
            return await _recover(args)
    return await _recover(args)


async def _recover(args: argparse.Namespace) -> int:
    async with _open(args) as j:
        rows = await j.recover_pending_tasks()
        for r in rows:
            print(f"{r['task_id']:<38} {r['task_name']:<28} {r['status']:<8} attempts={r['attempts']} "
                  f"started={_ts(r['started_at'])}")
        print(f"{len(rows)} unfinished task(s)")
        if args.stale_after:
            n = await j.fail_stale_running(time.time() - _duration(args.stale_after))
            print(f"marked {n} stale RUNNING task(s) FAILURE")
    return 0


async def wal_retry_failed(args: argparse.Namespace) -> int:
    statuses = ["FAILURE", "DEAD"] if args.include_dead else ["FAILURE"]
    async with _open(args) as j:
        n = await j.requeue(statuses, args.task, _since(args.since))
    print(f"{n} task(s) back to PENDING; a running worker picks them up")
    return 0


async def wal_drain(args: argparse.Namespace) -> int:
    with JournalLock(_db_path(args), "stop it first (SIGTERM), then drain what it left"):
        return await _drain(args)


async def _drain(args: argparse.Namespace) -> int:
    from ecoworker.client import Client, amqp_message
    from ecoworker.envelope import TaskMessage

    settings = _settings()
    handed = 0
    async with _open(args) as j, Client.connect(settings.rabbitmq_url) as client:
        for r in await j.recover_pending_tasks():
            msg = TaskMessage(id=r["task_id"], task=r["task_name"], args=orjson.loads(r["args"] or "[]"),
                              kwargs=orjson.loads(r["kwargs"] or "{}"), eta=r["not_before"],
                              expires=r["expires_at"], max_retries=r["max_retries"])
            queue = r["queue"] or settings.queues[0]
            await client.declare(queue)
            await client.channel.default_exchange.publish(amqp_message(msg), routing_key=queue)
            await j.hand_off([r["task_id"]])
            handed += 1
    print(f"handed {handed} unfinished task(s) back to the broker")
    return 0


async def db_migrate(args: argparse.Namespace) -> int:
    import asyncpg

    from ecoworker import pgschema

    dsn = _settings().sink.dsn
    if not dsn:
        raise ConfigError("no PostgreSQL configured: set POSTGRES_DSN (or POSTGRES_HOST …)")
    try:
        conn = await asyncpg.connect(dsn, timeout=15)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(f"cannot connect to PostgreSQL at {redact_url(dsn)}: {exc}") from None
    try:
        before, after = await pgschema.migrate(conn)
    finally:
        await conn.close()
    print(f"schema at version {after}" + (f" (was {before})" if before != after else " (up to date)"))
    return 0


async def publish(args: argparse.Namespace) -> int:
    from ecoworker.client import Client, build_message

    kwargs, pos = orjson.loads(args.kwargs), orjson.loads(args.args)
    if not isinstance(kwargs, dict) or not isinstance(pos, list):
        raise ConfigError("--kwargs must be a JSON object and --args a JSON array")
    msgs = [build_message(args.task, pos, kwargs, task_id=args.task_id if args.count == 1 else None)
            for _ in range(args.count)]
    async with Client.connect(_settings().rabbitmq_url) as client:
        ids = await client.enqueue_many(msgs, args.queue)
    for task_id in ids[:20]:
        print(task_id)
    if len(ids) > 20:
        print(f"… {len(ids)} task(s) published to {args.queue}", file=sys.stderr)
    return 0


async def dlq_list(args: argparse.Namespace) -> int:
    from ecoworker.dlq import list_dead

    for line in await list_dead(_settings().rabbitmq_url, args.queue, args.limit):
        print(line)
    return 0


async def dlq_replay(args: argparse.Namespace) -> int:
    from ecoworker.dlq import replay

    n = await replay(_settings().rabbitmq_url, args.queue, args.limit)
    print(f"replayed {n} dead letter(s) to {args.queue}")
    return 0
