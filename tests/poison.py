"""A reusable corpus of bad deliveries, each naming the dead-letter reason it must get.

The intake, daemon and chaos suites publish these to prove that every bad
message is dead-lettered exactly once. Each call returns fresh messages: the ones
that carry an id get a new uuid4-based id, and the id-less ones carry a uuid in
their body or a header, so every message has its own journal key (its id, or the
digest of its body and headers) and never collides with an earlier run's.

    for p in poison_corpus("storage"):
        await exchange.publish(aio_pika.Message(p.body, **p.properties), routing_key="storage")
"""

from __future__ import annotations

import gzip
import json
import pickle
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

MiB = 1024 * 1024
JSON = "application/json"

#: The embed part of a Celery protocol v2 body, as `send_task` writes it.
CELERY_EMBED: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@dataclass(frozen=True, slots=True)
class PoisonMessage:
    """One bad delivery: `aio_pika.Message(body, **properties)` must be dead-lettered with `reason`."""

    name: str
    body: bytes
    properties: dict[str, Any]
    reason: str


def celery_headers(task: str, task_id: str | None, **changes: Any) -> dict[str, Any]:
    """Headers of a Celery 5 `send_task` message (unset ones are None, as they arrive)."""
    headers: dict[str, Any] = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
        "root_id": task_id, "parent_id": None, "argsrepr": "()", "kwargsrepr": "{}",
        "origin": "gen1@producer", "ignore_result": False,
    }
    headers.update(changes)
    return headers


def celery_body(args: Any = (), kwargs: Any = None) -> bytes:
    """A Celery protocol v2 body: `[args, kwargs, embed]`."""
    return json.dumps([list(args), kwargs or {}, CELERY_EMBED]).encode()


def good_message(task_id: str | None = None, **kwargs: Any) -> tuple[bytes, dict[str, Any]]:
    """Body and properties of a valid native `ecoworker.noop` task (kwargs are echoed back)."""
    task_id = task_id or f"good-{uuid.uuid4()}"
    body = json.dumps({"id": task_id, "task": "ecoworker.noop", "args": [], "kwargs": kwargs}).encode()
    return body, {"content_type": JSON, "content_encoding": "utf-8", "message_id": task_id, "delivery_mode": 2}


