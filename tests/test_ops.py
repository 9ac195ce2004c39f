"""The operations commands (`ecoworker wal …`, `dlq …`, `publish`), run as a user runs them.

Each command is a `python -m ecoworker.cli …` subprocess in the repository. Journals
for the offline commands are built with the Journal API in a temporary directory;
the round trips run a real worker against RabbitMQ and S3 (moto). The `storage`
queue they need lives in a vhost of its own, so no other test's `storage` queue is
touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import aioboto3
import orjson
import pytest

from ecoworker.journal import Journal
from tests.workers import REPO, Amqp, WorkerProcess, env_for_worker, free_port, journal_rows, statuses, wait_for

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# ------------------------------------------------------------------ helpers

def run_cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m ecoworker.cli ARGS` in the repository, with `env` on top of ours."""
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    full.pop("WAL_DB_PATH", None)
    return subprocess.run([sys.executable, "-m", "ecoworker.cli", *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=timeout, check=False)


async def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`run_cli` off the event loop (a test's servers and connections keep running)."""
    return await asyncio.to_thread(run_cli, *args, **env)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


def rabbitmqctl(stack_env: dict[str, str], *args: str, check: bool = True) -> None:
    proc = subprocess.run([stack_env["ECOWORKER_RABBITMQCTL"], *args], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0 or not check, f"rabbitmqctl {args[0]}: {proc.stdout}{proc.stderr}"


class RabbitVhost:
    """A vhost of its own on the shared broker, for `user` (created with `password` when given).

    `rabbitmqctl` is slow (an Erlang VM per call), so `create()` is meant to run in a thread
    while a worker pointed at `url` boots: the worker retries until the vhost is there.
    """

    def __init__(self, stack_env: dict[str, str], user: str = "guest", password: str | None = None) -> None:
        self.stack_env = stack_env
        self.name = f"test-{uuid.uuid4().hex[:10]}"
        self.user, self.new_user = user, password is not None
        base = urlsplit(stack_env["RABBITMQ_URL"])
        self.password = (base.password or "") if password is None else password
        self.url = (f"amqp://{quote(user, safe='')}:{quote(self.password, safe='')}@{base.hostname}:{base.port}/"
                    f"{self.name}")

    def create(self) -> None:
        first = [("add_vhost", self.name)] + ([("add_user", self.user, self.password)] if self.new_user else [])
        self._parallel(first, check=True)
        rabbitmqctl(self.stack_env, "set_permissions", "-p", self.name, self.user, ".*", ".*", ".*")

    def delete(self) -> None:
        self._parallel([("delete_vhost", self.name)] + ([("delete_user", self.user)] if self.new_user else []),
                       check=False)

    def _parallel(self, calls: list[tuple[str, ...]], check: bool) -> None:
        with ThreadPoolExecutor(len(calls)) as pool:
            for done in [pool.submit(rabbitmqctl, self.stack_env, *call, check=check) for call in calls]:
                done.result()


@contextlib.asynccontextmanager
async def s3_bucket(stack_env: dict[str, str], bucket: str) -> AsyncIterator[Any]:
    """Create `bucket` on the stack's S3 (moto); yields a client; emptied and deleted afterwards."""
    session = aioboto3.Session()
    async with session.client("s3", endpoint_url=stack_env["S3_ENDPOINT_URL"],
                              aws_access_key_id=stack_env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=stack_env["AWS_SECRET_ACCESS_KEY"],
                              region_name=stack_env.get("AWS_DEFAULT_REGION", "us-east-1")) as s3:
        await s3.create_bucket(Bucket=bucket)
        try:
            yield s3
        finally:
            listing = await s3.list_objects_v2(Bucket=bucket)
            for item in listing.get("Contents", []):
                await s3.delete_object(Bucket=bucket, Key=item["Key"])
            await s3.delete_bucket(Bucket=bucket)


async def build_journal(path: Path, spec: dict[str, int]) -> dict[str, list[str]]:
    """A closed journal with `spec[status]` rows per status; SYNCED means SUCCESS and shipped."""
    made: dict[str, list[str]] = {}
    async with Journal.open(path) as j:
        for status, n in spec.items():
            ids = made.setdefault(status, [f"{status.lower()}-{i}" for i in range(n)])
            for task_id in ids:
                await j.write_task(task_id, "ecoworker.noop", "w1", kwargs={"i": task_id}, queue="q")
                if status in ("RUNNING", "SUCCESS", "SYNCED", "FAILURE"):
                    await j.start_task(task_id)
                if status in ("SUCCESS", "SYNCED"):
                    await j.complete_task(task_id, {"i": task_id})
                if status == "FAILURE":
                    await j.fail_task(task_id, "ValueError: broken on purpose")
            if status == "SYNCED":
                await j.mark_synced(ids)
    return made


def sql(path: Path, statement: str, params: tuple[Any, ...] = ()) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute(statement, params)
        db.commit()
    finally:
        db.close()


def native(task: str, task_id: str | None = None, **fields: Any) -> tuple[str, bytes]:
    task_id = task_id or f"{task}-{uuid.uuid4().hex[:12]}"
    return task_id, orjson.dumps({"id": task_id, "task": task, "args": [], **fields})


# ------------------------------------------------------------------ offline commands

class TestWalStats:
    async def test_table_shows_counts_and_sync_totals(self, tmp_path):
        """`wal stats` prints the journal, one line per status and the terminal/synced/unsynced totals."""
        db = tmp_path / "j.db"
        await build_journal(db, {"SYNCED": 2, "FAILURE": 1, "PENDING": 3})
        out = ok(await cli("wal", "stats", "--db", str(db)))
        lines = out.splitlines()
        assert lines[0].startswith(f"journal      {db}  (") and lines[0].endswith(" MB)")
        assert [line.split() for line in lines[1:4]] == [["FAILURE", "1"], ["PENDING", "3"], ["SUCCESS", "2"]]
        assert lines[4].split() == ["terminal", "3", "synced", "2", "unsynced", "1"]

    async def test_json_has_the_seed_shape(self, tmp_path):
        """`wal stats --json` is the seed's get_stats(): by_status, sync totals and wal_size_mb."""
        db = tmp_path / "j.db"
        await build_journal(db, {"SYNCED": 2, "FAILURE": 1, "PENDING": 3})
        stats = orjson.loads(ok(await cli("wal", "stats", "--db", str(db), "--json")))
        assert set(stats) == {"by_status", "sync", "wal_size_mb"}
        assert stats["by_status"] == {"SUCCESS": 2, "FAILURE": 1, "PENDING": 3}
        assert stats["sync"] == {"total": 3, "synced": 2, "unsynced": 1}
        assert isinstance(stats["wal_size_mb"], float) and stats["wal_size_mb"] > 0


class TestWalList:
    async def test_status_filter(self, tmp_path):
        """`wal list --status failure` lists only FAILURE rows, with their error, in a table."""
        db = tmp_path / "j.db"
        made = await build_journal(db, {"SYNCED": 2, "FAILURE": 2, "PENDING": 1})
        out = ok(await cli("wal", "list", "--db", str(db), "--status", "failure"))
        header, *rows = out.splitlines()
        assert header.split()[:4] == ["task_id", "task", "status", "att"]
        assert sorted(r.split()[0] for r in rows) == sorted(made["FAILURE"])
        assert all(r.split()[2] == "FAILURE" and "ValueError: broken on purpose" in r for r in rows)

    async def test_json_and_limit(self, tmp_path):
        """`wal list --json --limit N` gives at most N rows as JSON objects."""
        db = tmp_path / "j.db"
        await build_journal(db, {"PENDING": 5})
        rows = orjson.loads(ok(await cli("wal", "list", "--db", str(db), "--status", "PENDING",
                                         "--limit", "3", "--json")))
        assert len(rows) == 3
        assert {r["status"] for r in rows} == {"PENDING"}
        assert {"task_id", "task_name", "attempts", "completed_at", "error"} <= set(rows[0])


class TestWalCheckpoint:
    async def test_truncate_empties_the_wal_file(self, tmp_path):
        """`wal checkpoint --mode truncate` on a journal a killed worker left (its -wal file full of
        committed pages, no process open) copies every page and leaves the -wal file at 0 bytes."""
        db, wal = tmp_path / "j.db", tmp_path / "j.db-wal"
        ok(await asyncio.to_thread(subprocess.run, [sys.executable, "-c", CRASHED_WRITER, str(db)], cwd=REPO,
                                   capture_output=True, text=True, timeout=60, check=False))
        assert wal.stat().st_size > 0
        before = db.stat().st_size
        # an idle reader (a `wal stats` beside it, say) keeps the -wal file from being deleted when the
        # command closes the journal, so what the checkpoint left behind can be seen
        reader = sqlite3.connect(db)
        try:
            assert reader.execute("SELECT count(*) FROM task_wal").fetchone()[0] == 30
            out = ok(await cli("wal", "checkpoint", "--db", str(db), "--mode", "truncate"))
            assert out.startswith("TRUNCATE checkpoint: ")
            assert wal.stat().st_size == 0
            assert db.stat().st_size > before  # the pages are in the database file now
        finally:
            reader.close()
        assert len(journal_rows(db)) == 30


# writes 30 rows, then exits without closing the journal, as kill -9 would
CRASHED_WRITER = """
import asyncio, os, sys
from ecoworker.journal import Journal
async def main():
    j = await Journal.connect(sys.argv[1])
    for i in range(30):
        await j.write_task(f"t{i}", "ecoworker.noop", "w1", kwargs={"pad": "x" * 300})
    os._exit(0)
asyncio.run(main())
"""


class TestWalCleanup:
    async def test_deletes_only_old_synced_terminal_rows(self, tmp_path):
        """`wal cleanup --days 1` deletes synced terminal rows older than a day; recent, unsynced and
        unfinished rows stay."""
        db = tmp_path / "j.db"
        made = await build_journal(db, {"SYNCED": 4, "SUCCESS": 1, "PENDING": 1})
        old = time.time() - 2 * 86400
        sql(db, "UPDATE task_wal SET completed_at = ?, created_at = ? WHERE task_id != 'synced-3'", (old, old))
        out = ok(await cli("wal", "cleanup", "--db", str(db), "--days", "1"))
        assert out == "deleted 3 synced terminal row(s) older than 1 days\n"
        left = {r["task_id"] for r in journal_rows(db)}
        assert left == {"synced-3", *made["SUCCESS"], *made["PENDING"]}


class TestWalRecover:
    async def test_lists_unfinished_tasks(self, tmp_path):
        """`wal recover` lists PENDING and RUNNING rows (and changes nothing)."""
        db = tmp_path / "j.db"
        made = await build_journal(db, {"PENDING": 2, "RUNNING": 1, "SYNCED": 1})
        out = ok(await cli("wal", "recover", "--db", str(db)))
        *rows, total = out.splitlines()
        assert total == "3 unfinished task(s)"
        assert sorted(r.split()[0] for r in rows) == sorted(made["PENDING"] + made["RUNNING"])
        assert statuses(db)["running-0"] == "RUNNING"

    async def test_stale_running_rows_are_failed(self, tmp_path):
        """`wal recover --stale-after 1s` marks RUNNING rows started longer ago FAILURE (owing a dead
        letter) and leaves PENDING rows alone."""
        db = tmp_path / "j.db"
        await build_journal(db, {"PENDING": 1, "RUNNING": 2})
        sql(db, "UPDATE task_wal SET started_at = ? WHERE status = 'RUNNING'", (time.time() - 3600,))
        out = ok(await cli("wal", "recover", "--db", str(db), "--stale-after", "1s"))
        assert out.splitlines()[-1] == "marked 2 stale RUNNING task(s) FAILURE"
        rows = {r["task_id"]: r for r in journal_rows(db, "SELECT * FROM task_wal")}
        assert rows["pending-0"]["status"] == "PENDING"
        for task_id in ("running-0", "running-1"):
            assert rows[task_id]["status"] == "FAILURE"
            assert rows[task_id]["error"].startswith("marked failed by wal recover")
            assert rows[task_id]["dl_state"] == 1


class TestErrors:
    def _one_line(self, proc: subprocess.CompletedProcess[str], *expected: str) -> None:
        assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("ecoworker: error: ")
        for text in expected:
            assert text in lines[0]

    async def test_missing_journal(self, tmp_path):
        """A journal file that does not exist is one error line and exit 2 (and no file is created)."""
        missing = tmp_path / "nope" / "j.db"
        self._one_line(await cli("wal", "stats", "--db", str(missing)), str(missing), "does not exist")
        assert not missing.parent.exists()

    async def test_bad_duration(self, tmp_path):
        """A duration that is not one (`--stale-after soon`) is one error line and exit 2."""
        db = tmp_path / "j.db"
        await build_journal(db, {"RUNNING": 1})
        self._one_line(await cli("wal", "recover", "--db", str(db), "--stale-after", "soon"),
                       "'soon' is not a duration")
        assert statuses(db)["running-0"] == "RUNNING"

    async def test_bad_since(self, tmp_path):
        """`wal retry-failed --since` that is neither ISO time nor duration is one error line and exit 2."""
        db = tmp_path / "j.db"
        await build_journal(db, {"FAILURE": 1})
        self._one_line(await cli("wal", "retry-failed", "--db", str(db), "--since", "yesterday"),
                       "is not a duration")
        assert statuses(db)["failure-0"] == "FAILURE"

    async def test_unreachable_broker(self, tmp_path):
        """`publish` with RabbitMQ unreachable is one error line (password redacted) and exit 2, not a
        traceback (`dlq list|replay` and `wal drain` share the connect path)."""
        url = f"amqp://guest:N0tTh1sP4ssword@127.0.0.1:{free_port()}/"
        proc = await cli("publish", "ecoworker.noop", "--queue", "q", RABBITMQ_URL=url)
        assert "N0tTh1sP4ssword" not in proc.stdout + proc.stderr
        self._one_line(proc, "RabbitMQ")

    async def test_unreachable_postgres(self, tmp_path):
        """`wal sync` with PostgreSQL unreachable is one error line (password redacted) and exit 2;
        nothing is marked synced."""
        db = tmp_path / "j.db"
        await build_journal(db, {"SUCCESS": 1})
        dsn = f"postgresql://postgres:N0tTh1sP4ssword@127.0.0.1:{free_port()}/ecoworker"
        proc = await cli("wal", "sync", "--db", str(db), POSTGRES_DSN=dsn)
        assert "N0tTh1sP4ssword" not in proc.stdout + proc.stderr
        self._one_line(proc, "PostgreSQL")
        assert journal_rows(db, "SELECT synced_to_postgres FROM task_wal")[0][0] == 0


# ------------------------------------------------------------------ round trips with a worker

@dataclass
class StorageWorker:
    """A worker on queue `storage` in a vhost of its own, with a bucket and an upload root."""

    worker: WorkerProcess
    amqp: Amqp
    url: str
    bucket: str
    s3: Any
    root: Path

    async def publish(self, task: str, **fields: Any) -> str:
        task_id, body = native(task, **fields)
        await self.amqp.publish("storage", body, content_type="application/json")
        return task_id

    async def upload(self, name: str) -> str:
        """An `upload_to_s3` of `name` under the upload root (which may not exist yet)."""
        return await self.publish("upload_to_s3", kwargs={"file_path": name, "s3_key": f"up/{name}"})

    async def wait_status(self, task_id: str, status: str, within: float = 30) -> None:
        await wait_for(lambda: statuses(self.worker.wal).get(task_id) == status, within,
                       message=lambda: f"{task_id} {status}: {statuses(self.worker.wal).get(task_id)}\n"
                       + self.worker.log_text()[-2000:])

    async def dead_depth(self) -> int:
        return await self.amqp.depth("storage.dead")

    def cli_env(self) -> dict[str, str]:
        return {"RABBITMQ_URL": self.url}


@pytest.fixture(scope="module", autouse=True)
async def storage_boot(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
                       ) -> AsyncIterator[tuple[WorkerProcess, RabbitVhost, asyncio.Task[None]]]:
    """Start the round trips' worker and its vhost when the module starts: they get ready in the
    background while the offline commands are tested (a worker takes seconds to import)."""
    tmp = tmp_path_factory.mktemp("storage")
    vhost = RabbitVhost(stack_env)
    (tmp / "uploads").mkdir()
    env = env_for_worker(stack_env, RABBITMQ_URL=vhost.url, POSTGRES_DSN="", ECOWORKER_CONNECT_TIMEOUT="120",
                         ECOWORKER_UPLOAD_ROOT=str((tmp / "uploads").resolve()),
                         ECOWORKER_S3_BUCKET=f"test-{uuid.uuid4().hex[:20]}")  # created by `storage`
    worker = WorkerProcess(tmp / "w.db", ["storage"], env, tmp / "w.log").start()
    created = asyncio.create_task(asyncio.to_thread(vhost.create))
    try:
        yield worker, vhost, created
    finally:
        worker.kill()
        await asyncio.gather(created, return_exceptions=True)
        await asyncio.to_thread(vhost.delete)


@pytest.fixture(scope="module")
async def storage(storage_boot: tuple[WorkerProcess, RabbitVhost, asyncio.Task[None]],
                  stack_env: dict[str, str]) -> AsyncIterator[StorageWorker]:
    """The running worker on `storage` (in its vhost), a bucket, and a connection to publish with."""
    worker, vhost, created = storage_boot
    await created
    bucket = worker.env["ECOWORKER_S3_BUCKET"]
    async with s3_bucket(stack_env, bucket) as s3:
        conn = await aio_pika.connect(vhost.url)
        try:
            amqp = Amqp(conn, await conn.channel(publisher_confirms=True))
            await amqp.declare("storage")
            await amqp.declare("storage.dead")
            await asyncio.to_thread(worker.wait_ready, 60)
            yield StorageWorker(worker, amqp, vhost.url, bucket, s3, Path(worker.env["ECOWORKER_UPLOAD_ROOT"]))
        finally:
            await conn.close()


class TestRetryFailed:
    async def test_failure_is_retried_once_its_cause_is_fixed(self, storage):
        """An upload that failed for a missing file is put back to PENDING by `wal retry-failed` once the
        file exists, and the running worker completes it with fresh attempts."""
        task_id = await storage.upload("retry/report.txt")
        await storage.wait_status(task_id, "FAILURE")
        [row] = journal_rows(storage.worker.wal, "SELECT * FROM task_wal WHERE task_id = ?", (task_id,))
        assert "no such file" in row["error"]
        # the failure's dead-letter copy: checked here, then removed (the dlq tests count their own)
        await wait_for(lambda: _depth_at_least(storage.amqp, "storage.dead", 1), 10)
        dead = await storage.amqp.drain("storage.dead")
        assert [m.headers["x-ecoworker-task-id"] for m in dead] == [task_id]

        (storage.root / "retry").mkdir()
        (storage.root / "retry" / "report.txt").write_bytes(b"quarterly numbers")
        out = ok(await cli("wal", "retry-failed", "--db", str(storage.worker.wal), "--task", "upload_to_s3"))
        assert out == "1 task(s) back to PENDING; a running worker picks them up\n"
        await storage.wait_status(task_id, "SUCCESS", 15)
        [row] = journal_rows(storage.worker.wal, "SELECT * FROM task_wal WHERE task_id = ?", (task_id,))
        assert row["attempts"] == 1
        assert orjson.loads(row["result"])["s3_key"] == "up/retry/report.txt"
        obj = await storage.s3.get_object(Bucket=storage.bucket, Key="up/retry/report.txt")
        async with obj["Body"] as body:
            assert await body.read() == b"quarterly numbers"
        await asyncio.sleep(0.5)
        assert await storage.dead_depth() == 0  # a success owes no dead letter


class TestDeadLetterQueue:
    async def test_list_shows_dead_letters_without_removing_them(self, storage):
        """`dlq list` prints each dead letter's task id, attempts and error, and leaves them all queued."""
        a = await storage.upload("dlq/missing-a.txt")
        b = await storage.publish("ecoworker.noop", kwargs={"not a name": 1})  # bad arguments: dead at intake
        await wait_for(lambda: _depth_at_least(storage.amqp, "storage.dead", 2), 30)
        out = ok(await cli("dlq", "list", "--queue", "storage", **storage.cli_env()))
        lines = {line.split()[0]: line for line in out.splitlines()}
        assert set(lines) == {a, b}
        assert "attempts=1" in lines[a] and "no such file" in lines[a]
        assert "bad_args" in lines[b]
        assert await storage.dead_depth() == 2
        await storage.amqp.drain("storage.dead")

    async def test_replay_runs_a_failed_task_again(self, storage):
        """`dlq replay` moves a failed upload's dead letter back to its queue; with the file now there,
        the same task id runs again and ends SUCCESS; the dead-letter queue is empty."""
        task_id = await storage.upload("dlq/later.txt")
        await storage.wait_status(task_id, "FAILURE")
        await wait_for(lambda: _depth_at_least(storage.amqp, "storage.dead", 1), 10)
        (storage.root / "dlq").mkdir(exist_ok=True)
        (storage.root / "dlq" / "later.txt").write_bytes(b"late data")
        out = ok(await cli("dlq", "replay", "--queue", "storage", **storage.cli_env()))
        assert out == "replayed 1 dead letter(s) to storage\n"
        await storage.wait_status(task_id, "SUCCESS", 15)
        [row] = journal_rows(storage.worker.wal, "SELECT * FROM task_wal WHERE task_id = ?", (task_id,))
        assert (row["attempts"], row["replays"]) == (1, 1)
        assert await storage.dead_depth() == 0

    async def test_second_replay_after_another_failure_runs_again(self, storage):
        """A task replayed while its cause is still there fails again; replayed a second time after the
        fix, it runs again (it is not dropped as a duplicate of the first replay)."""
        task_id = await storage.upload("dlq/twice.txt")
        await storage.wait_status(task_id, "FAILURE")
        await wait_for(lambda: _depth_at_least(storage.amqp, "storage.dead", 1), 10)
        ok(await cli("dlq", "replay", "--queue", "storage", **storage.cli_env()))
        await wait_for(lambda: _replays(storage, task_id) == 1, 15)
        await storage.wait_status(task_id, "FAILURE")  # still missing: fails again, a new dead letter
        await wait_for(lambda: _depth_at_least(storage.amqp, "storage.dead", 1), 10)
        (storage.root / "dlq").mkdir(exist_ok=True)
        (storage.root / "dlq" / "twice.txt").write_bytes(b"finally")
        out = ok(await cli("dlq", "replay", "--queue", "storage", **storage.cli_env()))
        assert out == "replayed 1 dead letter(s) to storage\n"
        try:
            await storage.wait_status(task_id, "SUCCESS", 6)
        except AssertionError:
            row = journal_rows(storage.worker.wal, "SELECT status, replays FROM task_wal WHERE task_id = ?",
                               (task_id,))[0]
            raise AssertionError(
                f"the second replay was dropped as a duplicate: the row is {row['status']} with replays="
                f"{row['replays']}, and the dead letter carried no replay count, so `dlq replay` sent "
                "x-ecoworker-replay=1 again") from None


def _replays(storage: StorageWorker, task_id: str) -> int:
    rows = journal_rows(storage.worker.wal, "SELECT replays FROM task_wal WHERE task_id = ?", (task_id,))
    return rows[0][0] if rows else -1


async def _depth_at_least(amqp: Amqp, queue: str, n: int) -> bool:
    return await amqp.depth(queue) >= n


class TestPublish:
    async def test_count_prints_ids_and_they_run(self, storage):
        """`publish --count 3` prints three task ids (one a line), and a worker runs all three."""
        out = ok(await cli("publish", "ecoworker.noop", "--queue", "storage", "--count", "3",
                           "--kwargs", '{"via": "cli"}', **storage.cli_env()))
        ids = out.splitlines()
        assert len(ids) == len(set(ids)) == 3 and all(UUID.match(i) for i in ids)
        for task_id in ids:
            await storage.wait_status(task_id, "SUCCESS")
        results = journal_rows(storage.worker.wal, "SELECT result FROM task_wal WHERE task_id IN (?, ?, ?)",
                               tuple(ids))
        assert [orjson.loads(r[0]) for r in results] == [{"via": "cli"}] * 3

    async def test_explicit_id(self, storage):
        """`publish --id X` publishes the task under that id."""
        task_id = f"cli-{uuid.uuid4().hex[:8]}"
        out = ok(await cli("publish", "ecoworker.noop", "--queue", "storage", "--id", task_id,
                           **storage.cli_env()))
        assert out == f"{task_id}\n"
        await storage.wait_status(task_id, "SUCCESS")


@pytest.fixture(scope="module", autouse=True)
async def drain_boot(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
                     ) -> AsyncIterator[tuple[WorkerProcess, str]]:
    """The worker that `wal drain` empties, started with the module (see `storage_boot`)."""
    tmp = tmp_path_factory.mktemp("drain")
    queue = f"test-{uuid.uuid4().hex[:10]}"
    worker = WorkerProcess(tmp / "first.db", [queue], env_for_worker(stack_env), tmp / "first.log").start()
    try:
        yield worker, queue
    finally:
        worker.kill()
        conn = await aio_pika.connect(stack_env["RABBITMQ_URL"])
        await Amqp(conn, await conn.channel()).delete(queue, f"{queue}.dead")
        await conn.close()


class TestDrain:
    async def test_drain_hands_pending_tasks_to_another_worker(self, drain_boot, amqp, workers, stack_env):
        """After SIGTERM, `wal drain` republishes the journal's PENDING tasks (eta kept) and marks them
        HANDED_OFF; a second worker with its own journal completes them, not before their eta."""
        first, queue = drain_boot
        await asyncio.to_thread(first.wait_ready, 60)
        eta = time.time() + 10
        ids = []
        for i in range(3):
            task_id, body = native("ecoworker.noop", kwargs={"i": i},
                                   eta=datetime.fromtimestamp(eta, UTC).isoformat())
            await amqp.publish(queue, body, content_type="application/json")
            ids.append(task_id)
        await wait_for(lambda: [statuses(first.wal).get(i) for i in ids] == ["PENDING"] * 3, 20)
        assert await asyncio.to_thread(first.terminate, 30) == 0
        assert await amqp.depth(queue) == 0

        out = ok(await cli("wal", "drain", "--db", str(first.wal), RABBITMQ_URL=stack_env["RABBITMQ_URL"]))
        assert out == "handed 3 unfinished task(s) back to the broker\n"
        assert await amqp.depth(queue) == 3
        assert {statuses(first.wal)[i] for i in ids} == {"HANDED_OFF"}
        second = workers(queue, name="second")
        assert "0 unfinished task(s)" in ok(await cli("wal", "recover", "--db", str(first.wal)))

        await wait_for(lambda: all(statuses(second.wal).get(i) == "SUCCESS" for i in ids), 40,
                       message=lambda: second.log_text()[-2000:])
        rows = journal_rows(second.wal, "SELECT * FROM task_wal")
        assert sorted(r["task_id"] for r in rows) == sorted(ids)
        assert all(r["started_at"] >= eta - 0.01 for r in rows)
        assert sorted(orjson.loads(r["result"])["i"] for r in rows) == [0, 1, 2]
        assert await amqp.depth(queue) == 0
