"""End-to-end tests of `ecoworker run` against a real RabbitMQ, with real processes."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.workers import descendants, journal_rows, process_alive, statuses, wait_for


async def _all_done(amqp: Any, queue: str, wal: Any, ids: list[str], final: tuple[str, ...] = ("SUCCESS",)) -> bool:
    st = statuses(wal)
    return all(st.get(i) in final for i in ids) and await amqp.depth(queue) == 0


class TestEndToEnd:
    async def test_every_task_succeeds_once_and_queue_empties(self, amqp, queue_name, workers):
        """N noop tasks published before start all end SUCCESS exactly once, with their result, and the queue drains."""
        ids = await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"n": i} for i in range(500)])
        w = workers(queue_name)
        await wait_for(lambda: _all_done(amqp, queue_name, w.wal, ids), 60, message=lambda: w.log_text()[-2000:])
        rows = journal_rows(w.wal)
        assert sorted(r["task_id"] for r in rows) == sorted(ids)
        results = {r["task_id"]: orjson.loads(r["result"]) for r in rows}
        assert results[ids[7]] == {"n": 7}
        assert all(r["attempts"] == 1 for r in rows)

    async def test_a_queue_with_a_long_name_is_consumed(self, amqp, workers):
        """A queue name of 240 bytes (AMQP allows 255) still gets a consumer: the worker's
        consumer tag, which names the queue, stays within its own 255 bytes."""
        queue = "long-" + "q" * 235
        amqp.created += [queue, f"{queue}.dead"]
        ids = await amqp.publish_tasks(queue, "ecoworker.noop", [{"n": i} for i in range(5)])
        w = workers(queue)
        await wait_for(lambda: _all_done(amqp, queue, w.wal, ids), 30, message=lambda: w.log_text()[-2000:])

    async def test_duplicate_delivery_is_acked_not_rerun(self, amqp, queue_name, workers):
        """A task id delivered twice runs once; the second copy is acked and counted as a duplicate."""
        body = orjson.dumps({"id": "dup-1", "task": "ecoworker.noop", "kwargs": {"x": 1}})
        await amqp.declare(queue_name)
        w = workers(queue_name)
        w.wait_ready()
        await amqp.publish(queue_name, body, content_type="application/json")
        await wait_for(lambda: statuses(w.wal).get("dup-1") == "SUCCESS", 20)
        await amqp.publish(queue_name, body, content_type="application/json")
        await wait_for(lambda: b"ecoworker_messages_duplicate_total 1.0" in w.http("/metrics")[1], 20)
        assert await amqp.depth(queue_name) == 0
        assert journal_rows(w.wal, "SELECT attempts FROM task_wal WHERE task_id='dup-1'")[0][0] == 1


class TestKill:
    @pytest.mark.slow
    @pytest.mark.parametrize("writer_process", ["0", "1"], ids=["in-thread", "writer-process"])
    async def test_kill_minus_nine_loses_nothing(self, amqp, queue_name, workers, writer_process):
        """5,000 tasks survive ≥ 5 kill -9s at random moments: each ends SUCCESS once and the queue is
        empty; with the journal's writer process, no writer outlives its killed worker."""
        ids = await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"n": i} for i in range(5000)])
        w = workers(queue_name, args=("--prefetch", "300"), ECOWORKER_JOURNAL_PROCESS=writer_process)
        rng = random.Random(7)
        kills = with_writer = 0
        while kills < 6:
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            writers = _writers(w.proc.pid)  # none yet while the worker is still starting
            assert len(writers) <= int(writer_process), writers
            w.kill()
            await wait_for(partial(_all_gone, writers), 10, message=f"writer process {writers} outlived its worker")
            kills += 1
            with_writer += bool(writers)
            done = sum(1 for s in statuses(w.wal).values() if s == "SUCCESS")
            print(f"kill {kills}: {done} done")
            w.start()
        await wait_for(lambda: _all_done(amqp, queue_name, w.wal, ids), 120, message=lambda: w.log_text()[-2000:])
        rows = journal_rows(w.wal)
        assert len(rows) == len(ids) == len({r["task_id"] for r in rows})
        assert {r["status"] for r in rows} == {"SUCCESS"}
        assert w.starts == 7
        assert with_writer >= (3 if writer_process == "1" else 0), f"only {with_writer} kills hit a running writer"


