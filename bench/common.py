"""Shared pieces of the benchmark: the stack, subprocesses, memory, AMQP and PostgreSQL helpers.

Everything measured is a real process talking to the local stack's real
RabbitMQ and PostgreSQL (`deploy/dev/services.sh`); nothing here is mocked.
Times crossing processes are wall-clock epoch seconds (`time.time()`), which
all processes on one machine share.
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractChannel

REPO = Path(__file__).resolve().parents[1]
TMP_ROOT = REPO / ".bench-tmp"
RESULTS = REPO / "bench" / "results"
# Production images ship compiled bytecode (UV_COMPILE_BYTECODE=1); a dev venv may have none, and
# with PYTHONDONTWRITEBYTECODE every process would compile openai, pydantic, botocore … from source
# at each start. Child processes therefore keep a bytecode cache of their own here (kept across runs).
PYCACHE = TMP_ROOT / "pycache"
SERVICES_SH = REPO / "deploy" / "dev" / "services.sh"
POLL = 0.05  # seconds between completion polls


# ---------------------------------------------------------------- the stack and the run


def stack_env() -> dict[str, str]:
    """Bring the local stack up (idempotent, ~0.1 s when running) and return its env file."""
    state = Path(os.environ.get("ECOWORKER_STACK_DIR") or "/tmp/ecoworker-stack")
    subprocess.run(["bash", str(SERVICES_SH), "up"], check=True, capture_output=True, timeout=900)
    values: dict[str, str] = {}
    for raw in (state / "env").read_text().splitlines():
        key, sep, value = raw.strip().removeprefix("export ").partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = value.strip()
    return values


@dataclass
class Ctx:
    """One `bench.run` invocation: the stack, a scratch directory and a bench database."""

    stack: dict[str, str]
    tmp: Path
    pg_dsn: str = ""  # the fresh bench database (created by `create_bench_db`)
    queues: list[str] = field(default_factory=list)  # every queue created, deleted at the end
    exchanges: list[str] = field(default_factory=list)

    @property
    def amqp_url(self) -> str:
        return self.stack["RABBITMQ_URL"]

    def queue(self, kind: str) -> str:
        name = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
        self.queues.append(name)
        return name

    def child_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(self.stack)
        env.update({"PYTHONPATH": str(REPO), "PYTHONPYCACHEPREFIX": str(PYCACHE)})
        env.update(extra)
        return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# ---------------------------------------------------------------- processes and memory


class Proc:
    """A subprocess in its own session (so its whole tree can be signalled by its group id)."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.cmd, self.log = list(cmd), log
        self.started = time.time()
        with log.open("ab") as out:
            self.popen = subprocess.Popen(self.cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        self.pid = self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (graceful), then SIGKILL of the process group after `timeout` seconds."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return self.popen.wait(10)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def proc_status_kb(pid: int, key: str) -> int:
    """`VmRSS` / `VmHWM` of one process in KiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size: pages shared between processes (prefork children, a fork) count once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


CHILD_NAMES = (("ecoworker.writerchild", "journal writer"), ("resource_tracker", "resource tracker"),
               ("forkserver", "forkserver"), ("spawn_main", "pool process"))


def child_names(pid: int) -> set[str]:
    """What `pid`'s descendants are ("journal writer", "resource tracker", …), from their command lines."""
    names = set()
    for p in process_tree(pid)[1:]:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        names.add(next((name for key, name in CHILD_NAMES if key in cmd), cmd[:40]))
    return names


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by `pid` and its living descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def tree_kb(pid: int, key: str = "VmRSS") -> int:
    """`key` of /proc/PID/status summed over the tree; "Pss" sums proportional set sizes instead."""
    tree = process_tree(pid)
    return sum(pss_kb(p) if key == "Pss" else proc_status_kb(p, key) for p in tree)


# ---------------------------------------------------------------- AMQP


async def publish_all(channel: aio_pika.abc.AbstractChannel, messages: Iterable[aio_pika.Message],
                      routing_key: str, window: int = 1000) -> int:
    """Publish to the default exchange with publisher confirms, keeping up to `window` outstanding.

    (A semaphore, not `asyncio.wait(FIRST_COMPLETED)` over the pending set, which costs O(window)
    per message and halves the rate.)
    """
    target = channel.default_exchange
    slots = asyncio.Semaphore(window)
    errors: list[BaseException] = []
    running: set[asyncio.Task[Any]] = set()

    def settled(task: asyncio.Task[Any]) -> None:
        running.discard(task)
        slots.release()
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())

    count = 0
    for msg in messages:
        await slots.acquire()
        if errors:
            break
        task = asyncio.ensure_future(target.publish(msg, routing_key=routing_key))
        running.add(task)
        task.add_done_callback(settled)
        count += 1
    if running:
        await asyncio.wait(set(running))
    if errors:
        raise errors[0]
    return count


async def queue_depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    """Ready messages in `name` (passive declare)."""
    q = await channel.declare_queue(name, durable=True, passive=True)
    return int(q.declaration_result.message_count or 0)


