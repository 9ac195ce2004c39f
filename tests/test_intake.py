"""From a delivery to a journal row: tasks to run, and bad messages to dead-letter exactly once."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from pamqp import frame, header

from ecoworker import builtins, intake
from ecoworker.envelope import digest_key
from ecoworker.journal import NewTask
from ecoworker.registry import Registry, RetryPolicy, TaskContext, TaskSpec
from ecoworker.schema import DL_NONE, DL_OWED
from tests.poison import MiB, PoisonMessage, celery_body, celery_headers, good_message, poison_corpus

QUEUE = "storage"
NOW = 1_800_000_000.0

#: Every reason a poison message may be dead-lettered with (decode's and intake's own).
REASONS = {
    "too_large", "pickle", "content_type", "content_encoding", "compressed", "bad_json", "bad_shape",
    "missing_id", "bad_id", "missing_task", "bad_task_name", "bad_args", "bad_field",
    "unknown_task", "bad_arguments",
}


def on_the_wire(body: bytes, properties: dict[str, Any]) -> dict[str, Any]:
    """The properties as the consumer sees them after aio-pika encoded them and the broker delivered them."""
    message = aio_pika.Message(body, **properties)
    _, _, decoded = frame.unmarshal(frame.marshal(header.ContentHeader(0, len(body), message.properties), 1))
    assert isinstance(decoded, header.ContentHeader)
    p = decoded.properties
    return {"content_type": p.content_type, "content_encoding": p.content_encoding, "headers": p.headers,
            "message_id": p.message_id, "correlation_id": p.correlation_id}


def to_row(body: bytes, props: dict[str, Any], *, registry: Registry = builtins.registry,
           now: float = NOW) -> tuple[NewTask, str | None]:
    return intake.to_row(body, props, QUEUE, registry=registry, worker_name="w", max_body_bytes=MiB, now=now)


def native(task_id: str | None = None, task: str = "ecoworker.noop", **fields: Any) -> tuple[bytes, dict[str, Any]]:
    """A native envelope for `task` with extra `fields` (eta, expires, kwargs...)."""
    task_id = task_id or str(uuid.uuid4())
    doc = {"id": task_id, "task": task, "args": [], "kwargs": {}, **fields}
    return json.dumps(doc).encode(), {"content_type": "application/json", "message_id": task_id}


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


CORPUS = poison_corpus(QUEUE)


class TestPoisonCorpus:
    """tests.poison: the shared corpus of bad messages is varied, publishable and fresh on every call."""

    def test_size_and_names(self) -> None:
        """At least 22 messages with unique names and known reasons."""
        assert len(CORPUS) >= 22
        assert len({p.name for p in CORPUS}) == len(CORPUS)
        assert {p.reason for p in CORPUS} <= REASONS

    def test_covers_the_reasons(self) -> None:
        """Every dead-letter reason is represented at least once."""
        assert {p.reason for p in CORPUS} == REASONS

    @pytest.mark.parametrize("poison", CORPUS, ids=lambda p: p.name)
    def test_publishable(self, poison: PoisonMessage) -> None:
        """Every message can be built as an aio_pika.Message and encoded for the wire."""
        assert isinstance(poison.body, bytes)
        on_the_wire(poison.body, poison.properties)

    def test_fresh_ids_per_call(self) -> None:
        """Two calls share no ids and no bodies, so a second run's messages are not duplicates of the first."""
        again = {p.name: p for p in poison_corpus(QUEUE)}
        for poison in CORPUS:
            other = again[poison.name]
            assert (poison.body, poison.properties) != (other.body, other.properties), poison.name

    def test_queue_in_headers(self) -> None:
        """The id-less messages name the queue they were made for in an x-queue header."""
        tagged = [p for p in poison_corpus("q1") if "x-queue" in (p.properties.get("headers") or {})]
        assert tagged and all(p.properties["headers"]["x-queue"] == "q1" for p in tagged)

    def test_good_message(self) -> None:
        """good_message gives a native ecoworker.noop envelope whose message_id is the task id."""
        body, props = good_message("g1", colour="red")
        assert json.loads(body) == {"id": "g1", "task": "ecoworker.noop", "args": [], "kwargs": {"colour": "red"}}
        assert (props["message_id"], props["content_type"]) == ("g1", "application/json")
        assert good_message()[1]["message_id"] != good_message()[1]["message_id"]


