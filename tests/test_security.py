"""What a hostile message can and cannot make a real worker do, and how it treats a damaged journal.

One `ecoworker run` process serves the `storage` and `ai` queues of a RabbitMQ
vhost made for this module on the shared broker (a user with a secret password,
both deleted afterwards), uploads to a fresh bucket on the shared moto server,
ships to a fresh PostgreSQL database, and talks to the OpenAI stand-in
(tests/openai_server.py). Secrets are planted in its environment.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aioboto3
import asyncpg
import orjson
import pytest

from tests.handler_fixtures import openai_server, session_openai_server  # noqa: F401 - fixtures
from tests.openai_server import OpenAIServer, Reply
from tests.workers import REPO, WorkerProcess, env_for_worker, journal_rows, wait_for

MiB = 1024 * 1024
RUN = uuid.uuid4().hex[:10]
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": f"aws-secret-{RUN}-wJalrXUtnFEMI",
    "OPENAI_API_KEY": f"sk-test-{RUN}-openai-key",
    "rabbitmq password": f"rmq-pw-{RUN}",
    "postgres password": f"pg-pw-{RUN}",
}
PICKLE = "application/x-python-serialize"


# --------------------------------------------------------------------------- the environment


def _rabbitmqctl(stack_env: dict[str, str], *args: str) -> None:
    ctl = stack_env["ECOWORKER_RABBITMQCTL"]
    proc = subprocess.run([ctl, "-q", *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"rabbitmqctl {args[0]}: {proc.stderr or proc.stdout}"


@pytest.fixture(scope="module")
def vhost_url(stack_env: dict[str, str]) -> Iterator[str]:
    """amqp:// URL of a fresh vhost on the shared broker, for a user whose password is a planted secret."""
    vhost, user = f"sec-{RUN}", f"sec-{RUN}"
    _rabbitmqctl(stack_env, "add_vhost", vhost)
    _rabbitmqctl(stack_env, "add_user", user, SECRETS["rabbitmq password"])
    _rabbitmqctl(stack_env, "set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    base = urlsplit(stack_env["RABBITMQ_URL"])
    netloc = f"{user}:{SECRETS['rabbitmq password']}@{base.hostname}:{base.port}"
    try:
        yield urlunsplit(("amqp", netloc, "/" + quote(vhost, safe=""), "", ""))
    finally:
        subprocess.run([stack_env["ECOWORKER_RABBITMQCTL"], "-q", "delete_vhost", vhost], capture_output=True,
                       timeout=60, check=False)
        subprocess.run([stack_env["ECOWORKER_RABBITMQCTL"], "-q", "delete_user", user], capture_output=True,
                       timeout=60, check=False)


@pytest.fixture(scope="module")
async def channel(vhost_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A publisher-confirms channel on the module's vhost; `storage`, `ai` and their .dead queues declared."""
    conn = await aio_pika.connect(vhost_url)
    ch = await conn.channel(publisher_confirms=True)
    for name in ("storage", "ai", "storage.dead", "ai.dead"):
        await ch.declare_queue(name, durable=True)
    yield ch
    await conn.close()


@pytest.fixture(scope="module")
async def s3(stack_env: dict[str, str]) -> AsyncIterator[Any]:
    """An S3 client on the shared moto server."""
    session = aioboto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                              region_name="us-east-1")
    async with session.client("s3", endpoint_url=stack_env["S3_ENDPOINT_URL"]) as client:
        yield client


@pytest.fixture(scope="module")
async def bucket(s3: Any) -> str:
    """A fresh bucket: the worker's ECOWORKER_S3_BUCKET."""
    name = f"sec-{RUN}"
    await s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
async def pg(stack_env: dict[str, str]) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """(DSN with a planted password, connection) of a fresh migrated database; dropped afterwards."""
    name = f"security_{RUN}"
    admin = await asyncpg.connect(stack_env["POSTGRES_DSN"])
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = urlsplit(stack_env["POSTGRES_DSN"])
    # the test server trusts loopback, so any password works: it only has to be there to leak
    dsn = urlunsplit(base._replace(netloc=f"postgres:{SECRETS['postgres password']}@{base.hostname}:{base.port}",
                                   path=f"/{name}"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "POSTGRES_DSN": dsn}
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "ecoworker.cli", "db", "migrate"],
                                   env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    conn = await asyncpg.connect(dsn)
    try:
        yield dsn, conn
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="module")
def upload_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's ECOWORKER_UPLOAD_ROOT, beside a directory outside it holding a secret file."""
    base = tmp_path_factory.mktemp("security")
    root, outside = base / "uploads", base / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("not for upload\n")
    (root / "ok.txt").write_text("fine to upload\n")
    (root / "escape.txt").symlink_to(outside / "secret.txt")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "sub").mkdir()
    return root.resolve()


