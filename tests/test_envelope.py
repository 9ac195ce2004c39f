"""Decoding deliveries: the native envelope, Celery protocol v2, and every refusal's reason."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import zlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecoworker.envelope import MAX_ID, MAX_NAME, TaskMessage, decode, digest_key, encode
from ecoworker.errors import DecodeError

JSON = "application/json"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
TASK_ID = "9f1c2a52-1d4e-4a8e-9d55-2c0a6f3b7e10"

#: Every reason decode() may give; the dead-letter header and metrics rely on these labels.
REASONS = frozenset({
    "too_large", "pickle", "content_type", "content_encoding", "compressed", "bad_json", "bad_shape",
    "missing_id", "bad_id", "missing_task", "bad_task_name", "bad_args", "bad_field",
})


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def native(doc: Any, **props: Any) -> TaskMessage:
    """Decode `doc` as a native JSON envelope."""
    props.setdefault("content_type", JSON)
    return decode(dumps(doc), **props)


def celery_headers(task_id: str | None = TASK_ID, task: str = "images.resize", **changes: Any) -> dict[str, Any]:
    """Headers of a Celery 5.7 `send_task` message as aio-pika hands them over (unset ones None)."""
    headers: dict[str, Any] = {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
        "root_id": task_id, "parent_id": None, "argsrepr": "(1, 'a')", "kwargsrepr": "{'size': 64}",
        "origin": "gen4242@api-7d9f", "ignore_result": False, "replaced_task_nesting": 0,
        "stamped_headers": None, "stamps": {},
    }
    headers.update(changes)
    return headers


def celery(body: Any = None, *, correlation_id: str | None = TASK_ID, **headers: Any) -> TaskMessage:
    """Decode a Celery v2 message; `body` defaults to `[[1, "a"], {"size": 64}, embed]`."""
    body = [[1, "a"], {"size": 64}, EMBED] if body is None else body
    raw = body if isinstance(body, bytes) else dumps(body)
    return decode(raw, content_type=JSON, content_encoding="utf-8", headers=celery_headers(**headers),
                  message_id=None, correlation_id=correlation_id)


def refused(reason: str, body: bytes, **props: Any) -> DecodeError:
    """Assert decode() refuses the delivery with `reason`; return the error."""
    with pytest.raises(DecodeError) as info:
        decode(body, **props)
    assert info.value.reason == reason, str(info.value)
    assert str(info.value)
    return info.value


def refused_native(reason: str, doc: Any, **props: Any) -> DecodeError:
    props.setdefault("content_type", JSON)
    return refused(reason, dumps(doc), **props)


def refused_celery(reason: str, body: Any = ..., **headers: Any) -> DecodeError:
    body = [[], {}, EMBED] if body is ... else body
    return refused(reason, dumps(body), content_type=JSON, headers=celery_headers(**headers),
                   correlation_id=headers.get("task_id", TASK_ID))


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


class TestNativeDecode:
    """The native envelope `{"id", "task", "args", "kwargs"}` plus optional fields."""

    def test_all_fields(self) -> None:
        """Every field of a complete envelope lands in the TaskMessage."""
        msg = native({
            "id": TASK_ID, "task": "upload_to_s3", "args": [1, "two", None], "kwargs": {"s3_key": "a/b"},
            "eta": "2030-01-01T00:00:00+00:00", "expires": "2030-01-02T00:00:00+00:00", "max_retries": 7,
        })
        assert msg == TaskMessage(
            id=TASK_ID, task="upload_to_s3", args=[1, "two", None], kwargs={"s3_key": "a/b"},
            eta=epoch("2030-01-01T00:00:00+00:00"), expires=epoch("2030-01-02T00:00:00+00:00"),
            max_retries=7, retries=0, timelimit=None, protocol="native",
        )

    def test_minimal(self) -> None:
        """Only id and task are required: args and kwargs default to empty, times to None."""
        msg = native({"id": "t1", "task": "ecoworker.noop"})
        assert (msg.args, msg.kwargs, msg.eta, msg.expires, msg.max_retries) == ([], {}, None, None, None)
        assert msg.protocol == "native"

    def test_message_id_stands_in_for_id(self) -> None:
        """Without a body id, the AMQP message_id is the task id."""
        assert native({"task": "ecoworker.noop"}, message_id="from-props").id == "from-props"

    def test_body_id_wins_over_message_id(self) -> None:
        """When both are present the body's id is used."""
        assert native({"id": "from-body", "task": "t"}, message_id="from-props").id == "from-body"

    def test_null_or_empty_id_falls_back_to_message_id(self) -> None:
        """A null or empty body id counts as absent."""
        assert native({"id": None, "task": "t"}, message_id="m1").id == "m1"
        assert native({"id": "", "task": "t"}, message_id="m2").id == "m2"

    def test_correlation_id_is_not_a_native_id(self) -> None:
        """Only message_id stands in for a native id; a correlation_id alone is not enough."""
        refused_native("missing_id", {"task": "t"}, correlation_id="c1")

    def test_no_content_type_is_json(self) -> None:
        """A delivery without content type or encoding is read as UTF-8 JSON."""
        assert decode(dumps({"id": "t1", "task": "t"})).id == "t1"

    @pytest.mark.parametrize("ctype", ["application/json", "text/json", "Application/JSON",
                                       "application/json; charset=utf-8"])
    def test_json_content_types(self, ctype: str) -> None:
        """JSON content types are accepted regardless of case and parameters."""
        assert native({"id": "t1", "task": "t"}, content_type=ctype).task == "t"

    @pytest.mark.parametrize("encoding", ["utf-8", "UTF-8", "utf8", None, ""])
    def test_utf8_encodings(self, encoding: str | None) -> None:
        """utf-8 in any spelling, or no encoding at all, is accepted."""
        assert native({"id": "t1", "task": "t"}, content_encoding=encoding).id == "t1"

    def test_unicode_payload(self) -> None:
        """Non-ASCII task ids, names and arguments survive decoding."""
        msg = native({"id": "tâche-1", "task": "bilder.größe", "args": ["ü"], "kwargs": {"名前": "値"}})
        assert (msg.id, msg.task, msg.args, msg.kwargs) == ("tâche-1", "bilder.größe", ["ü"], {"名前": "値"})

    def test_bytes_message_id(self) -> None:
        """A message_id given as bytes is decoded as UTF-8."""
        assert native({"task": "t"}, message_id=b"bytes-id").id == "bytes-id"

    def test_headers_none(self) -> None:
        """headers=None is the same as no headers."""
        assert native({"id": "t1", "task": "t"}, headers=None).id == "t1"