def poison_corpus(queue: str) -> list[PoisonMessage]:
    """At least 22 distinct bad messages for `queue`, fresh ids and nonces on every call."""
    nonce = uuid.uuid4().hex

    def new_id(label: str) -> str:
        return f"poison-{label}-{uuid.uuid4()}"

    def native(label: str, reason: str, doc: dict[str, Any], **props: Any) -> PoisonMessage:
        properties: dict[str, Any] = {"content_type": JSON, "content_encoding": "utf-8"}
        if isinstance(doc.get("id"), str):
            properties["message_id"] = doc["id"]
        properties.update(props)
        return PoisonMessage(label, json.dumps(doc).encode(), properties, reason)

    def celery(label: str, reason: str, body: bytes, task: str = "ecoworker.noop", *,
               task_id: str | None = "", props: dict[str, Any] | None = None, **headers: Any) -> PoisonMessage:
        tid = new_id(label) if task_id == "" else task_id
        properties: dict[str, Any] = {
            "content_type": JSON, "content_encoding": "utf-8", "correlation_id": tid,
            "reply_to": f"reply-{nonce}", "headers": celery_headers(task, tid, **headers),
        }
        properties.update(props or {})
        return PoisonMessage(label, body, properties, reason)

    def raw(label: str, reason: str, body: bytes, **props: Any) -> PoisonMessage:
        headers = {"x-poison": f"{label}-{nonce}", "x-queue": queue}
        return PoisonMessage(label, body, {"headers": headers, **props}, reason)

    noop = "ecoworker.noop"
    gzip_id = new_id("gzip")
    return [
        # Undecodable bodies (no id anywhere: keyed by the digest of body and headers).
        raw("not_json_text", "bad_json", f"hello, this is not JSON {nonce}".encode(), content_type=JSON),
        raw("invalid_utf8", "bad_json", b"\xff\xfe" + nonce.encode(), content_type=JSON),
        raw("empty_body", "bad_json", b"", content_type=JSON),
        raw("truncated_json", "bad_json", f'{{"id": "{nonce}", "task": '.encode(), content_type=JSON),
        raw("native_json_array", "bad_shape", json.dumps(["ecoworker.noop", nonce]).encode(), content_type=JSON),
        raw("native_json_number", "bad_shape", b"42", content_type=JSON),
        # Serializers and encodings ecoworker refuses.
        celery("celery_pickle", "pickle", pickle.dumps({"hello": "world", "nonce": nonce}, protocol=4),
               props={"content_type": "application/x-python-serialize", "content_encoding": "binary"}),
        raw("yaml", "content_type", f"id: {nonce}\ntask: ecoworker.noop\n".encode(),
            content_type="application/x-yaml"),
        raw("msgpack", "content_type", b"\x82\xa2id\xd9\x20" + nonce.encode() + b"\xa4task\xa1x",
            content_type="application/x-msgpack"),
        raw("text_plain", "content_type", f"run ecoworker.noop {nonce}".encode(), content_type="text/plain"),
        PoisonMessage("gzip_encoding", gzip.compress(json.dumps({"id": gzip_id, "task": noop}).encode()),
                      {"content_type": JSON, "content_encoding": "gzip", "message_id": gzip_id}, "content_encoding"),
        native("binary_encoding", "content_encoding", {"id": new_id("binary"), "task": noop},
               content_encoding="binary"),
        celery("celery_compressed", "compressed", zlib.compress(celery_body()),
               compression="application/x-gzip"),
        # Celery envelopes with the wrong shape or no id.
        celery("celery_body_not_list", "bad_shape", json.dumps({"args": [], "kwargs": {}}).encode()),
        celery("celery_body_two_items", "bad_shape", json.dumps([[], {}]).encode()),
        celery("celery_no_id", "missing_id", celery_body(kwargs={"nonce": nonce}), task_id=None),
        celery("celery_negative_retries", "bad_field", celery_body(), retries=-1),
        celery("celery_bad_timelimit", "bad_field", celery_body(), timelimit="soon"),
        # Native envelopes with missing or malformed fields.
        native("native_no_id", "missing_id", {"task": noop, "kwargs": {"nonce": nonce}}),
        native("native_no_task", "missing_task", {"id": new_id("no-task"), "args": []}),
        # (an AMQP message_id holds at most 255 bytes, so the over-long id is in the body only)
        native("overlong_id", "bad_id", {"id": (nonce * 10)[:300], "task": noop}, message_id=None),
        native("nonprintable_id", "bad_id", {"id": f"bell\a{nonce}", "task": noop}),
        native("newline_task_name", "bad_task_name", {"id": new_id("newline"), "task": "ecoworker.noop\n"}),
        native("bad_eta", "bad_field", {"id": new_id("eta"), "task": noop, "eta": "tomorrow at noon"}),
        native("eta_not_string", "bad_field", {"id": new_id("eta-int"), "task": noop, "eta": 1700000000}),
        native("bad_max_retries", "bad_field", {"id": new_id("max-retries"), "task": noop, "max_retries": -1}),
        native("kwargs_not_object", "bad_args", {"id": new_id("kwargs"), "task": noop, "kwargs": [1, 2]}),
        native("args_not_list", "bad_args", {"id": new_id("args"), "task": noop, "args": {"a": 1}}),
        native("kwarg_not_identifier", "bad_args", {"id": new_id("kwarg"), "task": noop, "kwargs": {"not-a-name": 1}}),
        # Decodable, but no handler takes them.
        native("unknown_task_native", "unknown_task", {"id": new_id("unknown"), "task": "nope.no_such_task"}),
        celery("unknown_task_celery", "unknown_task", celery_body(), task="nope.no_such_celery_task"),
        native("noop_positional_args", "bad_arguments", {"id": new_id("noop-args"), "task": noop, "args": [1, 2]}),
        native("sleep_unknown_kwarg", "bad_arguments",
               {"id": new_id("sleep-kwarg"), "task": "ecoworker.sleep", "kwargs": {"nope": 1}}),
        celery("celery_sleep_too_many_args", "bad_arguments", celery_body(args=[1, 2, 3]), task="ecoworker.sleep"),
        # Over the size limit (valid JSON all the same).
        native("oversize", "too_large",
               {"id": new_id("oversize"), "task": noop, "kwargs": {"pad": "x" * (MiB + 1024)}}),
    ]