@pytest.fixture(scope="module")
async def worker(stack_env: dict[str, str], vhost_url: str, bucket: str, pg: tuple[str, Any], upload_root: Path,
                 session_openai_server: OpenAIServer,  # noqa: F811 - the fixture
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WorkerProcess]:
    """The worker under attack, with every secret planted in its environment."""
    base = tmp_path_factory.mktemp("security-worker")
    env = env_for_worker(
        stack_env, RABBITMQ_URL=vhost_url, POSTGRES_DSN=pg[0], ECOWORKER_S3_BUCKET=bucket,
        ECOWORKER_UPLOAD_ROOT=str(upload_root), AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY=SECRETS["AWS_SECRET_ACCESS_KEY"], OPENAI_API_KEY=SECRETS["OPENAI_API_KEY"],
        OPENAI_BASE_URL=session_openai_server.url, ECOWORKER_OPENAI_TIMEOUT="5", ECOWORKER_IMAGE_PROCESSES="1",
        ECOWORKER_MAX_DOWNLOAD_BYTES=str(MiB), ECOWORKER_OCR_ENGINE="openai",
    )
    w = WorkerProcess(base / "journal.db", ["storage", "ai"], env, base / "worker.log")
    w.start()
    await asyncio.to_thread(w.wait_ready, 60)
    yield w
    w.kill()


# --------------------------------------------------------------------------- helpers


async def publish(channel: aio_pika.abc.AbstractChannel, queue: str, task: str, **kwargs: Any) -> str:
    task_id = f"{task}-{uuid.uuid4()}"
    body = orjson.dumps({"id": task_id, "task": task, "args": [], "kwargs": kwargs})
    message = aio_pika.Message(body, content_type="application/json", message_id=task_id,
                               delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
    await channel.default_exchange.publish(message, routing_key=queue)
    return task_id


def row(w: WorkerProcess, task_id: str) -> dict[str, Any] | None:
    rows = journal_rows(w.wal, "SELECT * FROM task_wal WHERE task_id = ?", (task_id,))
    return dict(rows[0]) if rows else None


async def finished(w: WorkerProcess, task_ids: list[str], within: float = 30) -> dict[str, dict[str, Any]]:
    """The journal rows of `task_ids` once every one of them is terminal."""

    def check() -> dict[str, dict[str, Any]] | None:
        rows = {i: row(w, i) for i in task_ids}
        if all(r is not None and r["status"] in ("SUCCESS", "FAILURE", "DEAD") for r in rows.values()):
            return rows  # type: ignore[return-value]
        return None

    result: dict[str, dict[str, Any]] = await wait_for(check, within, message=lambda: w.log_text()[-2000:])
    return result


async def keys(s3: Any, bucket: str) -> list[str]:
    listing = await s3.list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listing.get("Contents", [])]


