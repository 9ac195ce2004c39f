"""The chaos scenario (`make chaos`): three workers, 20,000 tasks, and everything going wrong at once.

On a private stack of its own (see conftest.private_stack), three `ecoworker run`
processes with separate journals consume one queue while tasks arrive in waves
with a poison corpus mixed in. Meanwhile a random worker is killed -9 (and
restarted) at a dozen random moments, the RabbitMQ node restarts, and PostgreSQL
is down for 30 s. Backpressure keeps most of the backlog in the broker, so work
is flowing whenever a fault lands. Afterwards: every task has its one result in
PostgreSQL, every poison message its one dead letter, no journal holds an
unfinished row or fails its integrity check, and the duplicate executions are
counted and bounded by what was in flight at each fault.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from tests import chaos_report as report
from tests.conftest import run_services
from tests.poison import PoisonMessage, poison_corpus
from tests.workers import REPO, WorkerProcess, journal_rows, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

GOOD = 20_000
FLAKY_OK, FLAKY_EXHAUST, SLEEPS = 550, 50, 2_000  # the rest are ecoworker.noop
WORKERS, PREFETCH, CONCURRENCY = 3, 200, 50
WAVES, WAVE_EVERY = 20, 3.5  # seconds between waves: publishing lasts ~70 s
KILLS, KILL_WINDOW = 12, (3.0, 68.0)
RABBIT_RESTARTS, RABBIT_RESTART_AT, PG_STOP_AT, PG_DOWN_FOR = 1, 25.0, 38.0, 30.0
POISON_HEADER = "x-chaos-poison"
MAX_ATTEMPTS = 4  # ecoworker.flaky: max_retries 3


@dataclass(frozen=True)
class Task:
    id: str
    name: str
    kwargs: dict[str, Any]
    status: str  # the final status it must reach
    attempts: int  # handler runs it needs

    def message(self) -> aio_pika.Message:
        body = orjson.dumps({"id": self.id, "task": self.name, "args": [], "kwargs": self.kwargs})
        return aio_pika.Message(body, content_type="application/json", message_id=self.id,
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


def make_tasks(rng: random.Random, run: str) -> list[Task]:
    tasks = [Task(f"chaos-{run}-x{i}", "ecoworker.flaky", {"fail_times": 10, "key": f"x{i}"}, "FAILURE", MAX_ATTEMPTS)
             for i in range(FLAKY_EXHAUST)]
    tasks += [Task(f"chaos-{run}-f{i}", "ecoworker.flaky", {"fail_times": 1, "key": f"f{i}"}, "SUCCESS", 2)
              for i in range(FLAKY_OK)]
    tasks += [Task(f"chaos-{run}-s{i}", "ecoworker.sleep", {"seconds": round(rng.uniform(0.05, 0.3), 3)},
                   "SUCCESS", 1) for i in range(SLEEPS)]
    tasks += [Task(f"chaos-{run}-n{i}", "ecoworker.noop", {"n": i}, "SUCCESS", 1)
              for i in range(GOOD - len(tasks))]
    rng.shuffle(tasks)
    return tasks


def poison_message(p: PoisonMessage) -> aio_pika.Message:
    props = dict(p.properties)
    props["headers"] = {**(props.get("headers") or {}), POISON_HEADER: p.name}
    props.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
    return aio_pika.Message(p.body, **props)


class Publisher:
    """Publishes waves with confirms on its own connection; reconnects after the broker restarts."""

    def __init__(self, url: str, queue: str) -> None:
        self.url, self.queue = url, queue
        self.conn: aio_pika.abc.AbstractConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.lock = asyncio.Lock()  # held per wave; the broker restart takes it between waves

    async def ensure(self) -> aio_pika.abc.AbstractChannel:
        if self.conn is None or self.conn.is_closed or self.channel is None or self.channel.is_closed:
            if self.conn is not None:
                await asyncio.wait_for(self.conn.close(), 5)
            self.conn = await aio_pika.connect(self.url, timeout=30)
            self.channel = await self.conn.channel(publisher_confirms=True)
            await self.channel.declare_queue(self.queue, durable=True)
        return self.channel

    async def wave(self, messages: list[aio_pika.Message]) -> None:
        async with self.lock:
            channel = await self.ensure()
            for start in range(0, len(messages), 500):
                await asyncio.gather(*(channel.default_exchange.publish(m, routing_key=self.queue)
                                       for m in messages[start:start + 500]))

    async def depth(self, queue: str) -> int:
        channel = await self.ensure()
        q = await channel.declare_queue(queue, durable=True, passive=True)
        return int(q.declaration_result.message_count or 0)

    async def drain(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        channel = await self.ensure()
        q = await channel.declare_queue(queue, durable=True)
        out = []
        while (m := await q.get(no_ack=True, fail=False)) is not None:
            out.append(m)
        return out

    async def close(self) -> None:
        if self.conn is not None and not self.conn.is_closed:
            await self.conn.close()


async def _services(faults: report.FaultLog, label: str, command: str, env: dict[str, str]) -> None:
    started = time.monotonic()
    await asyncio.to_thread(run_services, command, env=env, timeout=180)
    faults.add(label, f"{command} took {time.monotonic() - started:.1f}s")


@pytest.mark.timeout(900)
async def test_twenty_thousand_tasks_survive_kills_broker_restart_and_postgres_outage(private_stack, workers):
    """20,000 tasks + poison through 12 kill -9s, a broker restart and a PG outage: one result each."""
    services_env, stack = private_stack
    run = uuid.uuid4().hex[:8]
    queue = f"chaos-{run}"
    rng = random.Random(run)
    dsn = stack["POSTGRES_DSN"]
    migrate = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ecoworker.cli", "db", "migrate"], cwd=REPO, capture_output=True,
        text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "POSTGRES_DSN": dsn})
    assert migrate.returncode == 0, migrate.stderr

    tasks = make_tasks(rng, run)
    expected = {t.id: t for t in tasks}
    poison = [p for p in poison_corpus(queue) if p.name != "native_no_id"]  # see tests/poison.py
    assert len(poison) >= 20
    messages: list[aio_pika.Message] = [t.message() for t in tasks]
    for p in poison:
        messages.insert(rng.randrange(len(messages)), poison_message(p))
    per_wave = -(-len(messages) // WAVES)

    publisher = Publisher(stack["RABBITMQ_URL"], queue)
    await publisher.ensure()
    env = {"RABBITMQ_URL": stack["RABBITMQ_URL"], "POSTGRES_DSN": dsn, "ECOWORKER_PENDING_HIGH_WATER": "400",
           "ECOWORKER_PENDING_LOW_WATER": "150", "ECOWORKER_CONNECT_TIMEOUT": "180",
           "ECOWORKER_SYNC_BACKOFF_MAX": "3", "ECOWORKER_CHECKPOINT_INTERVAL": "20"}
    args = ("--prefetch", str(PREFETCH), "--concurrency", str(CONCURRENCY), "--grace-period", "10")
    pool: list[WorkerProcess] = [workers(queue, args=args, name=f"w{i}", **env) for i in range(WORKERS)]
    for w in pool:
        await asyncio.to_thread(w.wait_ready, 60)

    faults = report.FaultLog()

    def journals() -> list[report.JournalRow]:
        return [r for i, w in enumerate(pool) for r in report.read_journal(f"w{i}", w.wal)]

    async def publish() -> None:
        for n in range(WAVES):
            await asyncio.sleep(max(0.0, n * WAVE_EVERY - (time.monotonic() - faults.start)))
            await publisher.wave(messages[n * per_wave:(n + 1) * per_wave])
        faults.add("published", f"{len(messages)} messages in {WAVES} waves")

    async def kill() -> None:
        for at in sorted(rng.uniform(*KILL_WINDOW) for _ in range(KILLS)):
            await asyncio.sleep(max(0.0, at - (time.monotonic() - faults.start)))
            i = rng.randrange(WORKERS)
            done = sum(1 for r in journals() if r.status in ("SUCCESS", "FAILURE"))
            pool[i].kill()
            faults.add("kill -9", f"w{i} ({done} tasks finished so far)")
            await asyncio.sleep(rng.uniform(0.1, 1.5))
            pool[i].start()

    async def break_servers() -> None:
        await asyncio.sleep(RABBIT_RESTART_AT)
        async with publisher.lock:  # not in the middle of a wave: a lost confirm would make a duplicate
            faults.add("rabbitmq", "restarting the node")
            await _services(faults, "rabbitmq", "restart-rabbit", services_env)
            await publisher.ensure()
        await asyncio.sleep(max(0.0, PG_STOP_AT - (time.monotonic() - faults.start)))
        faults.add("postgresql", "stopping")
        await _services(faults, "postgresql", "stop-pg", services_env)
        await asyncio.sleep(PG_DOWN_FOR)
        await _services(faults, "postgresql", "start-pg", services_env)

    await asyncio.gather(publish(), kill(), break_servers())
    faults.add("faults over", "waiting for the work to finish")

    async with asyncpg.create_pool(dsn, min_size=1, max_size=2) as pg:
        good_ids = list(expected)

        async def everything_done() -> bool:
            rows = journals()
            if any(r.status in report.UNFINISHED for r in rows):
                return False
            shipped = await pg.fetchval("SELECT count(*) FROM task_results WHERE task_id = ANY($1::text[])", good_ids)
            return sum(owed(w) for w in pool) == 0 and shipped == GOOD and sum(unsynced(w) for w in pool) == 0 \
                and await publisher.depth(queue) == 0

        await wait_for(everything_done, 240, interval=1.0, message=lambda: "\n".join(
            f"--- w{i}\n{w.log_text()[-1500:]}" for i, w in enumerate(pool)))
        faults.add("all done", "")
        for i, w in enumerate(pool):
            await asyncio.to_thread(w.wait_ready, 60)  # a worker restarted a moment ago may still be starting
            assert await asyncio.to_thread(w.terminate, 60) == 0, f"w{i} did not stop cleanly"
        rows = journals()
        stored = await pg.fetch("SELECT task_id, status, error FROM task_results")
    results = {r["task_id"]: r["status"] for r in stored}
    # an exhausted task killed between its last failure and journaling it is buried by the crash-loop rule:
    # tolerated here (it was failing for good anyway), pinned down by test_kill_during_the_last_allowed_attempt…
    crash_buried = {r["task_id"] for r in stored if r["task_id"] in expected and r["status"] == "DEAD"
                    and expected[r["task_id"]].status == "FAILURE" and "crashed the worker" in (r["error"] or "")}

    checks = {f"w{i}": report.integrity(w.wal) for i, w in enumerate(pool)}
    dead = await publisher.drain(f"{queue}.dead")
    await publisher.close()

    verdict = report.judge(rows, {t.id: t.attempts for t in tasks}, POISON_HEADER)
    poison_copies, task_copies = report.count_dead_letters(dead, POISON_HEADER)
    bound = KILLS * (PREFETCH + CONCURRENCY) + RABBIT_RESTARTS * WORKERS * PREFETCH
    exhausted = [t.id for t in tasks if t.status == "FAILURE"]
    failed_in = Counter(r.task_id for r in rows if r.status in ("FAILURE", "DEAD"))  # each owes one dead letter
    # a dead letter beyond one per message: explained when a second journal took the same delivery (a kill or a
    # restart between one worker's commit and its ack); otherwise a kill in the one-statement window between a
    # confirm and its mark, or a broker restart that lost a confirm
    extra_poison = sum(poison_copies.values()) - len(poison)
    extra_failed = sum(task_copies[i] for i in exhausted) - len(exhausted)
    explained = sum(verdict.poison_journals.values()) - len(poison) + sum(failed_in[i] - 1 for i in exhausted)
    unexplained = extra_poison + extra_failed - explained

    print("\n\nCHAOS: faults injected\n" + faults.table())
    print("\nCHAOS: final counts\n" + report.summary([
        ("tasks published", f"{GOOD} ({GOOD - SLEEPS - FLAKY_OK - FLAKY_EXHAUST} noop, {SLEEPS} sleep, "
                            f"{FLAKY_OK} flaky→ok, {FLAKY_EXHAUST} flaky→exhausted)"),
        ("poison published", len(poison)),
        ("task_results SUCCESS", sum(1 for i in good_ids if results.get(i) == "SUCCESS")),
        ("task_results FAILURE", sum(1 for i in good_ids if results.get(i) == "FAILURE")),
        ("exhausted, buried DEAD at a kill", f"{len(crash_buried)} (crash rule; see the test below)"),
        ("task_results other rows", f"{len(results) - GOOD} (poison, DEAD)"),
        ("poison dead letters", f"{sum(poison_copies.values())} for {len(poison_copies)} messages"),
        ("exhausted-flaky dead letters", f"{sum(task_copies[i] for i in exhausted)} for {len(exhausted)} tasks"),
        ("journal rows", verdict.rows_by_journal),
        ("worker starts", {f"w{i}": w.starts for i, w in enumerate(pool)}),
        ("unfinished journal rows", len(verdict.unfinished)),
        ("integrity_check", checks),
        ("ids in >1 journal", verdict.ids_in_several_journals),
        ("rows re-run after a kill", verdict.reruns),
        ("tasks run more than needed", f"{verdict.duplicated_tasks} (bound {bound})"),
        ("extra handler executions", verdict.extra_executions),
        ("dead letters exactly once", "yes" if extra_poison == extra_failed == 0 else
         f"no: {extra_poison} extra poison, {extra_failed} extra exhausted ({explained} from a second journal)"),
    ]))

    # every good task: exactly one row in PostgreSQL, with the status it must end in
    wrong = {i: results.get(i) for i, t in expected.items() if results.get(i) != t.status and i not in crash_buried}
    assert not wrong, f"{len(wrong)} task(s) missing or wrong in task_results, e.g. {list(wrong.items())[:5]}"
    assert {s for i, s in results.items() if i not in expected} == {"DEAD"}
    assert len(results) == GOOD + len(poison)
    # every journal finished and sound
    assert verdict.unfinished == [], verdict.unfinished[:10]
    assert checks == {f"w{i}": "ok" for i in range(WORKERS)}
    # dead letters: each poison message and each exhausted task once; a second copy only where a second
    # journal took the same delivery (a kill or restart between its commit and its ack), or for a kill in the
    # one-statement window between a confirm and its mark
    assert set(poison_copies) == {p.name for p in poison}, set(poison_copies) ^ {p.name for p in poison}
    assert set(verdict.poison_journals) == {p.name for p in poison}
    assert all(task_copies[i] >= 1 for i in exhausted)
    assert extra_poison >= 0 and extra_failed >= 0
    assert unexplained <= KILLS + RABBIT_RESTARTS * WORKERS, (extra_poison, extra_failed, explained)
    # duplicates happen only around faults, bounded by what was in flight
    assert verdict.duplicated_tasks <= bound
    assert sum(w.starts for w in pool) == WORKERS + KILLS
    assert faults.count("kill -9") == KILLS


def owed(w: WorkerProcess) -> int:
    """Dead letters this worker's journal still owes."""
    return int(journal_rows(w.wal, "SELECT count(*) FROM task_wal WHERE dl_state = 1")[0][0])


