"""The worker's HTTP port against a running `ecoworker run`: /metrics, /healthz, /readyz, /stats.

One worker on the shared stack serves most tests (each checks that a metric *moves*
when its event happens, so they do not depend on each other's counts). Broker
outages and backpressure use a second worker on the private stack, whose RabbitMQ
the tests stop and start.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import run_services
from tests.workers import Amqp, WorkerProcess, env_for_worker, free_port, journal_rows, statuses, wait_for

OUR_PREFIXES = ("ecoworker_", "wal_")
DEFAULT_COLLECTORS = ("python_", "process_")  # prometheus_client's own


class Metrics:
    """One scrape, parsed: `m("name", label="value")` is a sample's value (0.0 when absent)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for family in self.families for s in family.samples}

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, tuple(sorted(labels.items()))) in self.samples


@dataclass
class Running:
    """A worker, the queue it consumes and a connection to publish with."""

    worker: WorkerProcess
    amqp: Amqp
    queue: str

    def metrics(self) -> Metrics:
        status, body = self.worker.http("/metrics")
        assert status == 200, f"/metrics answered {status}"
        return Metrics(body.decode())

    async def publish(self, task: str, kwargs_list: list[dict[str, Any]], **fields: Any) -> list[str]:
        ids = []
        for kwargs in kwargs_list:
            task_id = f"{task}-{uuid.uuid4().hex[:12]}"
            body = orjson.dumps({"id": task_id, "task": task, "args": [], "kwargs": kwargs, **fields})
            await self.amqp.publish(self.queue, body, content_type="application/json")
            ids.append(task_id)
        return ids

    async def settle(self, ids: list[str], status: str = "SUCCESS", within: float = 30) -> None:
        await wait_for(lambda: all(statuses(self.worker.wal).get(i) == status for i in ids), within,
                       message=lambda: f"{ids} {status}\n" + self.worker.log_text()[-2000:])

    async def moves(self, name: str, at_least: float, within: float = 20, **labels: str) -> Metrics:
        """Wait until the sample `name{labels}` reaches `at_least`; returns that scrape."""
        seen: list[Metrics] = []

        def reached() -> Metrics | None:
            m = self.metrics()
            seen.append(m)
            return m if m(name, **labels) >= at_least else None

        return await wait_for(reached, within, message=lambda: f"{name}{labels} >= {at_least}, last "
                              f"{seen[-1](name, **labels) if seen else '?'}")


async def start(env: dict[str, str], tmp: Path, url: str,
                *args: str) -> tuple[WorkerProcess, aio_pika.abc.AbstractConnection, Amqp, str]:
    """A worker on a fresh queue, and a connection that has declared the queue."""
    queue = f"test-{uuid.uuid4().hex[:10]}"
    worker = WorkerProcess(tmp / "w.db", [queue], env, tmp / "w.log", args).start()
    conn = await aio_pika.connect(url)
    amqp = Amqp(conn, await conn.channel(publisher_confirms=True))
    await amqp.declare(queue)
    return worker, conn, amqp, queue


