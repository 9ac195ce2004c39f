"""The seed's design, rebuilt for comparison: Celery workers with a per-task SQLite journal.

A Celery app (RabbitMQ broker, JSON, `task_acks_late=True`) with one `noop`
task, and the seed's journal writes hooked on signals, each its own commit:
INSERT the row (PENDING) and UPDATE it to RUNNING on `task_prerun`, UPDATE it
to SUCCESS on `task_postrun`; `journal_mode=WAL`, `synchronous=NORMAL`. Every
process (prefork child) and thread opens its own connection.

The Celery worker imports this module (`celery -A bench.celery_seed worker …`);
`measure()` is the benchmark's side: publish the messages an unchanged
`send_task` producer sends, start the worker, wait until the queue is empty and
every row is SUCCESS.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_process_init

app = Celery("celery_seed", broker=os.environ.get("RABBITMQ_URL"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    # Celery's default is 4; noop tasks are tiny, so a deeper prefetch is Celery's best case.
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH_MULTIPLIER", "16")),
    task_ignore_result=True,
    worker_enable_remote_control=False,
    broker_connection_retry_on_startup=True,
)
WORKER_NAME = socket.gethostname()
_local = threading.local()


@app.task(name="bench.noop")
def noop(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def _db() -> sqlite3.Connection:
    """This process's and this thread's own connection to the journal."""
    conn = getattr(_local, "conn", None)
    if conn is None or _local.pid != os.getpid():
        conn = sqlite3.connect(os.environ["BENCH_CELERY_WAL"], timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        _local.conn, _local.pid = conn, os.getpid()
    return conn


@worker_process_init.connect
def _open_in_child(**_: Any) -> None:
    _local.conn = None  # never share the parent's connection across fork
    _db()


@task_prerun.connect
def _write_task(task_id: str, task: Any, args: Any = (), kwargs: Any = None, **_: Any) -> None:
    db = _db()
    now = time.time()
    db.execute(
        "INSERT OR REPLACE INTO task_wal (task_id, task_name, worker_name, args, kwargs, status, created_at) "
        "VALUES (?, ?, ?, ?, ?, 'PENDING', ?)",
        (task_id, task.name, WORKER_NAME, json.dumps(list(args or ())), json.dumps(kwargs or {}), now),
    )
    db.commit()
    db.execute("UPDATE task_wal SET status = 'RUNNING', started_at = ? WHERE task_id = ?", (time.time(), task_id))
    db.commit()


@task_postrun.connect
def _complete_task(task_id: str, retval: Any = None, state: str | None = None, **_: Any) -> None:
    db = _db()
    db.execute(
        "UPDATE task_wal SET status = ?, result = ?, completed_at = ? WHERE task_id = ?",
        (state or "SUCCESS", json.dumps(retval, default=str), time.time(), task_id),
    )
    db.commit()


# ---------------------------------------------------------------- the benchmark's side


def _create_journal(path: Path) -> None:
    from ecoworker.schema import SEED_SCHEMA

    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SEED_SCHEMA)
    finally:
        db.close()


def _messages(n: int) -> Iterator[Any]:
    """What an unchanged `app.send_task` publishes: Celery's own protocol v2 message, JSON-serialised
    by kombu, with kombu's AMQP properties (built here, published in a confirm window for speed)."""
    import aio_pika
    from kombu.serialization import dumps

    for i in range(n):
        task_id = str(uuid.uuid4())
        msg = app.amqp.as_task_v2(task_id, "bench.noop", args=(), kwargs={"i": i})
        content_type, encoding, body = dumps(msg.body, serializer="json")
        yield aio_pika.Message(body.encode() if isinstance(body, str) else body, headers=msg.headers,
                               content_type=content_type, content_encoding=encoding, priority=0,
                               delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **msg.properties)


async def measure(ctx: Any, n: int, pool: str, concurrency: int) -> dict[str, Any]:
    """One Celery run: `n` tasks through `celery worker -P pool -c concurrency`."""
    import aio_pika

    from bench import common

    queue = ctx.queue("celery")
    ctx.exchanges.append(queue)  # Celery declares a direct exchange named after the queue
    wal = ctx.tmp / f"{queue}.db"
    _create_journal(wal)
    conn = await aio_pika.connect(ctx.amqp_url)
    try:
        channel = await conn.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)  # what Celery declares: durable, no arguments
        t = time.perf_counter()
        await common.publish_all(channel, _messages(n), queue)
        publish_s = time.perf_counter() - t
        await common.wait_depth(channel, queue, n)
        cmd = [sys.executable, "-m", "celery", "-A", "bench.celery_seed", "worker", "-Q", queue,
               "-P", pool, "-c", str(concurrency), "-n", f"bench-{uuid.uuid4().hex[:8]}@%h",
               "--without-heartbeat", "--without-mingle", "--without-gossip", "-l", "warning"]
        proc = common.Proc(cmd, ctx.child_env(BENCH_CELERY_WAL=str(wal)), ctx.tmp / f"{queue}.log")
        peak_kb, peak_pss_kb, done = 0, 0, None
        deadline = time.monotonic() + 60 + n / 50
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(common.POLL)
                peak_kb = max(peak_kb, common.tree_kb(proc.pid))
                peak_pss_kb = max(peak_pss_kb, common.tree_kb(proc.pid, "Pss"))
                if not proc.alive:
                    raise RuntimeError(f"celery worker exited {proc.popen.returncode}:\n{proc.tail()}")
                rows = common.journal_query(wal, "SELECT count(*) FROM task_wal WHERE status = 'SUCCESS'")
                if rows and rows[0][0] >= n and await common.queue_depth(channel, queue) == 0:
                    done = time.time()
                    break
            hwm_kb = common.tree_kb(proc.pid, "VmHWM")
        finally:
            stopping = time.monotonic()
            proc.stop(timeout=5)  # done: no need to wait for a warm shutdown
            stop_s = time.monotonic() - stopping
        if done is None:
            raise RuntimeError(f"celery ({pool}) did not finish {n} tasks in time:\n{proc.tail()}")
    finally:
        await conn.close()
    first, count = common.journal_query(wal, "SELECT min(created_at), count(*) FROM task_wal")[0]
    return {"n": n, "pool": pool, "concurrency": concurrency, "publish_rate": n / publish_s,
            "seconds_from_spawn": done - proc.started, "seconds_from_first_delivery": done - first,
            "rate": n / (done - proc.started), "rate_warm": n / (done - first),
            "startup_seconds": first - proc.started, "rows": count,
            "peak_rss_mb": peak_kb / 1024, "peak_rss_hwm_sum_mb": hwm_kb / 1024, "peak_pss_mb": peak_pss_kb / 1024,
            "prefetch_multiplier": app.conf.worker_prefetch_multiplier, "stop_seconds": stop_s}