class TestNativeTimes:
    """eta and expires: ISO 8601, converted to epoch seconds in UTC."""

    @pytest.mark.parametrize("text", ["2030-06-01T12:00:00+00:00", "2030-06-01T12:00:00Z",
                                      "2030-06-01T14:00:00+02:00", "2030-06-01T07:30:00-04:30",
                                      "2030-06-01T12:00:00"])
    def test_eta_with_and_without_zone(self, text: str) -> None:
        """A zone is honoured; a naive time is UTC, never local time."""
        expected = datetime(2030, 6, 1, 12, 0, tzinfo=UTC).timestamp()
        assert native({"id": "t", "task": "t", "eta": text}).eta == expected

    @pytest.mark.parametrize("text", ["2030-06-01T12:00:00+00:00", "2030-06-01T12:00:00"])
    def test_expires_with_and_without_zone(self, text: str) -> None:
        """expires follows the same rules as eta."""
        expected = datetime(2030, 6, 1, 12, 0, tzinfo=UTC).timestamp()
        assert native({"id": "t", "task": "t", "expires": text}).expires == expected

    def test_microseconds_kept(self) -> None:
        """Sub-second precision is kept."""
        eta = native({"id": "t", "task": "t", "eta": "2030-06-01T12:00:00.250000+00:00"}).eta
        assert eta == datetime(2030, 6, 1, 12, 0, tzinfo=UTC).timestamp() + 0.25

    def test_date_only(self) -> None:
        """A bare date is midnight UTC."""
        assert native({"id": "t", "task": "t", "eta": "2030-06-01"}).eta == datetime(2030, 6, 1, tzinfo=UTC).timestamp()

    def test_null_times(self) -> None:
        """null eta and expires mean none."""
        msg = native({"id": "t", "task": "t", "eta": None, "expires": None})
        assert (msg.eta, msg.expires) == (None, None)


class TestNativeMaxRetries:
    """max_retries: an integer 0..1000, or absent."""

    @pytest.mark.parametrize("value", [0, 1, 1000])
    def test_valid(self, value: int) -> None:
        """Integers from 0 to 1000 are kept."""
        assert native({"id": "t", "task": "t", "max_retries": value}).max_retries == value

    def test_null_is_absent(self) -> None:
        """null leaves the task's own policy in charge."""
        assert native({"id": "t", "task": "t", "max_retries": None}).max_retries is None

    @pytest.mark.parametrize("value", [-1, 1001, "3", 2.5, 3.0, True, [3], {"n": 3}])
    def test_invalid(self, value: Any) -> None:
        """Anything but an integer 0..1000 (booleans and floats included) is bad_field."""
        err = refused_native("bad_field", {"id": "t9", "task": "t", "max_retries": value})
        assert err.task_id == "t9"