class TestCelery:
    async def test_celery_send_task_runs_and_countdown_is_honoured(self, amqp, queue_name, workers, stack_env):
        """An unchanged Celery producer's send_task runs; a countdown delays the run locally."""
        celery = pytest.importorskip("celery")
        app = celery.Celery("producer", broker=stack_env["RABBITMQ_URL"])
        app.conf.task_serializer = "json"
        await amqp.declare(queue_name)
        w = workers(queue_name)
        w.wait_ready()
        now = time.time()
        r1 = await asyncio.to_thread(app.send_task, "ecoworker.noop", kwargs={"via": "celery"}, queue=queue_name)
        r2 = await asyncio.to_thread(app.send_task, "ecoworker.noop", kwargs={"later": True}, queue=queue_name,
                                     countdown=2)
        await wait_for(lambda: statuses(w.wal).get(r1.id) == "SUCCESS", 20)
        await wait_for(lambda: statuses(w.wal).get(r2.id) == "SUCCESS", 20)
        row = journal_rows(w.wal, "SELECT result, started_at FROM task_wal WHERE task_id=?", (r2.id,))[0]
        assert orjson.loads(row["result"]) == {"later": True}
        assert row["started_at"] >= now + 1.9
        app.close()


class TestPoison:
    async def test_poison_corpus_is_dead_lettered_once_and_good_tasks_run(self, amqp, queue_name, workers):
        """≥ 20 kinds of bad message, interleaved with good ones: good ones succeed, each bad one is in .dead once."""
        from tests.poison import good_message, poison_corpus

        # aiormq gives every published message a random message_id, which (by design) stands in
        # for a missing body id: an id-less native envelope cannot be sent through aio-pika.
        corpus = [p for p in poison_corpus(queue_name) if p.name != "native_no_id"]
        assert len(corpus) >= 20
        await amqp.declare(queue_name)
        good = []
        for i, bad in enumerate(corpus):
            task_id = f"good-{i}"
            body, props = good_message(task_id, i=i)
            await amqp.publish(queue_name, body, **props)
            await amqp.publish(queue_name, bad.body, **bad.properties)
            good.append(task_id)
        w = workers(queue_name)
        await wait_for(lambda: _all_done(amqp, queue_name, w.wal, good), 30)
        dead_q = f"{queue_name}.dead"
        await wait_for(lambda: _depth_at_least(amqp, dead_q, len(corpus)), 20)
        await asyncio.sleep(1)  # nothing more should arrive
        dead = await amqp.drain(dead_q)
        assert len(dead) == len(corpus)
        reasons = sorted(str(m.headers["x-ecoworker-error"]).split(":")[0] for m in dead)
        assert reasons == sorted(p.reason for p in corpus)
        assert all(m.headers["x-original-queue"] == queue_name for m in dead)
        assert w.alive
        # a bad message that comes again (same message_id, as a broker redelivery has) is
        # recognised and acked without a second dead letter
        props = {**corpus[0].properties, "message_id": f"again-{queue_name}"}
        for expected in (1, 1):
            await amqp.publish(queue_name, corpus[0].body, **props)
            await wait_for(lambda: _depth_is(amqp, queue_name, 0), 10)
            await asyncio.sleep(1)
            assert await amqp.depth(dead_q) == expected


async def _depth_at_least(amqp: Any, queue: str, n: int) -> bool:
    return await amqp.depth(queue) >= n


async def _depth_is(amqp: Any, queue: str, n: int) -> bool:
    return await amqp.depth(queue) == n


class TestShutdown:
    @pytest.mark.parametrize("writer_process", ["0", "1"], ids=["in-thread", "writer-process"])
    async def test_sigterm_exits_zero_and_restart_completes_everything(self, amqp, queue_name, workers,
                                                                        writer_process):
        """SIGTERM while sleep tasks run exits 0 within the grace period; after a restart every task
        completes. The journal's writer process, signalled too (as a terminal's whole process group
        is), keeps serving the shutdown and exits with the worker."""
        ids = await amqp.publish_tasks(queue_name, "ecoworker.sleep", [{"seconds": 30} for _ in range(3)]
                                       + [{"seconds": 0.5} for _ in range(30)])
        w = workers(queue_name, args=("--concurrency", "10", "--grace-period", "3"),
                    ECOWORKER_JOURNAL_PROCESS=writer_process)
        w.wait_ready()
        await wait_for(lambda: sum(s == "SUCCESS" for s in statuses(w.wal).values()) >= 5, 20)
        writers = _writers(w.proc.pid)
        assert len(writers) == int(writer_process), writers
        for pid in writers:
            os.kill(pid, signal.SIGTERM)
        started = time.monotonic()
        assert await asyncio.to_thread(w.terminate, 20) == 0
        await wait_for(partial(_all_gone, writers), 10)
        assert time.monotonic() - started < 3 + 5
        assert "returned to PENDING" in w.log_text()
        rows = journal_rows(w.wal)
        assert "RUNNING" not in {r["status"] for r in rows}
        long_ones = set(ids[:3])
        assert all(r["attempts"] == 0 for r in rows if r["task_id"] in long_ones and r["status"] == "PENDING")
        w.start()
        await wait_for(lambda: _all_done(amqp, queue_name, w.wal, ids[3:]), 30)

    async def test_second_signal_exits_at_once(self, amqp, queue_name, workers):
        """A second SIGTERM during the grace period exits immediately; the journal keeps the tasks."""
        ids = await amqp.publish_tasks(queue_name, "ecoworker.sleep", [{"seconds": 60}])
        w = workers(queue_name, args=("--grace-period", "60"))
        await wait_for(lambda: statuses(w.wal).get(ids[0]) == "RUNNING", 20)
        assert w.proc is not None
        w.proc.terminate()
        await asyncio.sleep(0.5)
        w.proc.terminate()
        assert w.wait_exit(5) not in (None, 0)
        assert statuses(w.wal)[ids[0]] == "RUNNING"  # recovered and re-run at the next start