async def prepublish_noops(channel: aio_pika.abc.AbstractChannel, queue: str, n: int) -> float:
    """Declare `queue`, publish `n` confirmed `ecoworker.noop` envelopes, wait until the broker
    holds them all; returns the seconds publishing took."""
    from ecoworker.client import amqp_message, build_message

    await channel.declare_queue(queue, durable=True)
    t = time.perf_counter()
    await publish_all(channel, (amqp_message(build_message("ecoworker.noop", (), {"i": i})) for i in range(n)),
                      queue)
    publish_s = time.perf_counter() - t
    await wait_depth(channel, queue, n)
    return publish_s


async def wait_depth(channel: aio_pika.abc.AbstractChannel, name: str, n: int, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while (depth := await queue_depth(channel, name)) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"queue {name} holds {depth} of {n} published messages")
        await asyncio.sleep(0.05)


async def delete_queues(url: str, queues: Iterable[str], exchanges: Iterable[str] = ()) -> None:
    """Delete the benchmark's own queues (and `<queue>.dead`) and exchanges; nothing else."""
    conn = await aio_pika.connect(url)

    async def quietly(delete: Callable[[AbstractChannel], Awaitable[Any]]) -> None:
        ch = await conn.channel()  # a failed delete closes its channel: one channel each
        try:
            await delete(ch)
        except Exception:  # absent already
            pass
        if not ch.is_closed:
            await ch.close()

    try:
        for q in [n for name in queues for n in (name, f"{name}.dead")]:
            await quietly(lambda ch, q=q: ch.queue_delete(q))
        for name in exchanges:
            await quietly(lambda ch, name=name: ch.exchange_delete(name))
    finally:
        await conn.close()


# ---------------------------------------------------------------- PostgreSQL


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def create_bench_db(ctx: Ctx) -> None:
    """A fresh database for this run, with the task_results schema applied."""
    import asyncpg

    from ecoworker import pgschema

    name = f"ecoworker_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ctx.stack["POSTGRES_DSN"])
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    ctx.pg_dsn = with_database(ctx.stack["POSTGRES_DSN"], name)
    conn = await asyncpg.connect(ctx.pg_dsn)
    try:
        await pgschema.migrate(conn)
    finally:
        await conn.close()


async def drop_bench_db(ctx: Ctx) -> None:
    import asyncpg

    if not ctx.pg_dsn:
        return
    name = urlsplit(ctx.pg_dsn).path.lstrip("/")
    admin = await asyncpg.connect(ctx.stack["POSTGRES_DSN"])
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# ---------------------------------------------------------------- ecoworker processes