class TestCeleryDecode:
    """Celery protocol v2, as an unchanged `send_task` producer publishes it."""

    def test_realistic_message(self) -> None:
        """A send_task message with its full header set (None values included) decodes."""
        msg = celery()
        assert msg == TaskMessage(id=TASK_ID, task="images.resize", args=[1, "a"], kwargs={"size": 64},
                                  eta=None, expires=None, max_retries=None, retries=0, timelimit=None,
                                  protocol="celery")

    def test_detected_by_task_header(self) -> None:
        """The `task` header selects the Celery decoder even when content type is absent."""
        msg = decode(dumps([[], {}, EMBED]), headers={"task": "t", "id": "c1"})
        assert (msg.protocol, msg.id, msg.task) == ("celery", "c1", "t")

    def test_null_task_header_is_native(self) -> None:
        """A `task` header that is None does not make a message Celery."""
        msg = native({"id": "n1", "task": "t"}, headers={"task": None})
        assert msg.protocol == "native"

    def test_correlation_id_stands_in_for_id(self) -> None:
        """Without an `id` header the correlation_id (Celery sets it to the task id) is used."""
        assert celery(task_id=None).id == TASK_ID

    def test_id_header_wins_over_correlation_id(self) -> None:
        """The `id` header is the task id even when correlation_id differs."""
        assert celery(task_id="from-header", correlation_id="from-props").id == "from-header"

    def test_eta_and_expires_headers(self) -> None:
        """eta and expires headers (ISO 8601 with +00:00) become epoch seconds."""
        msg = celery(eta="2030-01-01T00:00:10.500000+00:00", expires="2030-01-01T01:00:00+00:00")
        assert msg.eta == epoch("2030-01-01T00:00:10.500000+00:00")
        assert msg.expires == epoch("2030-01-01T01:00:00+00:00")

    def test_past_eta_is_kept(self) -> None:
        """A past eta decodes unchanged (intake turns it into "run now")."""
        assert celery(eta="2001-01-01T00:00:00+00:00").eta == epoch("2001-01-01T00:00:00+00:00")

    def test_args_and_kwargs_from_body(self) -> None:
        """args and kwargs come from the body; the embed part is ignored."""
        msg = celery([[1, [2, 3]], {"a": {"b": None}}, {"callbacks": [{"task": "x"}], "chain": None}])
        assert (msg.args, msg.kwargs) == ([1, [2, 3]], {"a": {"b": None}})

    def test_message_from_celery_itself(self) -> None:
        """A message built by Celery's own as_task_v2 (countdown, expires, time limits) decodes."""
        celery_app = pytest.importorskip("celery").Celery(broker="memory://", set_as_current=False)
        sent = celery_app.amqp.as_task_v2(TASK_ID, "images.resize", args=(1,), kwargs={"size": 64},
                                          countdown=60, expires=3600, time_limit=30, soft_time_limit=20)
        now = datetime.now(UTC).timestamp()
        msg = decode(dumps(list(sent.body)), content_type=JSON, content_encoding="utf-8",
                     headers=sent.headers, correlation_id=sent.properties["correlation_id"])
        assert (msg.id, msg.task, msg.args, msg.kwargs, msg.protocol) == (
            TASK_ID, "images.resize", [1], {"size": 64}, "celery")
        assert msg.eta is not None and abs(msg.eta - (now + 60)) < 5
        assert msg.expires is not None and abs(msg.expires - (now + 3600)) < 5
        assert msg.timelimit == 20


class TestCeleryRetries:
    """The `retries` header: how many times Celery already retried the task."""

    @pytest.mark.parametrize(("value", "expected"), [(None, 0), (0, 0), (3, 3)])
    def test_valid(self, value: int | None, expected: int) -> None:
        """None means 0; a non-negative integer is kept."""
        assert celery(retries=value).retries == expected

    def test_absent(self) -> None:
        """A message without the header has 0 retries."""
        headers = celery_headers()
        del headers["retries"]
        assert decode(dumps([[], {}, EMBED]), content_type=JSON, headers=headers).retries == 0

    @pytest.mark.parametrize("value", [-1, "1", 1.5, True, [1]])
    def test_invalid(self, value: Any) -> None:
        """Negative or non-integer retries are bad_field, keyed by the task id."""
        assert refused_celery("bad_field", retries=value).task_id == TASK_ID


class TestCeleryTimelimit:
    """`timelimit` = [hard, soft]: the task's timeout is the smaller of the ones set."""

    @pytest.mark.parametrize(("value", "expected"), [
        ([30, 20], 20.0), ([20, 30], 20.0), ([None, 20], 20.0), ([30, None], 30.0), ([1.5, None], 1.5),
        ([None, None], None), (None, None), ((30, 10), 10.0),
    ])
    def test_min_of_set_limits(self, value: Any, expected: float | None) -> None:
        """The minimum of the non-None limits, or None when neither is set."""
        assert celery(timelimit=value).timelimit == expected

    @pytest.mark.parametrize("value", [30, "30", [30], [30, 20, 10], [0, None], [-1, None], [None, "20"],
                                       [True, None], [float("inf"), None], [float("nan"), None], {"hard": 30}])
    def test_malformed(self, value: Any) -> None:
        """Anything but a pair of positive numbers (or None) is bad_field."""
        refused("bad_field", dumps([[], {}, EMBED]), content_type=JSON, headers=celery_headers(timelimit=value))