async def dead_letters(channel: aio_pika.abc.AbstractChannel, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message in `queue`, left in place (each is nacked back after reading)."""
    q = await channel.declare_queue(queue, durable=True)
    got = []
    while (m := await q.get(no_ack=False, fail=False)) is not None:
        got.append(m)
    for m in got:
        await m.nack(requeue=True)
    return got


def rss(w: WorkerProcess) -> tuple[int, int]:
    """(VmRSS, VmHWM) of the worker process, in bytes."""
    assert w.proc is not None
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{w.proc.pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


class Touch:
    """Unpickling this creates `path`: the proof a payload was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


# --------------------------------------------------------------------------- tests


class TestUploadRoot:
    @pytest.mark.parametrize("file_path", ["../../etc/passwd", "/etc/passwd", "escape.txt", "linkdir/secret.txt",
                                           "sub/../../outside/secret.txt", "sub/../../../../etc/shadow"])
    async def test_paths_leaving_the_root_fail_and_upload_nothing(self, channel, worker, s3, bucket, file_path):
        """A file_path that resolves outside the upload root (.., absolute, symlinked) fails clearly; no object."""
        key = f"escape/{uuid.uuid4().hex}"
        task_id = await publish(channel, "storage", "upload_to_s3", file_path=file_path, s3_key=key)
        rows = await finished(worker, [task_id])
        assert rows[task_id]["status"] == "FAILURE"
        assert "outside the upload root" in rows[task_id]["error"]
        assert not any(k.startswith("escape/") for k in await keys(s3, bucket))

    async def test_a_file_inside_the_root_is_uploaded(self, channel, worker, s3, bucket):
        """Control: a file under the root uploads, so the refusals above are the path check at work."""
        task_id = await publish(channel, "storage", "upload_to_s3", file_path="ok.txt", s3_key="inside/ok.txt")
        rows = await finished(worker, [task_id])
        assert rows[task_id]["status"] == "SUCCESS", rows[task_id]["error"]
        assert "inside/ok.txt" in await keys(s3, bucket)


class TestBucketArgument:
    @pytest.mark.parametrize("name", ["../other", "Other_Bucket", "a", "x" * 64, "other/bucket", "-other-"])
    async def test_malformed_bucket_names_fail_before_any_request(self, channel, worker, s3, bucket, name):
        """A `bucket` argument that is not a valid S3 bucket name fails at once; nothing is written anywhere."""
        key = f"bucket-arg/{uuid.uuid4().hex}"
        task_id = await publish(channel, "storage", "upload_to_s3", file_path="ok.txt", s3_key=key, bucket=name)
        rows = await finished(worker, [task_id])
        assert rows[task_id]["status"] == "FAILURE"
        assert "is not a valid S3 bucket name" in rows[task_id]["error"]
        assert rows[task_id]["attempts"] == 1
        assert key not in await keys(s3, bucket)

    async def test_a_missing_bucket_fails_and_is_not_created(self, channel, worker, s3):
        """A well-formed `bucket` that does not exist fails with NoSuchBucket; the worker never creates buckets."""
        other = f"sec-missing-{RUN}"
        task_id = await publish(channel, "storage", "upload_to_s3", file_path="ok.txt", s3_key="x.txt", bucket=other)
        rows = await finished(worker, [task_id])
        assert rows[task_id]["status"] == "FAILURE" and "NoSuchBucket" in rows[task_id]["error"]
        names = [b["Name"] for b in (await s3.list_buckets())["Buckets"]]
        assert other not in names

    async def test_a_valid_other_bucket_is_written_if_the_credentials_allow(self, channel, worker, s3, bucket):
        """A valid `bucket` naming another existing bucket is written to: only the S3 credentials limit it."""
        other = f"sec-other-{RUN}"
        await s3.create_bucket(Bucket=other)
        task_id = await publish(channel, "storage", "upload_to_s3", file_path="ok.txt", s3_key="o.txt", bucket=other)
        rows = await finished(worker, [task_id])
        assert rows[task_id]["status"] == "SUCCESS"
        assert await keys(s3, other) == ["o.txt"] and "o.txt" not in await keys(s3, bucket)
        await s3.delete_object(Bucket=other, Key="o.txt")
        await s3.delete_bucket(Bucket=other)


class TestPickle:
    async def test_pickled_payloads_are_dead_lettered_and_never_loaded(self, channel, worker, tmp_path):
        """Pickled payloads (Celery and native) are dead-lettered as pickle and never loaded: no marker file."""
        control = tmp_path / "control-marker"
        pickle.loads(pickle.dumps(Touch(control)))  # proves the payload is live
        assert control.exists()
        marker = tmp_path / "marker"
        payload = pickle.dumps(Touch(marker))
        celery_id, native_id = f"pickle-celery-{uuid.uuid4()}", f"pickle-native-{uuid.uuid4()}"
        await channel.default_exchange.publish(aio_pika.Message(
            payload, content_type=PICKLE, content_encoding="binary", correlation_id=celery_id,
            headers={"task": "upload_to_s3", "id": celery_id, "lang": "py"}), routing_key="storage")
        await channel.default_exchange.publish(aio_pika.Message(
            payload, content_type=PICKLE, message_id=native_id), routing_key="storage")
        rows = await finished(worker, [celery_id, native_id])
        for task_id in (celery_id, native_id):
            assert rows[task_id]["status"] == "DEAD" and rows[task_id]["error"].startswith("pickle:")

        async def both_dead_lettered() -> list[Any]:
            got = [m for m in await dead_letters(channel, "storage.dead")
                   if m.headers.get("x-ecoworker-task-id") in (celery_id, native_id)]
            return got if len(got) == 2 else []

        got = await wait_for(both_dead_lettered, 20)
        assert all(str(m.headers["x-ecoworker-error"]).startswith("pickle:") for m in got)
        assert all(m.body == payload for m in got)  # the original bytes, still unloaded
        await asyncio.sleep(1)
        assert not marker.exists()


class TestMemory:
    async def test_50mb_bodies_are_dead_lettered_too_large_and_memory_stays_bounded(self, channel, worker):
        """50 MB bodies are dead-lettered once as too_large and the worker's memory does not grow with each."""
        await asyncio.sleep(2)
        samples = [rss(worker)]
        ids = []
        for _ in range(2):
            task_id = f"huge-{uuid.uuid4()}"
            ids.append(task_id)
            body = orjson.dumps({"id": task_id, "task": "upload_to_s3",
                                 "kwargs": {"file_path": "ok.txt", "s3_key": "k", "pad": "x" * (50 * MiB)}})
            await channel.default_exchange.publish(aio_pika.Message(body, content_type="application/json",
                                                                    message_id=task_id), routing_key="storage")
            del body
            rows = await finished(worker, [task_id], within=60)
            assert rows[task_id]["status"] == "DEAD" and rows[task_id]["error"].startswith("too_large:")
            await wait_for(lambda t=task_id: row(worker, t)["dl_state"] == 2, 60, message="the dead letter")
            await asyncio.sleep(2)
            samples.append(rss(worker))
        print("worker RSS/peak after each 50 MB message (MiB): "
              + ", ".join(f"{a / MiB:.0f}/{p / MiB:.0f}" for a, p in samples)
              + f"; journal {worker.wal.stat().st_size / MiB:.0f} MiB")
        dead = [m for m in await dead_letters(channel, "storage.dead") if m.headers.get("x-ecoworker-task-id") in ids]
        assert sorted(m.headers["x-ecoworker-task-id"] for m in dead) == sorted(ids)
        assert all(str(m.headers["x-ecoworker-error"]).startswith("too_large:") for m in dead)
        del dead
        # the allocator may hand memory back a little later: wait (bounded) for RSS to settle
        await wait_for(lambda: rss(worker)[0] - samples[1][0] < 25 * MiB, 20, message=lambda: (
            f"RSS kept growing with each huge message: +{(rss(worker)[0] - samples[1][0]) / MiB:.0f} MiB "
            "after the first"))
        assert worker.alive

    async def test_process_image_of_a_huge_object_is_refused_by_the_download_cap(self, channel, worker, s3, bucket):
        """process_image of an object over ECOWORKER_MAX_DOWNLOAD_BYTES fails naming the limit; no variant."""
        await s3.put_object(Bucket=bucket, Key="huge/photo.jpg", Body=os.urandom(3 * MiB))
        task_id = await publish(channel, "storage", "process_image", source_key="huge/photo.jpg")
        rows = await finished(worker, [task_id])
        assert rows[task_id]["status"] == "FAILURE"
        assert f"larger than the {MiB}-byte limit" in rows[task_id]["error"]
        assert [k for k in await keys(s3, bucket) if k.startswith("huge/photo/")] == []


class TestSecrets:
    async def test_credentials_never_reach_journal_results_dead_letters_or_logs(self, channel, worker, pg,
                                                                              openai_server):  # noqa: F811
        """Failing tasks of every kind (an OpenAI 401 and 500 that echo the key, S3 refusals, bad input): no planted
        secret appears in the journal, task_results, the dead letters or the log."""
        key = SECRETS["OPENAI_API_KEY"]
        openai_server.push(Reply.error(401, f"Incorrect API key provided: {key}.", code="invalid_api_key"))
        ids = [
            await publish(channel, "ai", "chat_with_llm", prompt="hello"),
            await publish(channel, "storage", "upload_to_s3", file_path="ok.txt", s3_key="s", bucket=f"nope-{RUN}"),
            await publish(channel, "storage", "upload_to_s3", file_path="missing.txt", s3_key="s"),
            await publish(channel, "storage", "process_image", source_key="no/such.jpg"),
            await publish(channel, "storage", "upload_to_s3", file_path="ok.txt"),  # missing s3_key: bad_arguments
            await publish(channel, "ai", "no.such.task"),
        ]
        rows = await finished(worker, ids)
        assert [r["status"] for r in rows.values()] == ["FAILURE"] * 4 + ["DEAD"] * 2
        assert "401" in rows[ids[0]]["error"]
        sent = openai_server.requests[-1].headers.get("authorization", "")
        assert sent == f"Bearer {key}", "the key was really in use"

        await wait_for(lambda: all(row(worker, i)["dl_state"] == 2 and row(worker, i)["synced_to_postgres"] == 1
                                   for i in ids), 30, message=lambda: worker.log_text()[-2000:])
        dumps = [orjson.dumps([dict(r) for r in journal_rows(worker.wal, "SELECT * FROM task_wal")],
                              default=lambda b: bytes(b).decode("latin-1")).decode()]
        dumps += [orjson.dumps([dict(r) for r in await pg[1].fetch("SELECT * FROM task_results")],
                               default=str).decode()]
        for queue in ("storage.dead", "ai.dead"):
            for m in await dead_letters(channel, queue):
                dumps.append(m.body.decode("latin-1") + repr(m.headers) + repr(m.properties))
        dumps.append(worker.log_text())
        for name, secret in SECRETS.items():
            for text in dumps:
                assert secret not in text, f"the {name} leaked: …{text[max(0, text.find(secret) - 200):][:400]}…"


class TestJournalFile:
    def _run(self, wal: Path, stack_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        env = env_for_worker(stack_env)
        return subprocess.run([sys.executable, "-m", "ecoworker.cli", "run", "--queue", f"jf-{RUN}", "--wal", str(wal),
                               "--metrics-port", "-1"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
                              check=False)

    @staticmethod
    def _journal_with_rows(path: Path, rows: int = 300) -> None:
        from ecoworker.journal import Journal, NewTask

        async def make() -> None:
            async with Journal.open(path) as j:
                now = time.time()
                await j.ingest([NewTask(f"t{i}", "ecoworker.noop", "w", "q", "[]", orjson.dumps({"pad": "y" * 500,
                               "i": i}).decode(), created_at=now, not_before=now) for i in range(rows)])
                await j.checkpoint("TRUNCATE")

        asyncio.run(make())

    @pytest.mark.parametrize("damage", ["not_sqlite", "truncated", "corrupt_pages"])
    def test_a_damaged_journal_stops_the_worker_and_is_left_untouched(self, tmp_path, stack_env, damage):
        """A non-SQLite, truncated or corrupt journal: exit 2, one line naming the file; its bytes unchanged."""
        wal = tmp_path / "journal.db"
        if damage == "not_sqlite":
            wal.write_bytes(b"PK\x03\x04 this is a zip file, not a journal" * 100)
        else:
            self._journal_with_rows(wal)
            data = wal.read_bytes()
            if damage == "truncated":
                wal.write_bytes(data[: len(data) * 6 // 10])
            else:
                middle = len(data) // 2
                wal.write_bytes(data[:middle] + os.urandom(8192) + data[middle + 8192:])
        before = wal.read_bytes()
        proc = self._run(wal, stack_env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        error = [line for line in proc.stderr.splitlines() if line.startswith("ecoworker: error:")]
        assert len(error) == 1 and str(wal) in error[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert wal.read_bytes() == before
        print(f"{damage}: {error[0]}")