class TestBrokerRestart:
    @pytest.mark.slow
    async def test_rabbitmq_restart_mid_run_is_survived(self, private_stack, workers):
        """The RabbitMQ node restarts mid-run; the worker reconnects by itself and every task completes."""
        import aio_pika

        from tests.conftest import run_services
        from tests.workers import Amqp

        services_env, stack = private_stack
        queue = "restart-test"

        async def connect() -> Amqp:
            conn = await aio_pika.connect(stack["RABBITMQ_URL"])
            return Amqp(conn, await conn.channel(publisher_confirms=True))

        amqp = await connect()
        ids = await amqp.publish_tasks(queue, "ecoworker.sleep", [{"seconds": 0.1} for _ in range(3000)])
        await amqp.conn.close()
        # a small backlog limit keeps most messages in the broker while it restarts
        w = workers(queue, args=("--concurrency", "20"), RABBITMQ_URL=stack["RABBITMQ_URL"],
                    ECOWORKER_PENDING_HIGH_WATER="200", ECOWORKER_PENDING_LOW_WATER="100")
        await wait_for(lambda: sum(s == "SUCCESS" for s in statuses(w.wal).values()) >= 200, 30)
        await asyncio.to_thread(run_services, "restart-rabbit", env=services_env)
        amqp = await connect()
        try:
            await wait_for(lambda: _all_done(amqp, queue, w.wal, ids), 90, message=lambda: w.log_text()[-2000:])
            assert w.alive and w.starts == 1
            assert "broker connection restored" in w.log_text()
        finally:
            await amqp.delete(queue, f"{queue}.dead")
            await amqp.conn.close()


class TestRetries:
    async def test_flaky_succeeds_on_third_attempt_with_backoff(self, amqp, queue_name, workers):
        """flaky(fail_times=2) succeeds on attempt 3, after back-off delays between attempts."""
        ids = await amqp.publish_tasks(queue_name, "ecoworker.flaky", [{"fail_times": 2, "key": "a"}])
        w = workers(queue_name)
        await wait_for(lambda: statuses(w.wal).get(ids[0]) == "SUCCESS", 30)
        row = journal_rows(w.wal, "SELECT * FROM task_wal WHERE task_id=?", (ids[0],))[0]
        assert row["attempts"] == 3 and row["retry_count"] == 2
        assert orjson.loads(row["result"]) == {"attempt": 3, "key": "a"}
        # base 0.5 s doubling, jitter ±25 %: at least 0.375 + 0.75 s between the first start and the end
        assert row["completed_at"] - row["created_at"] >= 1.1

    async def test_exhausted_retries_fail_with_a_dead_letter_copy(self, amqp, queue_name, workers):
        """flaky(fail_times=10) ends FAILURE after max_retries+1 attempts, and one copy lands in .dead."""
        ids = await amqp.publish_tasks(queue_name, "ecoworker.flaky", [{"fail_times": 10}])
        w = workers(queue_name)
        await wait_for(lambda: statuses(w.wal).get(ids[0]) == "FAILURE", 40)
        row = journal_rows(w.wal, "SELECT * FROM task_wal WHERE task_id=?", (ids[0],))[0]
        assert row["attempts"] == 4 and "gave up after 4 attempt(s)" in row["error"]
        await wait_for(lambda: _depth_at_least(amqp, f"{queue_name}.dead", 1), 10)
        [dead] = await amqp.drain(f"{queue_name}.dead")
        assert dead.headers["x-ecoworker-task-id"] == ids[0]
        assert orjson.loads(dead.body)["task"] == "ecoworker.flaky"

    async def test_expired_task_is_not_run(self, amqp, queue_name, workers):
        """A task whose `expires` passed before it could run ends EXPIRED without running."""
        await amqp.declare(queue_name)
        body = orjson.dumps({"id": "exp-1", "task": "ecoworker.sleep", "kwargs": {"seconds": 5},
                             "expires": "2000-01-01T00:00:00+00:00"})
        await amqp.publish(queue_name, body, content_type="application/json")
        w = workers(queue_name)
        await wait_for(lambda: statuses(w.wal).get("exp-1") == "EXPIRED", 20)