def start_ecoworker(ctx: Ctx, queue: str, wal: Path, port: int, log: Path) -> Proc:
    """`ecoworker run` exactly as a user starts it, against the bench database."""
    cmd = [sys.executable, "-m", "ecoworker.cli", "run", "--queue", queue, "--wal", str(wal),
           "--metrics-port", str(port), "--migrate", "--log-format", "text", "--worker-name", "bench"]
    env = ctx.child_env(POSTGRES_DSN=ctx.pg_dsn, ECOWORKER_METRICS_HOST="127.0.0.1",
                        ECOWORKER_UPLOAD_ROOT="/tmp", OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    return Proc(cmd, env, log)


def http_get(port: int, path: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError:
        return 0, ""


async def wait_ready(proc: Proc, port: int, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not proc.alive:
            raise RuntimeError("worker exited during start-up:\n" + proc.tail())
        if (await asyncio.to_thread(http_get, port, "/readyz"))[0] == 200:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("worker not ready in time:\n" + proc.tail())


def journal_query(path: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Read a journal beside (or after) the process that writes it."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        db.close()


# ---------------------------------------------------------------- Prometheus histograms

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$')


def histogram_buckets(text: str, name: str) -> list[tuple[float, float]]:
    """[(le, cumulative count)] of histogram `name` (no other labels) from /metrics text."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m["name"] != f"{name}_bucket":
            continue
        le = re.search(r'le="([^"]+)"', m["labels"] or "")
        if le:
            out.append((float(le[1]), float(m["value"])))
    return sorted(out)


def histogram_quantile(q: float, before: list[tuple[float, float]],
                       after: list[tuple[float, float]]) -> float | None:
    """The q-quantile of the observations between two scrapes (Prometheus' linear interpolation)."""
    start = dict(before)
    delta = [(le, count - start.get(le, 0.0)) for le, count in after]
    if not delta or delta[-1][1] <= 0:
        return None
    rank = q * delta[-1][1]
    lower, prev = 0.0, 0.0
    for le, cum in delta:
        if cum >= rank:
            if le == float("inf"):
                return lower  # above the highest finite bucket: all we can say
            if cum == prev:
                return le
            return lower + (le - lower) * (rank - prev) / (cum - prev)
        lower, prev = le, cum
    return lower


# ---------------------------------------------------------------- the machine


def _run_text(cmd: Sequence[str], timeout: float = 30) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _fs_type(path: Path) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mount, fs = line.split()[:3]
                if str(path).startswith(mount) and len(mount) > len(best):
                    best, kind = mount, f"{fs} ({dev})"
    except OSError:
        pass
    return kind


def fsync_probe(directory: Path, count: int = 100) -> dict[str, float | None]:
    """Latency of a 4 KiB write + fdatasync where the journals live: the floor under every ack.

    "overwrite" rewrites the same blocks (a reused -wal file); "append" grows the file, so the
    file system must also commit the new size (a -wal file growing after a checkpoint).
    """
    out: dict[str, float | None] = {}
    for mode in ("overwrite", "append"):
        path = directory / f"fsync-probe-{mode}"
        times = []
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for i in range(count):
                started = time.perf_counter()
                os.pwrite(fd, b"x" * 4096, (i % 4 if mode == "overwrite" else i) * 4096)
                os.fdatasync(fd)
                times.append((time.perf_counter() - started) * 1000)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)
        out[f"fdatasync_{mode}_p50_ms"] = percentile(times, 0.5)
        out[f"fdatasync_{mode}_p99_ms"] = percentile(times, 0.99)
    return out


def code_state() -> dict[str, Any]:
    """Which code was measured: the commit, uncommitted files, and a digest of ecoworker/ and handlers/."""
    import hashlib

    files = {str(p.relative_to(REPO)): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
             for p in sorted([*REPO.glob("ecoworker/*.py"), *REPO.glob("handlers/*.py")])}
    digest = hashlib.sha256(repr(sorted(files.items())).encode())
    dirty = _run_text(["git", "-C", str(REPO), "status", "--porcelain", "--", "ecoworker", "handlers"])
    return {"commit": _run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
            "uncommitted": [line.split(maxsplit=1)[-1] for line in dirty.splitlines()],
            "digest": digest.hexdigest()[:16], "files": files}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


async def machine_info(ctx: Ctx) -> dict[str, Any]:
    import asyncpg
    import celery
    import uvloop

    ctl = ctx.stack.get("ECOWORKER_RABBITMQCTL", "rabbitmqctl")
    rabbit = (await asyncio.to_thread(_run_text, [ctl, "version"])).splitlines()
    if not rabbit:  # no rabbitmqctl: the broker says it in the connection handshake
        conn = await aio_pika.connect(ctx.amqp_url)
        props = conn.transport.connection.server_properties if conn.transport else {}
        rabbit = [str(props.get("version", "?"))]
        await conn.close()
    pg = await asyncpg.connect(ctx.stack["POSTGRES_DSN"])
    try:
        pg_version = await pg.fetchval("SHOW server_version")
    finally:
        await pg.close()
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uvloop.__version__,
        "aio_pika": aio_pika.__version__,
        "celery": celery.__version__,
        "rabbitmq": rabbit[-1] if rabbit else "?",
        "postgresql": pg_version,
        "sqlite": sqlite3.sqlite_version,
        "journal_filesystem": _fs_type(ctx.tmp),
        **await asyncio.to_thread(fsync_probe, ctx.tmp),
        "loadavg_at_start": os.getloadavg(),
    }


# ---------------------------------------------------------------- py-spy (optional)


def spy_attach(py_spy: str, pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Sample `pid` (all threads, on-CPU only) until `spy_detach`; collapsed stacks to `out`."""
    time.sleep(0.3)  # let the interpreter come up before py-spy looks for it
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--nolineno",
           "--threads", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def spy_detach(spy: subprocess.Popen[bytes], out: Path, top: int = 15) -> dict[str, Any]:
    """Stop sampling, and summarise: samples per thread, top self-time and inclusive functions."""
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    threads: dict[str, int] = {}
    running: dict[str, int] = {}  # self time outside imports: the worker at work, not starting up
    ours: dict[str, int] = {}  # inclusive time of ecoworker's own functions, outside imports
    total = imports = 0
    for line in out.read_text().splitlines() if out.exists() else []:
        # "thread (TID): NAME;frame (file);frame (file) COUNT"
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        thread, *frames = stack.partition(": ")[2].split(";")
        thread = re.sub(r"\d+", "N", thread)  # Thread-7 → Thread-N: one row per kind of thread
        threads[thread] = threads.get(thread, 0) + count
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
            if any("importlib._bootstrap" in f for f in frames):
                imports += count
            else:
                running[frames[-1]] = running.get(frames[-1], 0) + count
                # cli.py and Worker.serve are under everything on the main thread: not informative
                for frame in {f for f in frames if "(ecoworker/" in f and "(ecoworker/cli.py)" not in f
                              and not f.startswith("Worker.serve ")}:
                    ours[frame] = ours.get(frame, 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        total += count

    def ranked(table: dict[str, int], of: int) -> list[dict[str, Any]]:
        best = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [{"function": k, "samples": v, "percent": round(100 * v / max(1, of), 1)} for k, v in best]

    return {"samples": total, "import_samples": imports, "raw": str(out), "threads": ranked(threads, total),
            "self": ranked(own, total), "inclusive": ranked(inclusive, total),
            "self_outside_imports": ranked(running, total - imports),
            "ecoworker_inclusive_outside_imports": ranked(ours, total - imports)}
