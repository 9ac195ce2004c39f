"""Test helpers: run real `ecoworker` processes, publish to RabbitMQ, read journals.

Nothing here mocks anything: workers are subprocesses started exactly as a user
starts them, and journals are read with plain sqlite3 beside the running worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import orjson

REPO = Path(__file__).resolve().parents[1]


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie (from /proc, so it works for any process)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerProcess:
    """One `ecoworker run` subprocess with its own journal and metrics port."""

    def __init__(self, wal: Path, queues: Iterable[str], env: dict[str, str], log: Path,
                 args: Iterable[str] = ()) -> None:
        self.wal = wal
        self.queues = list(queues)
        self.env = env
        self.log = log
        self.args = list(args)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> WorkerProcess:
        cmd = [sys.executable, "-m", "ecoworker.cli", "run", "--wal", str(self.wal),
               "--metrics-port", str(self.port), "--log-format", "text", *self.args]
        for q in self.queues:
            cmd += ["--queue", q]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def http(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:  # not listening (yet, or any more)
            return 0, b""

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise AssertionError(f"worker exited with {self.proc.returncode if self.proc else '?'}:\n"
                                     + self.log_text()[-3000:])
            if self.http("/readyz")[0] == 200:
                return
            time.sleep(0.1)
        raise AssertionError("worker not ready in time:\n" + self.log_text()[-3000:])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def journal_rows(wal: Path, sql: str = "SELECT task_id, status, attempts, result, error FROM task_wal",
                 params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    if not wal.exists():
        return []
    db = sqlite3.connect(f"file:{wal}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # the worker is still creating the schema
            return []
        raise
    finally:
        db.close()


def statuses(wal: Path) -> dict[str, str]:
    return {r["task_id"]: r["status"] for r in journal_rows(wal)}


async def wait_for(check: Callable[[], Any], timeout: float, interval: float = 0.2,
                   message: str | Callable[[], str] = "condition") -> Any:
    """Poll `check` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        await asyncio.sleep(interval)


class Amqp:
    """A publishing/inspecting connection for tests."""

    def __init__(self, conn: aio_pika.abc.AbstractConnection, channel: aio_pika.abc.AbstractChannel) -> None:
        self.conn, self.channel = conn, channel

    async def declare(self, queue: str) -> aio_pika.abc.AbstractQueue:
        return await self.channel.declare_queue(queue, durable=True)

    async def publish(self, queue: str, body: bytes, **props: Any) -> None:
        props.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
        await self.channel.default_exchange.publish(aio_pika.Message(body, **props), routing_key=queue)

    async def publish_tasks(self, queue: str, task: str, kwargs_list: Iterable[dict[str, Any]],
                            window: int = 1000) -> list[str]:
        """Publish native envelopes with confirms; returns the ids."""
        await self.declare(queue)
        ids, pending = [], []
        for kwargs in kwargs_list:
            task_id = str(uuid.uuid4())
            body = orjson.dumps({"id": task_id, "task": task, "args": [], "kwargs": kwargs})
            pending.append(self.publish(queue, body, content_type="application/json", message_id=task_id))
            ids.append(task_id)
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        return ids

    async def depth(self, queue: str) -> int:
        q = await self.channel.declare_queue(queue, durable=True, passive=True)
        return int(q.declaration_result.message_count or 0)

    async def drain(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take every message out of `queue` (acked)."""
        q = await self.declare(queue)
        out = []
        while (m := await q.get(no_ack=True, fail=False)) is not None:
            out.append(m)
        return out

    async def delete(self, *queues: str) -> None:
        for name in queues:
            try:
                ch = await self.conn.channel()
                await ch.queue_delete(name)
                await ch.close()
            except Exception:
                pass


def env_for_worker(stack_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(stack_env)
    env.update({"PYTHONPATH": str(REPO), "ECOWORKER_UPLOAD_ROOT": "/tmp", "OPENAI_BASE_URL":
                env.get("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")})
    env.update(extra)
    return env


@asynccontextmanager
async def fresh_database(admin_dsn: str, migrated: bool = True) -> AsyncIterator[str]:
    """CREATE DATABASE test_<uuid> beside `admin_dsn` (migrated to LATEST unless told not to);
    yield its DSN; drop it afterwards."""
    from ecoworker import pgschema

    name = f"test_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            dsn = urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{name}"))
            if migrated:
                conn = await asyncpg.connect(dsn)
                try:
                    await pgschema.migrate(conn)
                finally:
                    await conn.close()
            yield dsn
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