class TestRoundTrip:
    """encode() writes the native envelope decode() reads."""

    def test_full_message(self) -> None:
        """A message with every native field survives encode → decode unchanged."""
        msg = TaskMessage(id=TASK_ID, task="upload_to_s3", args=[1, 2.5, "x", None, [True]],
                          kwargs={"key": {"nested": ["v"]}}, eta=1_900_000_000.25, expires=1_900_003_600.0,
                          max_retries=5)
        assert decode(encode(msg), content_type=JSON, message_id=msg.id) == msg

    def test_minimal_message(self) -> None:
        """Optional fields are left out of the envelope and come back as None."""
        msg = TaskMessage(id="t1", task="t", args=[], kwargs={})
        assert json.loads(encode(msg)) == {"id": "t1", "task": "t", "args": [], "kwargs": {}}
        assert decode(encode(msg)) == msg

    def test_times_encoded_as_utc_iso(self) -> None:
        """eta and expires are written as ISO 8601 in UTC."""
        doc = json.loads(encode(TaskMessage(id="t", task="t", args=[], kwargs={}, eta=0.0, expires=86400.0)))
        assert (doc["eta"], doc["expires"]) == ("1970-01-01T00:00:00+00:00", "1970-01-02T00:00:00+00:00")

    def test_celery_message_reencoded_as_native(self) -> None:
        """A decoded Celery task re-encodes as a native envelope with the same id and arguments."""
        msg = celery(eta="2030-01-01T00:00:00+00:00")
        again = decode(encode(msg), content_type=JSON)
        assert (again.id, again.task, again.args, again.kwargs, again.eta, again.protocol) == (
            msg.id, msg.task, msg.args, msg.kwargs, msg.eta, "native")


def _tripwire(path: str) -> None:
    """Called only if a pickle payload is loaded: leaves evidence, then refuses."""
    Path(path).write_text("unpickled!")
    raise AssertionError("a pickle payload was loaded")


class _Tripwire:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _tripwire, (str(self.path),)