@pytest.fixture(scope="module", autouse=True)
async def _boot(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    """Start the shared worker as soon as the module starts (it takes seconds to import)."""
    worker, conn, amqp, queue = await start(env_for_worker(stack_env), tmp_path_factory.mktemp("metrics"),
                                            stack_env["RABBITMQ_URL"])
    try:
        yield Running(worker, amqp, queue)
    finally:
        worker.kill()
        await amqp.delete(queue, f"{queue}.dead")
        await conn.close()


@pytest.fixture(scope="module")
async def running(_boot: Running) -> Running:
    """One worker on the shared stack (with PostgreSQL), shared by this module's tests."""
    await asyncio.to_thread(_boot.worker.wait_ready, 90)
    return _boot


# ------------------------------------------------------------------ a broker we can stop
# These come first on purpose: the shared worker (started by `_boot`) imports and connects
# while the private stack starts, so neither wait is paid twice.

@dataclass
class Outage(Running):
    services_env: dict[str, str]
    url: str


@pytest.fixture(scope="module")
async def private(private_stack: tuple[dict[str, str], dict[str, str]], stack_env: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Outage]:
    """A worker on the private stack's RabbitMQ: one task at a time, a tiny backlog limit, and a
    PostgreSQL that is not there (readiness must not depend on it)."""
    services_env, values = private_stack
    url = values["RABBITMQ_URL"]
    env = env_for_worker(stack_env, RABBITMQ_URL=url,
                         POSTGRES_DSN=f"postgresql://postgres@127.0.0.1:{free_port()}/ecoworker",
                         ECOWORKER_PENDING_HIGH_WATER="3", ECOWORKER_PENDING_LOW_WATER="1")
    worker, conn, amqp, queue = await start(env, tmp_path_factory.mktemp("private"), url, "--concurrency", "1")
    try:
        await conn.close()  # the tests connect for themselves: this broker goes away
        await asyncio.to_thread(worker.wait_ready, 90)
        yield Outage(worker, amqp, queue, services_env, url)
    finally:
        worker.kill()


@contextlib.asynccontextmanager
async def connected(outage: Outage) -> AsyncIterator[Outage]:
    """A fresh connection to the private broker for publishing (the old one died with the broker)."""
    conn = await aio_pika.connect(outage.url)
    try:
        outage.amqp = Amqp(conn, await conn.channel(publisher_confirms=True))
        yield outage
    finally:
        await conn.close()


def readyz(worker: WorkerProcess) -> tuple[int, Any]:
    status, body = worker.http("/readyz")
    return status, orjson.loads(body) if body else None


class TestBackpressure:
    async def test_consuming_gauge_follows_pause_and_resume(self, private):
        """Above the PENDING high-water mark ecoworker_consuming is 0 and /readyz 503 'paused: backlog';
        once the backlog drains both recover, and every task completes."""
        async with connected(private) as w:
            ids = await w.publish("ecoworker.sleep", [{"seconds": 0.4}] * 8)
            # both read in one poll: the pause may end before a second look (8 tasks of 0.4 s)
            await wait_for(lambda: w.metrics()("ecoworker_consuming") == 0
                           and readyz(w.worker) == (503, {"ready": False, "reason": "paused: backlog"}), 20)
            await wait_for(lambda: w.metrics()("ecoworker_consuming") == 1, 30)
            assert readyz(w.worker)[0] == 200
            await w.settle(ids)

    async def test_ready_while_postgres_is_down(self, private):
        """With PostgreSQL unreachable, ecoworker_postgres_up is 0, wal_unsynced_tasks counts the results
        waiting in the journal, and the worker is still ready."""
        async with connected(private) as w:
            await w.settle(await w.publish("ecoworker.noop", [{}]))
        await wait_for(lambda: private.metrics()("ecoworker_sync_errors_total") >= 1, 20)
        m = private.metrics()
        assert m("ecoworker_postgres_up") == 0
        waiting = journal_rows(private.worker.wal, "SELECT count(*) FROM task_wal WHERE synced_to_postgres = 0 "
                               "AND status IN ('SUCCESS', 'FAILURE', 'DEAD', 'EXPIRED')")[0][0]
        assert m("wal_unsynced_tasks") == waiting > 0
        assert readyz(private.worker) == (200, {"ready": True, "reason": "consuming"})


class TestBrokerOutage:
    async def test_readiness_and_gauges_follow_the_broker(self, private):
        """While RabbitMQ is stopped, ecoworker_broker_connected and ecoworker_consuming are 0 and /readyz
        is 503 'broker disconnected' (/healthz stays 200); after it starts again they recover by
        themselves, without a restart, and new tasks run."""
        await asyncio.to_thread(run_services, "stop-rabbit", env=private.services_env, timeout=120)
        try:
            await wait_for(lambda: private.metrics()("ecoworker_broker_connected") == 0, 30)
            during = readyz(private.worker)
            assert private.worker.http("/healthz")[0] == 200
            assert private.metrics()("ecoworker_consuming") == 0
        finally:
            await asyncio.to_thread(run_services, "start-rabbit", env=private.services_env, timeout=180)
        await wait_for(lambda: readyz(private.worker)[0] == 200, 60, message=lambda: private.worker.log_text()[-2000:])
        m = private.metrics()
        assert (m("ecoworker_broker_connected"), m("ecoworker_consuming")) == (1, 1)
        assert private.worker.alive and private.worker.starts == 1
        assert "broker connection restored" in private.worker.log_text()
        async with connected(private) as w:
            ids = await w.publish("ecoworker.noop", [{"after": "outage"}])
            await w.settle(ids)
        assert during == (503, {"ready": False, "reason": "broker disconnected"}), (
            f"/readyz during the outage: {during}; Broker.connected trusts aio-pika's is_closed, which a "
            "connection lost (not closed by us) never sets")


# ------------------------------------------------------------------ /metrics format

class TestExposition:
    async def test_promtool_accepts_the_metrics(self, running):
        """`promtool check metrics` accepts a live scrape (after tasks ran, so every family has samples)."""
        ids = await running.publish("ecoworker.noop", [{}])
        await running.settle(ids)
        status, body = running.worker.http("/metrics")
        assert status == 200
        proc = await asyncio.to_thread(subprocess.run, ["promtool", "check", "metrics"], input=body,
                                       capture_output=True, timeout=30, check=False)
        problems = (proc.stdout + proc.stderr).decode().strip()
        assert proc.returncode == 0, f"promtool check metrics exited {proc.returncode}:\n{problems}"

    def test_names_and_help(self, running):
        """Every family we export is named ecoworker_* (or the seed's wal_*) and has a help text."""
        ours = [f for f in running.metrics().families if not f.name.startswith(DEFAULT_COLLECTORS)]
        assert ours
        assert [f.name for f in ours if not f.name.startswith(OUR_PREFIXES)] == []
        assert [f.name for f in ours if not f.documentation.strip()] == []

    def test_content_type(self, running):
        """/metrics answers in the Prometheus text exposition format."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{running.worker.port}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=")


# ------------------------------------------------------------------ the seed's gauges

class TestSeedGauges:
    async def test_wal_gauges_match_the_journal(self, running):
        """After tasks complete (and are shipped), wal_tasks_total{SUCCESS}, wal_unsynced_tasks and
        wal_size_bytes equal what the journal holds."""
        ids = await running.publish("ecoworker.noop", [{"i": i} for i in range(3)])
        await running.settle(ids)
        wal = running.worker.wal
        await wait_for(lambda: not journal_rows(wal, "SELECT 1 FROM task_wal WHERE synced_to_postgres = 0 "
                                                     "AND status = 'SUCCESS'"), 20)
        m = running.metrics()
        succeeded = sum(1 for s in statuses(wal).values() if s == "SUCCESS")
        assert m("wal_tasks_total", status="SUCCESS") == succeeded >= 3
        assert m("wal_unsynced_tasks") == 0
        size = wal.stat().st_size + (wal.with_name(wal.name + "-wal").stat().st_size
                                     if wal.with_name(wal.name + "-wal").exists() else 0)
        assert m("wal_size_bytes") == size > 0

    async def test_status_gauge_returns_to_zero_when_its_rows_move_on(self, running):
        """wal_tasks_total{status=RUNNING} shows running rows, and drops back to 0 once they finished."""
        ids = await running.publish("ecoworker.sleep", [{"seconds": 1.5}] * 2)
        await running.moves("wal_tasks_total", 2, status="RUNNING")
        await running.settle(ids)
        m = running.metrics()
        journal = {}
        for s in statuses(running.worker.wal).values():
            journal[s] = journal.get(s, 0) + 1
        exported = {labels[0][1]: v for (name, labels), v in m.samples.items() if name == "wal_tasks_total"}
        assert journal.get("RUNNING", 0) == 0
        assert m("wal_tasks_total", status="RUNNING") == 0, (
            f"wal_tasks_total is stale: exported {exported}, journal {journal} (a status with no rows "
            "left keeps its last value)")


# ------------------------------------------------------------------ each metric moves with its event

class TestCounters:
    async def test_received(self, running):
        """ecoworker_messages_received_total{queue} counts every delivery."""
        before = running.metrics()("ecoworker_messages_received_total", queue=running.queue)
        ids = await running.publish("ecoworker.noop", [{}] * 4)
        await running.moves("ecoworker_messages_received_total", before + 4, queue=running.queue)
        await running.settle(ids)

    async def test_duplicate(self, running):
        """A task id delivered again after it ran counts one ecoworker_messages_duplicate_total."""
        before = running.metrics()("ecoworker_messages_duplicate_total")
        body = orjson.dumps({"id": f"dup-{uuid.uuid4().hex}", "task": "ecoworker.noop", "kwargs": {}})
        await running.amqp.publish(running.queue, body, content_type="application/json")
        await running.settle([orjson.loads(body)["id"]])
        await running.amqp.publish(running.queue, body, content_type="application/json")
        m = await running.moves("ecoworker_messages_duplicate_total", before + 1)
        assert m("ecoworker_messages_duplicate_total") == before + 1

    async def test_dead_lettered_by_reason(self, running):
        """A bad message counts ecoworker_messages_dead_lettered_total{reason} and, once its copy is
        confirmed, ecoworker_dead_letters_published_total."""
        m0 = running.metrics()
        await running.amqp.publish(running.queue, b"{not json", content_type="application/json",
                                   message_id=f"bad-{uuid.uuid4().hex}")
        await running.moves("ecoworker_messages_dead_lettered_total",
                            m0("ecoworker_messages_dead_lettered_total", reason="bad_json") + 1, reason="bad_json")
        await running.moves("ecoworker_dead_letters_published_total",
                            m0("ecoworker_dead_letters_published_total") + 1)
        await running.amqp.drain(f"{running.queue}.dead")

    async def test_tasks_finished_and_duration(self, running):
        """Each run counts ecoworker_tasks_finished_total{task,status} and one task_duration observation."""
        m0 = running.metrics()
        ids = await running.publish("ecoworker.sleep", [{"seconds": 0.2}] * 3)
        await running.settle(ids)
        m = await running.moves("ecoworker_tasks_finished_total",
                                m0("ecoworker_tasks_finished_total", task="ecoworker.sleep", status="SUCCESS") + 3,
                                task="ecoworker.sleep", status="SUCCESS")
        count = "ecoworker_task_duration_seconds_count"
        assert m(count, task="ecoworker.sleep") == m0(count, task="ecoworker.sleep") + 3
        took = m("ecoworker_task_duration_seconds_sum", task="ecoworker.sleep") - m0(
            "ecoworker_task_duration_seconds_sum", task="ecoworker.sleep")
        assert 0.55 <= took < 3
        assert m("ecoworker_task_duration_seconds_bucket", task="ecoworker.sleep", le="0.1") == m0(
            "ecoworker_task_duration_seconds_bucket", task="ecoworker.sleep", le="0.1")

    async def test_retries(self, running):
        """A transient failure counts ecoworker_task_retries_total{task}; the task then succeeds."""
        m0 = running.metrics()
        ids = await running.publish("ecoworker.flaky", [{"fail_times": 1}])
        await running.settle(ids)
        m = await running.moves("ecoworker_task_retries_total",
                                m0("ecoworker_task_retries_total", task="ecoworker.flaky") + 1, task="ecoworker.flaky")
        assert m("ecoworker_tasks_finished_total", task="ecoworker.flaky", status="SUCCESS") == m0(
            "ecoworker_tasks_finished_total", task="ecoworker.flaky", status="SUCCESS") + 1

    async def test_ingest_batch_and_ack_latency(self, running):
        """Ingested deliveries are observed in ecoworker_ingest_batch_size (sum = deliveries) and each
        one in ecoworker_delivery_to_ack_seconds; commits in ecoworker_ingest_commit_seconds."""
        m0 = running.metrics()
        ids = await running.publish("ecoworker.noop", [{"i": i} for i in range(20)])
        m = await running.moves("ecoworker_delivery_to_ack_seconds_count",
                                m0("ecoworker_delivery_to_ack_seconds_count") + 20)
        await running.settle(ids)
        batches = m("ecoworker_ingest_batch_size_count") - m0("ecoworker_ingest_batch_size_count")
        assert m("ecoworker_ingest_batch_size_sum") - m0("ecoworker_ingest_batch_size_sum") == 20
        assert 1 <= batches <= 20
        assert m("ecoworker_ingest_commit_seconds_count") - m0("ecoworker_ingest_commit_seconds_count") == batches
        assert m("ecoworker_delivery_to_ack_seconds_count") == m0("ecoworker_delivery_to_ack_seconds_count") + 20

    async def test_in_flight(self, running):
        """ecoworker_tasks_in_flight shows handlers while they run and returns to 0 after."""
        ids = await running.publish("ecoworker.sleep", [{"seconds": 1.5}] * 3)
        await running.moves("ecoworker_tasks_in_flight", 3)
        await running.settle(ids)
        assert running.metrics()("ecoworker_tasks_in_flight") == 0


class TestProcessGauges:
    async def test_state_gauges(self, running):
        """Connected to RabbitMQ and PostgreSQL and consuming: the three state gauges are 1, and
        deliveries reach the journal inline (no task each, `ecoworker.deliveries`)."""
        m = await running.moves("ecoworker_postgres_up", 1)
        assert m("ecoworker_broker_connected") == 1
        assert m("ecoworker_consuming") == 1
        assert m("ecoworker_deliveries_inline") == 1

    def test_process_and_loop(self, running):
        """Resident memory (the worker's and its journal writer's) and open file descriptors are
        positive; event-loop lag is exported and small."""
        m = running.metrics()
        assert m("ecoworker_process_resident_memory_bytes") > 10 * 1024 * 1024
        assert m("ecoworker_journal_writer_resident_memory_bytes") > 5 * 1024 * 1024  # on by default
        assert m("ecoworker_process_open_fds") > 3
        assert m.has("ecoworker_event_loop_lag_seconds")
        assert 0 <= m("ecoworker_event_loop_lag_seconds") < 1
        assert m.has("ecoworker_sync_lag_seconds") and m.has("ecoworker_sqlite_wal_file_bytes")


# ------------------------------------------------------------------ probes and /stats

class TestProbes:
    def test_healthz(self, running):
        """/healthz answers 200 with a JSON status."""
        status, body = running.worker.http("/healthz")
        assert (status, orjson.loads(body)) == (200, {"status": "ok"})

    def test_readyz_when_consuming(self, running):
        """/readyz answers 200 with the reason 'consuming' while the worker consumes."""
        status, body = running.worker.http("/readyz")
        assert (status, orjson.loads(body)) == (200, {"ready": True, "reason": "consuming"})

    async def test_stats_has_the_seed_shape(self, running):
        """/stats is the seed's get_stats(): by_status, sync totals and wal_size_mb, matching the journal."""
        ids = await running.publish("ecoworker.noop", [{}])
        await running.settle(ids)
        status, body = running.worker.http("/stats")
        assert status == 200
        stats = orjson.loads(body)
        assert set(stats) == {"by_status", "sync", "wal_size_mb"}
        assert set(stats["sync"]) == {"total", "synced", "unsynced"}
        journal: dict[str, int] = {}
        for s in statuses(running.worker.wal).values():
            journal[s] = journal.get(s, 0) + 1
        assert stats["by_status"] == journal
        assert stats["sync"]["total"] == stats["sync"]["synced"] + stats["sync"]["unsynced"]
        assert isinstance(stats["wal_size_mb"], float) and stats["wal_size_mb"] > 0

    def test_unknown_path(self, running):
        """Other paths answer 404."""
        assert running.worker.http("/nope")[0] == 404




# ------------------------------------------------------------------ the HTTP server itself

def _get(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@contextlib.asynccontextmanager
async def serving(ready: tuple[bool, str] = (True, "consuming"),
                  stats: dict[str, Any] | None = None) -> AsyncIterator[int]:
    from ecoworker.metrics import MetricsServer

    async def get_stats() -> dict[str, Any]:
        return stats or {}

    server = MetricsServer("127.0.0.1", 0, lambda: ready, get_stats)
    port = await server.start()
    try:
        yield port
    finally:
        await server.close()


class TestServer:
    async def test_healthz_fails_while_the_event_loop_is_blocked(self, monkeypatch):
        """/healthz is 200 while the loop turns and 503 'event loop not answering' while a callback
        blocks it longer than LOOP_ANSWER_SECONDS; it answers 200 again once the loop is free."""
        from ecoworker import metrics

        monkeypatch.setattr(metrics, "LOOP_ANSWER_SECONDS", 0.3)
        async with serving() as port:
            assert (await asyncio.to_thread(_get, port, "/healthz"))[0] == 200
            answer: list[tuple[int, dict[str, str], bytes]] = []
            probe = threading.Thread(target=lambda: answer.append(_get(port, "/healthz")))
            probe.start()
            time.sleep(1.5)  # noqa: ASYNC251 (on purpose: blocks the event loop, as a stuck handler would)
            await asyncio.to_thread(probe.join, 10)
            status, _, body = answer[0]
            assert (status, orjson.loads(body)["status"]) == (503, "event loop not answering")
            assert (await asyncio.to_thread(_get, port, "/healthz"))[0] == 200

    async def test_paths(self):
        """/readyz carries the worker's readiness (503 with its reason), /stats the stats, /metrics
        the exposition (OpenMetrics when asked for); other paths are 404 and other methods 405."""
        async with serving(ready=(False, "paused: backlog"), stats={"pending": 7}) as port:
            def get(path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
                return _get(port, path, **kw)

            status, headers, body = await asyncio.to_thread(get, "/readyz")
            assert (status, orjson.loads(body)) == (503, {"ready": False, "reason": "paused: backlog"})
            assert headers["Content-Type"] == "application/json"
            status, _, body = await asyncio.to_thread(get, "/stats")
            assert (status, orjson.loads(body)) == (200, {"pending": 7})
            status, headers, body = await asyncio.to_thread(get, "/metrics")
            assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
            assert b"ecoworker_tasks_in_flight" in body
            accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
            status, headers, body = await asyncio.to_thread(lambda: get("/metrics", headers=accept))
            assert headers["Content-Type"].startswith("application/openmetrics-text")
            assert body.rstrip().endswith(b"# EOF")
            assert (await asyncio.to_thread(get, "/nope"))[0] == 404
            assert (await asyncio.to_thread(lambda: get("/healthz", method="POST")))[0] == 405

    async def test_a_silent_client_is_dropped(self, monkeypatch, capsys):
        """A connection that sends nothing is closed by the server after its read timeout (10 s,
        0.3 s here), so idle or half-open clients cannot pile up threads; probes still answer,
        and no traceback lands on stderr."""
        from ecoworker import metrics

        monkeypatch.setattr(metrics, "READ_TIMEOUT_SECONDS", 0.3)
        async with serving() as port:
            def wait_for_close() -> float:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
                    started = time.monotonic()
                    assert idle.recv(1) == b""  # closed by the server, not timed out here
                    return time.monotonic() - started

            assert await asyncio.to_thread(wait_for_close) < 2
            assert (await asyncio.to_thread(_get, port, "/healthz"))[0] == 200
        assert "Traceback" not in capsys.readouterr().err

    async def test_close_frees_the_port(self):
        """After close() the port refuses connections (the server thread has stopped)."""
        async with serving() as port:
            assert (await asyncio.to_thread(_get, port, "/healthz"))[0] == 200
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