class TestCrashLoop:
    async def test_task_that_kills_the_worker_ends_dead(self, amqp, queue_name, workers):
        """A task that kills its worker runs max_attempts times across restarts, then is buried DEAD."""
        ids = await amqp.publish_tasks(queue_name, "ecoworker.crash", [{}])
        w = workers(queue_name, ECOWORKER_TEST_TASKS="1")
        for _ in range(8):
            code = await asyncio.to_thread(w.wait_exit, 30)
            if code is None:
                break  # it stayed up: the task is no longer run
            w.start()
        await wait_for(lambda: statuses(w.wal).get(ids[0]) == "DEAD", 20)
        row = journal_rows(w.wal, "SELECT * FROM task_wal WHERE task_id=?", (ids[0],))[0]
        assert row["attempts"] == 4
        assert w.starts == 5  # 4 crashing runs, then one that buries it and stays up
        assert "buried as DEAD" in w.log_text() and "1 buried as DEAD" in w.log_text()
        await wait_for(lambda: _depth_at_least(amqp, f"{queue_name}.dead", 1), 10)


_TIMES = "SELECT task_id, attempts, created_at, started_at, completed_at FROM task_wal"


def _peak_overlap(rows: list[Any], seconds: float) -> int:
    """Most handlers running at once, from each row's completion time minus its known sleep."""
    events = sorted([(r["completed_at"] - seconds, 1) for r in rows] + [(r["completed_at"], -1) for r in rows])
    peak = running = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


class TestStartAtIntake:
    """A due row the scheduler has a slot for is journaled straight as RUNNING: one write, not two."""

    async def test_idle_worker_starts_rows_in_the_ingest_write(self, amqp, queue_name, workers):
        """Tasks arriving at an idle worker are journaled RUNNING (attempt 1, started at intake) and run once."""
        w = workers(queue_name)
        await asyncio.to_thread(w.wait_ready)
        ids = []
        for i in range(20):  # one at a time: each finds free slots and no backlog
            ids += await amqp.publish_tasks(queue_name, "ecoworker.noop", [{"n": i}])
            await asyncio.sleep(0.02)
        await wait_for(lambda: _all_done(amqp, queue_name, w.wal, ids), 30)
        rows = journal_rows(w.wal, _TIMES)
        assert sorted(r["task_id"] for r in rows) == sorted(ids)
        assert all(r["attempts"] == 1 for r in rows)
        at_intake = [r for r in rows if r["started_at"] == r["created_at"]]
        assert len(at_intake) >= 10, [(r["created_at"], r["started_at"]) for r in rows]

    async def test_intake_starts_keep_the_global_limit(self, amqp, queue_name, workers):
        """With intake starts and claims both filling slots, no more than --concurrency handlers run at once."""
        ids = await amqp.publish_tasks(queue_name, "ecoworker.sleep", [{"seconds": 0.05} for _ in range(60)])
        w = workers(queue_name, args=("--concurrency", "5", "--prefetch", "20"))
        await wait_for(lambda: _all_done(amqp, queue_name, w.wal, ids), 60)
        # a second wave into the now idle worker, trickled so that intake starts happen
        for _ in range(30):
            ids += await amqp.publish_tasks(queue_name, "ecoworker.sleep", [{"seconds": 0.05}] * 3)
            await asyncio.sleep(0.03)
        await wait_for(lambda: _all_done(amqp, queue_name, w.wal, ids), 60)
        rows = journal_rows(w.wal, _TIMES)
        assert len(rows) == len(ids) == 150
        assert any(r["started_at"] == r["created_at"] for r in rows), "no row was started at intake"
        assert _peak_overlap(rows, 0.04) <= 5

    async def test_intake_starts_keep_a_tasks_own_limit(self, amqp, queue_name, workers):
        """A task with its own concurrency limit (2) never runs more than that, however it was started."""
        w = workers(queue_name, ECOWORKER_TEST_TASKS="1")
        await asyncio.to_thread(w.wait_ready)
        ids: list[str] = []
        for _ in range(25):
            ids += await amqp.publish_tasks(queue_name, "ecoworker.sleep_limited", [{"seconds": 0.05}] * 4)
            await asyncio.sleep(0.03)
        await wait_for(lambda: _all_done(amqp, queue_name, w.wal, ids), 60)
        rows = journal_rows(w.wal, _TIMES)
        assert len(rows) == 100 and all(r["attempts"] == 1 for r in rows)
        assert any(r["started_at"] == r["created_at"] for r in rows), "no row was started at intake"
        assert _peak_overlap(rows, 0.04) == 2