class TestDeadRows:
    """A bad delivery becomes one DEAD row owed to the dead-letter queue, keyed so it is sent once."""

    @pytest.mark.parametrize("poison", CORPUS, ids=lambda p: p.name)
    def test_dead_row(self, poison: PoisonMessage) -> None:
        """Each poison message gives a DEAD row with dl_state 1, its reason, and the raw body kept."""
        props = on_the_wire(poison.body, poison.properties)
        row, reason = to_row(poison.body, props)
        assert reason == poison.reason, row.error
        assert row.status == "DEAD"
        assert row.dl_state == DL_OWED == 1
        assert row.error is not None and row.error.startswith(f"{poison.reason}: ")
        assert row.raw_body == poison.body
        kept = json.loads(row.raw_headers or "null")
        assert kept["content_type"] == props["content_type"]
        assert kept["message_id"] == props["message_id"]
        assert kept["headers"].keys() == (props["headers"] or {}).keys()
        assert (row.queue, row.worker_name, row.created_at, row.completed_at) == (QUEUE, "w", NOW, NOW)
        assert (row.args, row.kwargs, row.attempts) == ("[]", "{}", 0)
        assert row.task_id.startswith("digest:") or row.task_id in _ids_of(poison)

    def test_keys_distinct(self) -> None:
        """Every message of two corpora gets its own journal key, so none is mistaken for another."""
        keys = [to_row(p.body, on_the_wire(p.body, p.properties))[0].task_id
                for p in [*CORPUS, *poison_corpus(QUEUE)]]
        assert len(set(keys)) == len(keys)

    def test_keys_stable(self) -> None:
        """A redelivered bad message gets the same key, so it is acked without a second dead letter."""
        for poison in CORPUS:
            first = to_row(poison.body, on_the_wire(poison.body, poison.properties), now=NOW)[0]
            again = to_row(poison.body, on_the_wire(poison.body, poison.properties), now=NOW + 60)[0]
            assert first.task_id == again.task_id, poison.name

    def test_id_less_key_is_the_digest(self) -> None:
        """Without a usable id the key is the digest of body, content type and headers."""
        body = b"not json " + uuid.uuid4().bytes.hex().encode()
        row, reason = to_row(body, {"content_type": "application/json", "headers": {"x": "1"}})
        assert reason == "bad_json"
        assert row.task_id == digest_key(body, "application/json", {"x": "1"})

    def test_shared_correlation_id_does_not_merge_bad_messages(self) -> None:
        """Two different bad native messages sharing a correlation_id get two keys (BUG: see the report).

        Producers often reuse one correlation_id for every message of a request (tracing). Today an early
        refusal is keyed by it, so the second bad message looks like a redelivery of the first and is
        acked without ever being dead-lettered.
        """
        props = {"content_type": "application/json", "correlation_id": "request-42"}
        first, _ = to_row(b"not json 1", props)
        second, _ = to_row(b"not json 2", props)
        assert first.task_id != second.task_id

    def test_keyed_by_id(self) -> None:
        """A bad message with a valid id is keyed by that id."""
        body, props = native("known-id", task="nope.unknown")
        assert to_row(body, props)[0].task_id == "known-id"

    def test_task_name_recorded(self) -> None:
        """The dead row names the task when it is known, '(undecodable)' when not."""
        body, props = native(task="nope.unknown")
        assert to_row(body, props)[0].task_name == "nope.unknown"
        celery_props = {"content_type": "application/json", "headers": celery_headers("images.resize", "c1")}
        assert to_row(b"{", celery_props)[0].task_name == "images.resize"
        assert to_row(b"{", {"content_type": "application/json"})[0].task_name == "(undecodable)"

    def test_unknown_task_lists_known(self) -> None:
        """An unknown task's error names the queue and the tasks this worker knows."""
        body, props = native(task="nope.unknown")
        row, reason = to_row(body, props)
        assert reason == "unknown_task"
        assert row.error is not None
        assert "'nope.unknown'" in row.error and f"'{QUEUE}'" in row.error and "ecoworker.noop" in row.error

    def test_task_of_another_queue_is_unknown(self) -> None:
        """A task registered for another queue is unknown to a worker that does not consume it."""

        async def resize(ctx: TaskContext) -> None:
            """Resize."""

        registry = builtins.registry.merge(Registry([TaskSpec("images.resize", resize, queue="images")]))
        body, props = native(task="images.resize")
        assert to_row(body, props, registry=registry)[1] is None
        assert to_row(body, props, registry=registry.for_queues([QUEUE]))[1] == "unknown_task"

    def test_odd_header_values_kept(self) -> None:
        """Header values JSON cannot hold (timestamps, bytes) are kept as text in raw_headers."""
        when = datetime(2030, 1, 1, tzinfo=UTC)
        row, _ = to_row(b"{", {"headers": {"at": when, "raw": b"\x00\xff", "n": None}})
        kept = json.loads(row.raw_headers or "null")
        assert kept["headers"] == {"at": when.isoformat(), "raw": str(b"\x00\xff"), "n": None}

    def test_error_is_bounded(self) -> None:
        """The error text is capped so a huge message cannot bloat the journal row."""
        body, props = native(task="x" * 200)
        registry = Registry(TaskSpec(f"task.{i:04d}.{'n' * 150}", builtins.noop) for i in range(100))
        row, _ = to_row(body, props, registry=registry)
        assert row.error is not None and len(row.error) <= intake.MAX_ERROR