def unsynced(w: WorkerProcess) -> int:
    """Terminal rows of this worker's journal not yet in PostgreSQL."""
    return int(journal_rows(w.wal, "SELECT count(*) FROM task_wal WHERE synced_to_postgres = 0")[0][0])


class TestKillDuringTheLastAttempt:
    async def test_kill_during_the_last_allowed_attempt_reruns_the_task(self, amqp, queue_name, workers, tmp_path):
        """A kill -9 during a task's last allowed attempt re-runs it after the restart, not buries it DEAD."""
        from ecoworker.journal import Journal, NewTask, Outcome

        await amqp.declare(queue_name)
        async with Journal.open(tmp_path / "last.db") as journal:  # the journal a kill leaves behind
            now = time.time()
            await journal.ingest([NewTask("last-attempt", "ecoworker.flaky", "w", queue_name, "[]",
                                          '{"fail_times": 3}', max_retries=3, created_at=now, not_before=now)])
            for attempt in range(1, MAX_ATTEMPTS + 1):
                [claimed] = await journal.claim(time.time(), 1)
                assert claimed.attempts == attempt
                if attempt < MAX_ATTEMPTS:  # attempts 1-3 fail transiently; the 4th, which would succeed, is cut
                    await journal.finish([Outcome("last-attempt", "PENDING", error="ConnectionError: flaky",
                                                  not_before=time.time(), retry_inc=1)])
        w = workers(queue_name, name="last")
        await wait_for(lambda: _status(w, "last-attempt") not in (None, "PENDING", "RUNNING"), 30)
        row = journal_rows(w.wal, "SELECT status, attempts, error FROM task_wal WHERE task_id = 'last-attempt'")[0]
        assert row["status"] == "SUCCESS", (
            f"ended {row['status']} after {row['attempts']} attempts: {row['error']!r}. One kill during its last "
            "attempt is not a crash loop: recovery must count crashed attempts, not all attempts (ecoworker/journal.py "
            "Journal.recover: bury only when attempts - retry_count >= max_retries + 1, and say so in the error).")


def _status(w: WorkerProcess, task_id: str) -> str | None:
    rows = journal_rows(w.wal, "SELECT status FROM task_wal WHERE task_id = ?", (task_id,))
    return rows[0]["status"] if rows else None
