"""Logging: the JSON and text formatters, secret scrubbing, and a worker that never leaks a secret."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import orjson

from ecoworker.logs import JsonFormatter, Scrubber, TextFormatter
from tests.handler_fixtures import *  # noqa: F403
from tests.openai_server import Reply
from tests.test_ops import RabbitVhost, cli, native, s3_bucket
from tests.workers import Amqp, free_port, journal_rows, wait_for

TASK_EXTRA = {"task_id": "t-42", "task": "upload_to_s3", "queue": "storage", "attempt": 2}


class Capture(logging.Handler):
    """Keeps every formatted line."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, Capture]:
    """A fresh logger whose lines go only to a Capture with `formatter`."""
    logger = logging.getLogger(f"test.logs.{uuid.uuid4().hex[:8]}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = Capture(formatter)
    logger.handlers[:] = [handler]
    return logger, handler


def boom(message: str) -> None:
    raise RuntimeError(message)


class TestScrubber:
    def test_url_password_is_masked(self):
        """A URL's password becomes *** and the scheme, user, host and path stay."""
        scrub = Scrubber()
        assert scrub("to amqp://worker:hunter2@rabbit:5672/prod now") == "to amqp://worker:***@rabbit:5672/prod now"
        assert scrub("postgresql://app:p%40ss@db/ecoeco") == "postgresql://app:***@db/ecoeco"

    def test_every_url_in_a_line(self):
        """Several URLs in one line each lose their password."""
        line = Scrubber()("a=amqp://u:one@h/ b=postgres://v:two@db:5432/x")
        assert line == "a=amqp://u:***@h/ b=postgres://v:***@db:5432/x"

    def test_urls_without_password_are_unchanged(self):
        """URLs with no password, or a user only, are left alone."""
        text = "amqp://rabbit:5672/ http://user@host/x https://host:8443/a@b"
        assert Scrubber()(text) == text

    def test_known_secrets_are_removed_anywhere(self):
        """A known secret value is replaced wherever it appears; a longer secret is removed whole."""
        scrub = Scrubber(["sk-test-abc123", "sk-test-abc123-longer"])
        assert scrub("key=sk-test-abc123-longer and sk-test-abc123.") == "key=*** and ***."

    def test_short_and_empty_values_are_ignored(self):
        """Empty or very short 'secrets' (under 4 characters) are not scrubbed: they would mangle every line."""
        scrub = Scrubber(["", "ab", "abc"])
        assert scrub.secrets == []
        assert scrub("tab cabbage abc") == "tab cabbage abc"


class TestJsonFormatter:
    def test_line_is_json_with_the_basic_fields(self):
        """Each record is one JSON object with ts, level, logger and the formatted message."""
        logger, out = capture(JsonFormatter(Scrubber()))
        logger.warning("queue %s has %d messages", "storage", 3)
        [line] = out.lines
        assert "\n" not in line
        doc = json.loads(line)
        assert doc["level"] == "warning" and doc["logger"] == logger.name
        assert doc["msg"] == "queue storage has 3 messages"
        assert isinstance(doc["ts"], float)

    def test_task_fields_from_a_logger_adapter(self):
        """task_id, task, queue and attempt from a LoggerAdapter's extra become JSON fields."""
        logger, out = capture(JsonFormatter(Scrubber()))
        logging.LoggerAdapter(logger, TASK_EXTRA).info("uploaded")
        doc = json.loads(out.lines[0])
        assert {k: doc[k] for k in TASK_EXTRA} == TASK_EXTRA
        assert doc["msg"] == "uploaded"

    def test_plain_records_have_no_task_fields(self):
        """A record without task context has no task_id/task/queue/attempt keys."""
        logger, out = capture(JsonFormatter(Scrubber()))
        logger.info("hello")
        assert set(json.loads(out.lines[0])) == {"ts", "level", "logger", "msg"}

    def test_exception_is_included_and_scrubbed(self):
        """A logged exception's traceback is in `exc`, with URL passwords and known secrets removed."""
        logger, out = capture(JsonFormatter(Scrubber(["sk-live-0123456789"])))
        try:
            boom("cannot reach amqp://u:hunter2@rabbit/ with sk-live-0123456789")
        except RuntimeError:
            logging.LoggerAdapter(logger, TASK_EXTRA).exception("task failed permanently")
        [line] = out.lines
        doc = json.loads(line)
        assert doc["task_id"] == "t-42"
        assert "Traceback" in doc["exc"] and "RuntimeError" in doc["exc"]
        assert "amqp://u:***@rabbit/" in doc["exc"]
        assert "hunter2" not in line and "sk-live-0123456789" not in line

    def test_secret_in_message_is_scrubbed(self):
        """A known secret and a URL password in the message are removed from the JSON line."""
        logger, out = capture(JsonFormatter(Scrubber(["s3cr3t-value"])))
        logger.error("login with %s to %s failed", "s3cr3t-value", "postgresql://app:pw1234@db/x")
        doc = json.loads(out.lines[0])
        assert doc["msg"] == "login with *** to postgresql://app:***@db/x failed"

    def test_secret_with_json_special_characters_is_scrubbed(self):
        """A secret containing a quote or a backslash is removed too (JSON escapes it in the encoded line)."""
        secret = 'pa"ss\\w0rd!'
        logger, out = capture(JsonFormatter(Scrubber([secret])))
        logger.error("password is %s", secret)
        doc = json.loads(out.lines[0])
        assert secret not in doc["msg"], f"secret leaked through JSON escaping: {out.lines[0]}"
        assert doc["msg"] == "password is ***"


class TestTextFormatter:
    def test_readable_line_with_task_fields(self):
        """A text line is `HH:MM:SS.mmm LEVEL logger: message [task_id=… task=… queue=… attempt=…]`."""
        logger, out = capture(TextFormatter(Scrubber()))
        logging.LoggerAdapter(logger, TASK_EXTRA).warning("slow upload")
        [line] = out.lines
        stamp, level, name, *rest = line.split()
        assert len(stamp) == 12 and stamp[2] == stamp[5] == ":" and stamp[8] == "."
        assert (level, name) == ("WARNING", f"{logger.name}:")
        assert " ".join(rest) == "slow upload [task_id=t-42 task=upload_to_s3 queue=storage attempt=2]"

    def test_secrets_scrubbed_from_message_and_traceback(self):
        """URL passwords and known secrets are removed from the message and the traceback."""
        logger, out = capture(TextFormatter(Scrubber(["AKIAsecretvalue"])))
        try:
            boom("AKIAsecretvalue at https://u:pw9999@s3.local/")
        except RuntimeError:
            logger.exception("upload to %s failed", "https://u:pw9999@s3.local/")
        text = "\n".join(out.lines)
        assert "Traceback" in text
        assert "pw9999" not in text and "AKIAsecretvalue" not in text
        assert "https://u:***@s3.local/" in text


# ------------------------------------------------------------------ end to end

class TestNoSecretLeaks:
    async def test_worker_never_writes_a_secret(self, stack_env, workers, handler_env, openai_server, upload_root):
        """A JSON-logging worker with secrets in its environment runs tasks that fail in every way
        (retries exhausted, bad message, missing file, OpenAI 401 echoing the key, a handler crash,
        PostgreSQL unreachable): no secret appears in its log, its journal or its dead letters, and
        every log line is JSON, task lines carrying their task fields."""
        rabbit_pw, pg_pw, aws_secret = (secrets.token_hex(20) for _ in range(3))
        openai_key = f"sk-test-{secrets.token_hex(20)}"
        vhost = RabbitVhost(stack_env, user=f"logs-{uuid.uuid4().hex[:8]}", password=rabbit_pw)
        assert f":{rabbit_pw}@" in vhost.url
        pg_down = f"postgresql://postgres:{pg_pw}@127.0.0.1:{free_port()}/ecoworker"
        openai_server.push(Reply.error(401, f"Incorrect API key provided: {openai_key}.", code="invalid_api_key"))
        env = handler_env | {"RABBITMQ_URL": vhost.url, "POSTGRES_DSN": pg_down, "OPENAI_API_KEY": openai_key,
                             "AWS_SECRET_ACCESS_KEY": aws_secret, "ECOWORKER_CONNECT_TIMEOUT": "120"}
        w = workers("storage", "ai", name="secrets", args=("--log-format", "json", "--log-level", "DEBUG"), **env)
        await asyncio.to_thread(vhost.create)  # while the worker imports; it retries until the user exists
        try:
            async with s3_bucket(stack_env, handler_env["ECOWORKER_S3_BUCKET"]):
                conn = await aio_pika.connect(vhost.url)
                try:
                    amqp = Amqp(conn, await conn.channel(publisher_confirms=True))
                    ids, dead = await self._run_failing_tasks(w, amqp, upload_root)
                finally:
                    await conn.close()
            assert await asyncio.to_thread(w.terminate, 60) == 0
        finally:
            deleted = asyncio.create_task(asyncio.to_thread(vhost.delete))  # slow: runs beside the checks

        try:
            # the probes really carried the secrets
            assert openai_server.requests[0].headers["authorization"] == f"Bearer {openai_key}"
            rows = {r["task_id"]: r for r in journal_rows(w.wal, "SELECT * FROM task_wal")}
            assert rows[ids["chat"]]["status"] == "FAILURE" and "HTTP 401" in rows[ids["chat"]]["error"]
            assert rows[ids["ok"]]["status"] == "SUCCESS"

            log = w.log_text()
            journal = _dump(w.wal)
            letters = b"\n".join(m.body + repr(m.headers).encode() for m in dead)
            for name, value in {"RabbitMQ password": rabbit_pw, "PostgreSQL password": pg_pw,
                                "OpenAI key": openai_key, "AWS secret": aws_secret}.items():
                assert value not in log, f"{name} in the log:\n" + _lines_with(log, value)
                assert value.encode() not in journal, f"{name} in the journal"
                assert value.encode() not in letters, f"{name} in a dead letter"

            records = _json_lines(log)
            by_task: dict[str, list[dict[str, Any]]] = {}
            for r in records:
                if "task_id" in r:
                    assert {"task", "queue", "attempt"} <= set(r), r
                    by_task.setdefault(r["task_id"], []).append(r)
            assert any(r["msg"].startswith("uploaded ") for r in by_task[ids["ok"]])
            [crash] = [r for r in by_task[ids["crash"]] if "exc" in r]
            assert any("failed for good" in r["msg"] for r in by_task[ids["crash"]])
            assert crash["msg"] == "task failed permanently" and "ValueError" in crash["exc"]
            assert (crash["task"], crash["queue"], crash["attempt"]) == ("ecoworker.sleep", "storage", 1)
            assert any(r["level"] == "warning" and "PostgreSQL unavailable" in r["msg"] for r in records)
            assert any("dead-lettering" in r["msg"] for r in records)

            # the operations commands redact the DSN too, and a password DSN works against the real server
            pg_up = stack_env["POSTGRES_DSN"].replace("postgres@", f"postgres:{pg_pw}@", 1)
            down, up = await asyncio.gather(cli("db", "migrate", POSTGRES_DSN=pg_down),
                                            cli("wal", "sync", "--db", str(w.wal), POSTGRES_DSN=pg_up))
            assert down.returncode == 2 and pg_pw not in down.stderr and ":***@" in down.stderr
            assert up.returncode == 0 and up.stdout.startswith("shipped "), up.stderr
            assert pg_pw not in up.stdout + up.stderr
        finally:
            await deleted

    async def _run_failing_tasks(self, w: Any, amqp: Amqp, root: Path) -> tuple[dict[str, str], list[Any]]:
        """Publish one task per way of failing (and one success); wait until all are settled."""
        for queue in ("storage", "ai", "storage.dead", "ai.dead"):
            await amqp.declare(queue)
        await asyncio.to_thread(w.wait_ready, 90)
        (root / "ok.txt").write_bytes(b"fine")
        messages = {
            "ok": ("storage", native("upload_to_s3", kwargs={"file_path": "ok.txt", "s3_key": "k/ok.txt"})),
            "missing": ("storage", native("upload_to_s3", kwargs={"file_path": "gone.txt", "s3_key": "k/gone"})),
            "flaky": ("storage", native("ecoworker.flaky", kwargs={"fail_times": 9}, max_retries=1)),
            "crash": ("storage", native("ecoworker.sleep", kwargs={"seconds": "soon"})),
            "chat": ("ai", native("chat_with_llm", kwargs={"prompt": "hello"}, max_retries=0)),
        }
        ids = {}
        for name, (queue, (task_id, body)) in messages.items():
            await amqp.publish(queue, body, content_type="application/json")
            ids[name] = task_id
        await amqp.publish("storage", b"\xff{not json", content_type="application/json", message_id="bad-1")
        terminal = ("SUCCESS", "FAILURE", "DEAD")

        def settled() -> bool:
            rows = journal_rows(w.wal, "SELECT task_id, status, dl_state FROM task_wal")
            done = {r["task_id"] for r in rows if r["status"] in terminal and r["dl_state"] != 1}
            return len(done) == len(rows) == len(ids) + 1 and "PostgreSQL unavailable" in w.log_text()

        await wait_for(settled, 45, message=lambda: w.log_text()[-3000:])
        dead = await amqp.drain("storage.dead") + await amqp.drain("ai.dead")
        assert len(dead) == 5  # missing, flaky, crash, the bad message; chat on ai.dead
        return ids, dead


def _dump(path: Path) -> bytes:
    """Every value of every journal row, as bytes."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT * FROM task_wal").fetchall()
    finally:
        db.close()
    return b"\n".join(v if isinstance(v, bytes) else str(v).encode() for row in rows for v in row)


def _json_lines(text: str) -> list[dict[str, Any]]:
    records, bad = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            bad.append(line)
    assert not bad, "lines that are not JSON:\n" + "\n".join(bad[:20])
    return records


def _lines_with(text: str, value: str) -> str:
    return "\n".join(line for line in text.splitlines() if value in line)[:3000]