def _ids_of(poison: PoisonMessage) -> set[str]:
    """Every id a poison message carries: message_id, correlation_id, the id header, the body's id."""
    found = {poison.properties.get("message_id"), poison.properties.get("correlation_id"),
             (poison.properties.get("headers") or {}).get("id")}
    try:
        doc = json.loads(poison.body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        found.add(doc.get("id"))
    return {i for i in found if isinstance(i, str)}


class TestTaskRows:
    """A good delivery becomes a PENDING row (or EXPIRED when it is already too late)."""

    def test_good_message(self) -> None:
        """A valid native ecoworker.noop task gives a PENDING row that runs now."""
        body, props = good_message("g-1", colour="red")
        row, reason = to_row(body, on_the_wire(body, props))
        assert reason is None
        assert row == NewTask(
            task_id="g-1", task_name="ecoworker.noop", worker_name="w", queue=QUEUE, args="[]",
            kwargs='{"colour":"red"}', status="PENDING", error=None, retry_count=0, attempts=0, max_retries=3,
            created_at=NOW, completed_at=None, not_before=NOW, expires_at=None, timeout=None,
            dl_state=DL_NONE, raw_body=None, raw_headers=None, replays=0,
        )

    def test_many_good_messages(self) -> None:
        """Good messages interleaved with the corpus all stay PENDING, each under its own id."""
        rows = [to_row(*good_message())[0] for _ in range(20)]
        assert {r.status for r in rows} == {"PENDING"}
        assert len({r.task_id for r in rows}) == 20

    def test_celery_message(self) -> None:
        """A Celery send_task message keeps its retries and takes the smaller time limit as timeout."""
        headers = celery_headers("ecoworker.sleep", "c-1", retries=2, timelimit=[60, 30])
        body = celery_body(args=[0.5])
        props = {"content_type": "application/json", "content_encoding": "utf-8", "correlation_id": "c-1",
                 "headers": headers, "reply_to": "r"}
        row, reason = to_row(body, on_the_wire(body, props))
        assert reason is None
        assert (row.task_id, row.task_name, row.args, row.kwargs) == ("c-1", "ecoworker.sleep", "[0.5]", "{}")
        assert (row.status, row.retry_count, row.timeout, row.max_retries) == ("PENDING", 2, 30.0, 3)

    def test_max_retries_from_message(self) -> None:
        """A native max_retries overrides the task's policy; without one the policy's applies."""
        body, props = native(max_retries=0)
        assert to_row(body, props)[0].max_retries == 0
        registry = Registry([TaskSpec("patient", builtins.noop, retry=RetryPolicy(max_retries=7))])
        body, props = native(task="patient")
        assert to_row(body, props, registry=registry)[0].max_retries == 7
        body, props = native(task="patient", max_retries=1000)
        assert to_row(body, props, registry=registry)[0].max_retries == 1000

    def test_expired(self) -> None:
        """A message whose expires has passed gives an EXPIRED row, finished now and not dead-lettered."""
        body, props = native(expires=iso(NOW - 60))
        row, reason = to_row(body, props)
        assert reason is None
        assert (row.status, row.completed_at, row.expires_at, row.dl_state) == ("EXPIRED", NOW, NOW - 60, DL_NONE)
        assert row.error is not None and "expired" in row.error

    def test_expires_now_is_expired(self) -> None:
        """expires equal to now is already too late."""
        body, props = native(expires=iso(NOW))
        assert to_row(body, props)[0].status == "EXPIRED"

    def test_expires_later(self) -> None:
        """A future expires is kept on a PENDING row."""
        body, props = native(expires=iso(NOW + 3600))
        row, _ = to_row(body, props)
        assert (row.status, row.expires_at, row.completed_at) == ("PENDING", NOW + 3600, None)

    def test_future_eta(self) -> None:
        """An eta in the future becomes not_before."""
        body, props = native(eta=iso(NOW + 90))
        assert to_row(body, props)[0].not_before == NOW + 90

    def test_past_eta_runs_now(self) -> None:
        """A past eta means run now: not_before is the receive time."""
        body, props = native(eta=iso(NOW - 3600))
        assert to_row(body, props)[0].not_before == NOW

    def test_celery_past_eta_runs_now(self) -> None:
        """A Celery countdown that elapsed while queued runs now."""
        headers = celery_headers("ecoworker.noop", "c-2", eta=iso(NOW - 5))
        row, _ = to_row(celery_body(), {"content_type": "application/json", "headers": headers})
        assert (row.status, row.not_before) == ("PENDING", NOW)

    def test_real_clock(self) -> None:
        """With the real clock a good message is due immediately."""
        now = time.time()
        body, props = good_message()
        row, _ = intake.to_row(body, props, QUEUE, registry=builtins.registry, worker_name="w",
                               max_body_bytes=MiB, now=now)
        assert (row.status, row.not_before, row.created_at) == ("PENDING", now, now)

    @pytest.mark.parametrize(("value", "expected"), [(1, 1), (7, 7), (0, 0), (-1, 0), ("2", 0), (True, 0),
                                                     (None, 0), (1.0, 0)])
    def test_replay_header(self, value: Any, expected: int) -> None:
        """x-ecoworker-replay (a positive integer) sets replays; anything else counts as no replay."""
        body, props = native()
        props["headers"] = {"x-ecoworker-replay": value}
        assert to_row(body, props)[0].replays == expected

    def test_replay_header_on_the_wire(self) -> None:
        """The replay count survives the AMQP encoding."""
        body, props = native()
        props["headers"] = {"x-ecoworker-replay": 3}
        assert to_row(body, on_the_wire(body, props))[0].replays == 3