class TestRefusedPayloads:
    """Payloads refused before parsing: size, pickle, content type and encoding, compression."""

    def test_too_large(self) -> None:
        """A body one byte over the limit is too_large; exactly at the limit it decodes."""
        body = dumps({"id": "t1", "task": "t", "kwargs": {"pad": "x" * 100}})
        assert decode(body, max_body_bytes=len(body)).id == "t1"
        err = refused("too_large", body, max_body_bytes=len(body) - 1, message_id="t1")
        assert err.task_id == "t1"

    def test_too_large_checked_first(self) -> None:
        """An oversize body is refused for its size, whatever its content type."""
        refused("too_large", b"x" * 2000, content_type="application/x-python-serialize", max_body_bytes=1000)

    @pytest.mark.parametrize("ctype", ["application/x-python-serialize", "application/python-pickle",
                                       "Application/X-Python-Serialize; charset=binary"])
    def test_pickle_never_loaded(self, ctype: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A pickle payload is refused as 'pickle' without ever being unpickled."""
        evidence = tmp_path / "unpickled"
        payload = pickle.dumps([[_Tripwire(evidence)], {}, EMBED])

        def forbidden(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("decode() called the unpickler")

        monkeypatch.setattr(pickle, "loads", forbidden)
        monkeypatch.setattr(pickle, "load", forbidden)
        monkeypatch.setattr(pickle, "Unpickler", forbidden)
        err = refused("pickle", payload, content_type=ctype, content_encoding="binary",
                      headers=celery_headers(), correlation_id=TASK_ID)
        assert err.task_id == TASK_ID
        assert not evidence.exists()
        monkeypatch.undo()
        with pytest.raises(AssertionError, match="pickle payload was loaded"):
            pickle.loads(payload)  # the tripwire is live: loading it would have left the file
        assert evidence.exists()

    @pytest.mark.parametrize("ctype", ["application/x-yaml", "application/x-msgpack", "text/plain",
                                       "application/octet-stream", "application/data"])
    def test_content_type(self, ctype: str) -> None:
        """Content types other than JSON are refused as 'content_type'."""
        refused("content_type", dumps({"id": "t", "task": "t"}), content_type=ctype)

    @pytest.mark.parametrize("encoding", ["binary", "gzip", "latin-1", "utf-16"])
    def test_content_encoding(self, encoding: str) -> None:
        """Content encodings other than utf-8 are refused as 'content_encoding'."""
        refused("content_encoding", dumps({"id": "t", "task": "t"}), content_type=JSON, content_encoding=encoding)

    def test_compressed(self) -> None:
        """A Celery message with a 'compression' header is refused as 'compressed'."""
        body = zlib.compress(dumps([[], {}, EMBED]))
        err = refused("compressed", body, content_type=JSON,
                      headers=celery_headers(compression="application/x-gzip"), correlation_id=TASK_ID)
        assert err.task_id == TASK_ID

    def test_early_refusal_keyed_by_own_id(self) -> None:
        """Refusals before parsing carry the message's id: message_id (native), id header or correlation_id (Celery)."""
        body = b"\x80not json"
        assert refused("bad_json", body, message_id="m1").task_id == "m1"
        assert refused("bad_json", body, headers={"task": "t", "id": "h1"}).task_id == "h1"
        assert refused("bad_json", body, headers={"task": "t"}, correlation_id="c1").task_id == "c1"
        assert refused("bad_json", body).task_id is None

    def test_early_refusal_ignores_foreign_and_invalid_ids(self) -> None:
        """Only an id decode() itself would accept keys an early refusal (BUG: see the report).

        A native message's correlation_id (often a shared tracing id) or a stray `id` header is not its
        task id: keying by it would make distinct bad messages collide, and all but the first would be
        acked as duplicates without a dead letter. Nor may an over-long or non-printable id become a key.
        """
        body = b"\x80not json"
        assert refused("bad_json", body, correlation_id="shared-trace-id").task_id is None
        assert refused("bad_json", body, headers={"id": "h1"}).task_id is None
        assert refused("bad_json", body, message_id="x" * (MAX_ID + 1)).task_id is None
        assert refused("bad_json", body, message_id="a\nb").task_id is None


class TestBadJson:
    """Bodies that are not UTF-8 JSON."""

    @pytest.mark.parametrize("body", [b"", b"not json", b"{", b'{"id": "t",}', b"\xff\xfe", b'{"id": "\xff"}',
                                      b"NaN", b"[1, Infinity]", b"{} trailing", b"[" * 5000])
    def test_bad_json(self, body: bytes) -> None:
        """Invalid JSON, invalid UTF-8 and absurd nesting are 'bad_json'."""
        refused("bad_json", body, content_type=JSON)

    def test_bad_json_celery(self) -> None:
        """A Celery message with an unparsable body is 'bad_json', keyed by its id header."""
        assert refused("bad_json", b"[[], {", content_type=JSON, headers=celery_headers()).task_id == TASK_ID


class TestBadShape:
    """JSON of the wrong shape for its protocol."""

    @pytest.mark.parametrize("doc", [[], ["t", 1], 42, "task", None, True])
    def test_native_not_an_object(self, doc: Any) -> None:
        """A native envelope must be a JSON object."""
        refused_native("bad_shape", doc)

    @pytest.mark.parametrize("body", [{"args": [], "kwargs": {}}, [[], {}], [[], {}, {}, {}], "x", 1, None])
    def test_celery_body_not_a_triple(self, body: Any) -> None:
        """A Celery body must be a 3-item list; the error is keyed by the task id."""
        assert refused_celery("bad_shape", body).task_id == TASK_ID


class TestIds:
    """Task ids: required, printable, at most 255 characters."""

    @pytest.mark.parametrize("doc", [{"task": "t"}, {"id": None, "task": "t"}, {"id": "", "task": "t"},
                                     {"id": 123, "task": "t"}, {"id": ["a"], "task": "t"}])
    def test_native_missing_id(self, doc: dict[str, Any]) -> None:
        """No usable id in the body and no message_id is 'missing_id' (no id is ever invented)."""
        err = refused_native("missing_id", doc)
        assert err.task_id is None

    def test_celery_missing_id(self) -> None:
        """A Celery message with neither an id header nor a correlation_id is 'missing_id'."""
        refused("missing_id", dumps([[], {}, EMBED]), content_type=JSON, headers=celery_headers(task_id=None))

    @pytest.mark.parametrize("task_id", ["x" * (MAX_ID + 1), "a\nb", "nul\x00", "tab\tid", "bell\a", "\u2028"])
    def test_bad_id(self, task_id: str) -> None:
        """Over-long or non-printable ids are 'bad_id' and not used as a key."""
        assert refused_native("bad_id", {"id": task_id, "task": "t"}).task_id is None

    def test_bad_id_celery(self) -> None:
        """A non-printable Celery id header is 'bad_id'."""
        refused("bad_id", dumps([[], {}, EMBED]), content_type=JSON, headers=celery_headers(task_id="a\rb"))

    def test_longest_id(self) -> None:
        """An id of exactly 255 printable characters (spaces allowed) is fine."""
        task_id = "x y" * 85
        assert len(task_id) == MAX_ID
        assert native({"id": task_id, "task": "t"}).id == task_id


class TestTaskNames:
    """Task names: required, printable, at most 200 characters."""

    @pytest.mark.parametrize("doc", [{"id": "t1"}, {"id": "t1", "task": None}, {"id": "t1", "task": ""},
                                     {"id": "t1", "task": 5}, {"id": "t1", "task": ["t"]}])
    def test_native_missing_task(self, doc: dict[str, Any]) -> None:
        """A native envelope without a task name is 'missing_task', keyed by its id."""
        assert refused_native("missing_task", doc).task_id == "t1"

    def test_celery_empty_task_header(self) -> None:
        """An empty Celery task header is 'missing_task'."""
        assert refused_celery("missing_task", task="").task_id == TASK_ID

    @pytest.mark.parametrize("name", ["ecoworker.noop\n", "a\x00b", "x" * (MAX_NAME + 1), "tab\tname"])
    def test_bad_task_name(self, name: str) -> None:
        """A non-printable or over-long task name is 'bad_task_name'."""
        assert refused_native("bad_task_name", {"id": "t1", "task": name}).task_id == "t1"
        refused_celery("bad_task_name", task=name)

    def test_longest_name(self) -> None:
        """A task name of exactly 200 characters is fine."""
        assert native({"id": "t", "task": "n" * MAX_NAME}).task == "n" * MAX_NAME


class TestBadArgs:
    """args must be a list, kwargs an object whose keys are Python identifiers."""

    @pytest.mark.parametrize("args", [{"a": 1}, "1,2", 1, None])
    def test_args_not_a_list(self, args: Any) -> None:
        """args that are not a JSON array are 'bad_args'."""
        assert refused_native("bad_args", {"id": "t1", "task": "t", "args": args}).task_id == "t1"
        refused_celery("bad_args", [args, {}, EMBED])

    @pytest.mark.parametrize("kwargs", [[1, 2], "a=1", 1, None])
    def test_kwargs_not_an_object(self, kwargs: Any) -> None:
        """kwargs that are not a JSON object are 'bad_args'."""
        refused_native("bad_args", {"id": "t1", "task": "t", "kwargs": kwargs})
        refused_celery("bad_args", [[], kwargs, EMBED])

    @pytest.mark.parametrize("key", ["not-a-name", "1st", "", "a b", "x.y"])
    def test_kwarg_key_not_an_identifier(self, key: str) -> None:
        """A kwarg name that is not a Python identifier is 'bad_args'."""
        refused_native("bad_args", {"id": "t1", "task": "t", "kwargs": {key: 1}})
        refused_celery("bad_args", [[], {key: 1}, EMBED])


class TestBadField:
    """Optional fields of the wrong type or format."""

    @pytest.mark.parametrize("eta", ["tomorrow", "2030-13-01T00:00:00", "2030-01-01T25:00:00", "1700000000",
                                     "2030-01-01T00:00:00+25:00", ""])
    def test_bad_eta_string(self, eta: str) -> None:
        """An eta string that is not ISO 8601 is 'bad_field', keyed by the task id."""
        assert refused_native("bad_field", {"id": "t1", "task": "t", "eta": eta}).task_id == "t1"
        refused_celery("bad_field", eta=eta)

    @pytest.mark.parametrize("eta", [1700000000, 1.5, ["2030-01-01"], {"at": "2030-01-01"}, True])
    def test_eta_not_a_string(self, eta: Any) -> None:
        """An eta that is not a string (epoch numbers included) is 'bad_field'."""
        refused_native("bad_field", {"id": "t1", "task": "t", "eta": eta})

    @pytest.mark.parametrize("expires", ["never", 60, [1]])
    def test_bad_expires(self, expires: Any) -> None:
        """A malformed expires is 'bad_field' too."""
        refused_native("bad_field", {"id": "t1", "task": "t", "expires": expires})
        refused_celery("bad_field", expires=expires)


class TestDigestKey:
    """The journal key of a bad delivery without a usable id."""

    def test_stable(self) -> None:
        """Equal inputs give the same key, whatever the header order."""
        a = digest_key(b"body", JSON, {"x": 1, "y": [1, None], "z": "s"})
        b = digest_key(b"body", JSON, {"z": "s", "y": [1, None], "x": 1})
        assert a == b
        assert a.startswith("digest:")
        assert len(a) == len("digest:") + 40

    def test_none_and_empty_headers_agree(self) -> None:
        """No headers and empty headers are the same delivery."""
        assert digest_key(b"b", None, None) == digest_key(b"b", None, {})

    def test_differs_with_body(self) -> None:
        """A different body gives a different key."""
        assert digest_key(b"body1", JSON, {}) != digest_key(b"body2", JSON, {})

    def test_differs_with_headers(self) -> None:
        """A different, added or removed header gives a different key."""
        base = digest_key(b"b", JSON, {"x": 1})
        assert base != digest_key(b"b", JSON, {"x": 2})
        assert base != digest_key(b"b", JSON, {"x": "1"})
        assert base != digest_key(b"b", JSON, {"x": 1, "y": None})
        assert base != digest_key(b"b", JSON, {})

    def test_differs_with_content_type(self) -> None:
        """A different content type gives a different key."""
        assert digest_key(b"b", JSON, {}) != digest_key(b"b", "application/x-yaml", {})

    def test_no_ambiguity_between_body_and_content_type(self) -> None:
        """Moving bytes between body and content type does not collide."""
        assert digest_key(b"ab", "c", {}) != digest_key(b"a", "bc", {})

    def test_odd_values(self) -> None:
        """Bytes, floats, surrogates and non-UTF-8 content types still give a key."""
        assert digest_key(b"\xff", "text/\udcff", {"b": b"\x00", "f": float("nan"), "s": "\ud800"}).startswith(
            "digest:")


# --- property-based tests -------------------------------------------------------------------------
#
# 10,000 examples in all. Strategies are kept lean on purpose: hypothesis costs ~0.2 ms a choice here,
# so values that matter (SPECIAL, TIMES, NAMES...) are sampled whole and random ones kept short;
# decode() stops at the first bad byte or field anyway.

CONTENT_TYPES = [None, "", "application/json", "text/json", "application/json; charset=utf-8", "APPLICATION/JSON",
                 "application/x-python-serialize", "application/python-pickle", "application/x-yaml",
                 "application/x-msgpack", "text/plain", "application/octet-stream", ";", "\x00"]
ENCODINGS = [None, "", "utf-8", "UTF8", "binary", "gzip", "utf-16"]
NAMES = ["ecoworker.noop", "upload_to_s3", "t", "", " ", "a\nb", "x" * (MAX_NAME + 1)]
KEYS = ["a", "_b", "size", "ctx", "self", "not-a-name", "1st", "", "名前", "a b"]
TIMES = ["2030-01-01T00:00:00+00:00", "2030-01-01T00:00:00", "2030-01-01T02:00:00+02:00", "2030-01-01",
         "2001-01-01T00:00:00.5Z", "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59.999999-23:59",
         "2030-02-30T00:00:00", "tomorrow", "", "1700000000", "2030-01-01T00:00:00+24:00"]
#: Values that matter to decode() in some header or field, mixed into the random ones.
SPECIAL = [None, True, False, 0, 1, -1, 3, 2**63, 2**70, 0.5, -1.0, math.nan, math.inf, b"", b"\xff", b"id",
           [], [None, None], [30, 20], [None, 5], [0, None], [1, 2, 3], {}, {"a": 1}, TASK_ID, "x" * 300,
           *NAMES, *TIMES]

ZONES = [None, UTC, timezone(timedelta(hours=2)), timezone(-timedelta(hours=4, minutes=30)),
         timezone(timedelta(hours=23, minutes=59)), timezone(-timedelta(hours=23, minutes=59))]


def _iso(seconds: int, zone: timezone | None) -> str:
    when = datetime.fromtimestamp(seconds, UTC)
    return when.replace(tzinfo=None).isoformat() if zone is None else when.astimezone(zone).isoformat()


JSON_SPECIAL = [v for v in SPECIAL if not isinstance(v, bytes) and (not isinstance(v, float) or math.isfinite(v))]

short_text = st.text(max_size=6)
iso_times = st.builds(_iso, st.integers(-62135510400, 253402214400), st.sampled_from(ZONES))
scalars = st.one_of(st.sampled_from(SPECIAL), st.integers(), st.floats(), short_text, iso_times)
header_values = scalars | st.binary(max_size=6) | st.lists(scalars, max_size=2)
HEADER_KEYS = ["task", "id", "retries", "eta", "expires", "timelimit", "compression", "root_id", "parent_id",
               "lang", "argsrepr", "x-ecoworker-replay"]
# (a list of pairs rather than st.dictionaries: the same dicts, a third cheaper to draw)
header_dicts = st.lists(st.tuples(st.sampled_from(HEADER_KEYS) | short_text, header_values), max_size=2).map(dict)
IDS = [None, "", TASK_ID, "m1", "x" * (MAX_ID + 1), "a\nb", b"bytes-id", 7]
ids = st.sampled_from(IDS) | st.text(max_size=8)
#: (content type, content encoding, max_body_bytes) combinations, drawn as one choice.
PROPERTIES = list(itertools.product(CONTENT_TYPES, ENCODINGS, [1, 16, 1024 * 1024]))
json_values = st.recursive(
    st.one_of(st.sampled_from(JSON_SPECIAL), st.integers(), short_text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | short_text, inner, max_size=2),
    max_leaves=3,
)
#: Well-formed bodies, so that the properties and headers decide the outcome rather than the bytes.
BODIES = [dumps({"id": TASK_ID, "task": "t", "args": [1], "kwargs": {"a": 1}}), dumps({"task": "t"}),
          dumps({"id": "x", "task": "t", "eta": "2030-01-01T00:00:00"}), dumps([[1], {"a": 1}, EMBED]),
          dumps([[], {}, EMBED]), dumps([[], {}]), b"", b"null", b"{}", b"[]"]


def check_decode(body: bytes, **props: Any) -> TaskMessage | None:
    """decode() returns a well-formed TaskMessage or raises a DecodeError with a known reason."""
    try:
        msg = decode(body, **props)
    except DecodeError as exc:
        assert exc.reason in REASONS, exc.reason
        assert str(exc)
        assert exc.task_id is None or isinstance(exc.task_id, str)
        return None
    assert isinstance(msg, TaskMessage)
    assert isinstance(msg.id, str) and 0 < len(msg.id) <= MAX_ID and msg.id.isprintable()
    assert isinstance(msg.task, str) and 0 < len(msg.task) <= MAX_NAME and msg.task.isprintable()
    assert isinstance(msg.args, list)
    assert isinstance(msg.kwargs, dict) and all(k.isidentifier() for k in msg.kwargs)
    assert msg.eta is None or math.isfinite(msg.eta)
    assert msg.expires is None or math.isfinite(msg.expires)
    assert type(msg.retries) is int and msg.retries >= 0
    assert msg.timelimit is None or msg.timelimit > 0
    assert msg.protocol in ("native", "celery")
    return msg


def field(*special: Any) -> st.SearchStrategy[Any]:
    """A field's value: one of the `special` ones that matter to it, or any JSON value."""
    return st.sampled_from(special) | json_values


native_docs = st.fixed_dictionaries({}, optional={
    "id": field(TASK_ID, "t-1", "", None, "x" * (MAX_ID + 1), "a\nb", 5),
    "task": field(*NAMES),
    "args": field([], [1, "a"], None, {}),
    "kwargs": field({}, {"a": 1}, {"not-a-name": 1}, {"": 0}, None, []),
    "eta": field(*TIMES) | iso_times,
    "expires": field(*TIMES) | iso_times,
    "max_retries": field(0, 3, 1000, 1001, -1, True, 2.5),
})
celery_headers_st = st.fixed_dictionaries({"task": st.sampled_from(NAMES)}, optional={
    "id": ids,
    "retries": field(0, 2, -1, "1", True),
    "eta": field(*TIMES),
    "expires": field(*TIMES),
    "timelimit": field([None, None], [30, 20], [None, 5], [0, None], [1, 2, 3], "30", [math.inf, None]),
    "compression": st.sampled_from([None, "zlib"]),
})
celery_bodies = json_values | st.tuples(field([], [1, "a"], None, {}),
                                        field({}, {"a": 1}, {"not-a-name": 1}, None, []),
                                        st.just(EMBED)).map(list)


class TestDecodeProperties:
    """Whatever arrives, decode() returns a TaskMessage or raises DecodeError, nothing else."""

    @settings(max_examples=7000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=st.sampled_from(BODIES) | st.binary(max_size=48), headers=header_dicts,
           props=st.sampled_from(PROPERTIES), message_id=st.sampled_from(IDS), correlation_id=st.sampled_from(IDS))
    def test_arbitrary_deliveries(self, body: bytes, headers: dict[str, Any],
                                  props: tuple[str | None, str | None, int], message_id: Any,
                                  correlation_id: Any) -> None:
        """Arbitrary bytes, headers and properties never make decode() raise anything but DecodeError."""
        content_type, content_encoding, max_body_bytes = props
        msg = check_decode(body, content_type=content_type, content_encoding=content_encoding, headers=headers or None,
                           message_id=message_id, correlation_id=correlation_id, max_body_bytes=max_body_bytes)
        if msg is not None:
            assert len(body) <= max_body_bytes
            assert (content_type or "").split(";")[0].strip().lower() not in (
                "application/x-python-serialize", "application/python-pickle")

    @settings(max_examples=1200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(doc=native_docs | json_values, message_id=st.none() | st.sampled_from(["m1", "", "a\tb"]))
    def test_native_shaped_json(self, doc: Any, message_id: str | None) -> None:
        """JSON envelopes with or without id, task and fields decode or are refused with a reason."""
        msg = check_decode(dumps(doc), content_type=JSON, message_id=message_id)
        if msg is not None:
            assert isinstance(doc, dict)
            assert msg.protocol == "native"
            assert msg.task == doc["task"]
            assert msg.id in (doc.get("id"), message_id)

    @settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=celery_bodies, headers=celery_headers_st,
           correlation_id=st.none() | st.just(TASK_ID))
    def test_celery_shaped_json(self, body: Any, headers: dict[str, Any], correlation_id: str | None) -> None:
        """Celery bodies and header sets decode or are refused with a reason."""
        msg = check_decode(dumps(body), content_type=JSON, headers=headers, correlation_id=correlation_id)
        if msg is not None:
            assert msg.protocol == "celery"
            assert [msg.args, msg.kwargs] == orjson.loads(dumps(body))[:2]


#: Printable characters from several scripts and widths (space included): ids and names may use any of them.
PRINTABLE = "aZ09 -_.:/#@=+~é名ü€Ω😀ﬁ"
printable = st.text(PRINTABLE, min_size=1, max_size=12)
safe_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
              st.floats(allow_nan=False, allow_infinity=False), st.text(PRINTABLE + "\n\x00\u2028", max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(PRINTABLE, max_size=4), inner, max_size=2),
    max_leaves=3,
)
epochs = st.none() | st.floats(min_value=-2e9, max_value=7e9)
valid_messages = st.builds(
    TaskMessage,
    id=printable | st.just("i" * MAX_ID),
    task=printable | st.just("t" * MAX_NAME),
    args=st.lists(safe_json, max_size=3),
    kwargs=st.dictionaries(st.sampled_from([k for k in KEYS if k.isidentifier()]), safe_json, max_size=2),
    eta=epochs,
    expires=epochs,
    max_retries=st.none() | st.integers(0, 1000),
)


class TestRoundTripProperties:
    """Every valid native message survives encode → decode."""

    @settings(max_examples=800, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(msg=valid_messages, with_message_id=st.booleans())
    def test_round_trip(self, msg: TaskMessage, with_message_id: bool) -> None:
        """decode(encode(msg)) equals msg, times to the microsecond."""
        again = decode(encode(msg), content_type=JSON, message_id=msg.id if with_message_id else None)
        for name in ("eta", "expires"):
            before, after = getattr(msg, name), getattr(again, name)
            assert (before is None) == (after is None)
            if before is not None:
                assert math.isclose(before, after, rel_tol=0, abs_tol=2e-6), (name, before, after)
        assert replace(again, eta=msg.eta, expires=msg.expires) == msg