class TestBackpressure:
    async def test_consumer_pauses_above_high_water_and_resumes(self, amqp, queue_name, workers):
        """Above the PENDING high-water mark the consumer pauses (unready, consuming=0); below low water it resumes."""
        ids = await amqp.publish_tasks(queue_name, "ecoworker.sleep", [{"seconds": 0.05} for _ in range(400)])
        w = workers(queue_name, args=("--concurrency", "2", "--prefetch", "50"),
                    ECOWORKER_PENDING_HIGH_WATER="60", ECOWORKER_PENDING_LOW_WATER="20")

        def paused() -> bool:
            code, body = w.http("/readyz")
            return code == 503 and b"backlog" in body

        await wait_for(paused, 30)
        assert b"ecoworker_consuming 0.0" in w.http("/metrics")[1]
        assert await amqp.depth(queue_name) > 0  # the rest waits in the broker, not in this pod
        await wait_for(lambda: _all_done(amqp, queue_name, w.wal, ids), 120)
        assert "consumer resumed" in w.log_text()


def test_missing_broker_is_a_clear_error(tmp_path, stack_env):
    """An unreachable broker at start is one clear error line and exit code 2, not a traceback."""
    from tests.workers import env_for_worker, free_port

    env = env_for_worker(stack_env, RABBITMQ_URL=f"amqp://guest:s3cr3t@127.0.0.1:{free_port()}/",
                         ECOWORKER_CONNECT_TIMEOUT="1")
    proc = subprocess.run([sys.executable, "-m", "ecoworker.cli", "--queue", "q", "--wal", str(tmp_path / "j.db"),
                           "--metrics-port", "-1"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "cannot connect to RabbitMQ" in proc.stderr and "Traceback" not in proc.stderr
    assert "s3cr3t" not in proc.stderr + proc.stdout


class TestJournalLock:
    async def test_second_worker_and_drain_refuse_a_journal_in_use(self, amqp, queue_name, workers, tmp_path,
                                                                   stack_env):
        """While a worker runs, a second worker on its journal and `wal drain` refuse (exit 2) naming its pid."""
        from tests.workers import WorkerProcess, env_for_worker

        ids = await amqp.publish_tasks(queue_name, "ecoworker.sleep", [{"seconds": 30}])
        w = workers(queue_name)
        w.wait_ready()
        await wait_for(lambda: statuses(w.wal).get(ids[0]) == "RUNNING", 20)
        env = env_for_worker(stack_env)
        second = WorkerProcess(w.wal, [queue_name], env, tmp_path / "second.log").start()
        assert await asyncio.to_thread(second.wait_exit, 60) == 2
        assert f"in use by a running worker (pid {w.proc.pid})" in second.log_text()
        drain = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "ecoworker.cli", "wal", "drain",
                                                         "--db", str(w.wal)], env=env, capture_output=True,
                                        text=True, timeout=60)
        assert drain.returncode == 2 and "in use by a running worker" in drain.stderr
        assert statuses(w.wal)[ids[0]] == "RUNNING" and await amqp.depth(queue_name) == 0
        w.kill()  # the kernel drops the lock with the process: drain now works
        drain = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "ecoworker.cli", "wal", "drain",
                                                         "--db", str(w.wal)], env=env, capture_output=True,
                                        text=True, timeout=60)
        assert drain.returncode == 0, drain.stderr
        assert "handed 1 unfinished task(s)" in drain.stdout
        assert await amqp.depth(queue_name) == 1


def _all_gone(pids: list[int]) -> bool:
    return not any(map(process_alive, pids))


def _writers(pid: int) -> list[int]:
    """The journal writer processes below `pid`."""
    found = []
    for child in descendants(pid):
        try:
            if b"ecoworker.writerchild" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            continue
    return found
