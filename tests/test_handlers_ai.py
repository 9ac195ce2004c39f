"""The ai handlers with the real openai client against the OpenAI stand-in, real S3 and
real tesseract; plus the handler settings."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import os
import time
import traceback
from pathlib import Path

import pytest
from PIL import ExifTags, Image, ImageDraw, ImageFont

from ecoworker.errors import ConfigError, PermanentError, Retry
from ecoworker.registry import TaskContext
from handlers.ai import (
    CATEGORIES,
    CLASSIFICATION_FORMAT,
    chat_with_llm,
    classify_waste_image,
    extract_text_from_image,
    parse_tesseract_tsv,
)
from handlers.base import HandlerSettings, Resources, open_resources, retry_after
from tests.handler_fixtures import *  # noqa: F403
from tests.handler_fixtures import MakeResources, make_ctx, put_object
from tests.openai_server import DEFAULT_CLASSIFICATION, OpenAIServer, Reply

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
KEY = "sk-test-SECRETSECRETSECRET1234"


def ai_ctx(resources: Resources, task: str = "chat_with_llm") -> TaskContext:
    return make_ctx(resources, task, queue="ai")


def jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 160, 60)).save(buffer, "JPEG")
    return buffer.getvalue()


class TestChat:
    async def test_prompt_returns_text_and_usage(self, resources: Resources, openai_server: OpenAIServer) -> None:
        """A prompt gets the model's text, the model name and token usage back."""
        result = await chat_with_llm(ai_ctx(resources), prompt="hello there")
        assert result == {
            "text": "echo: hello there",
            "model": "gpt-4o-mini",
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
        }
        (request,) = openai_server.requests
        assert request.body["model"] == "gpt-4o-mini"
        assert request.body["messages"] == [{"role": "user", "content": "hello there"}]
        assert "max_tokens" not in request.body

    async def test_messages_system_model_and_max_tokens(
        self, resources: Resources, openai_server: OpenAIServer
    ) -> None:
        """Messages are sent after the system prompt, with the given model and token limit."""
        messages = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "what bin for glass?"},
        ]
        result = await chat_with_llm(
            ai_ctx(resources), messages=messages, system="be brief", model="local-llama", max_tokens=50
        )
        assert result["text"] == "echo: what bin for glass?"
        assert result["model"] == "local-llama"
        body = openai_server.requests[0].body
        assert body["messages"] == [{"role": "system", "content": "be brief"}, *messages]
        assert body["max_tokens"] == 50  # a compatible server (base URL set) gets the classic name

    @pytest.mark.parametrize(
        "kwargs",
        [
            {},
            {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
            {"prompt": "  "},
            {"messages": [{"role": "robot", "content": "x"}]},
            {"prompt": "a", "max_tokens": 0},
            {"prompt": "a", "model": "bad model name"},
        ],
        ids=["none", "both", "blank", "bad-role", "bad-max-tokens", "bad-model"],
    )
    async def test_bad_arguments(self, resources: Resources, openai_server: OpenAIServer, kwargs: dict) -> None:
        """Malformed arguments fail permanently without calling the API."""
        with pytest.raises(PermanentError):
            await chat_with_llm(ai_ctx(resources), **kwargs)
        assert openai_server.requests == []

    async def test_rate_limit_honours_retry_after(self, resources: Resources, openai_server: OpenAIServer) -> None:
        """429 with Retry-After becomes Retry(after=<that many seconds>)."""
        openai_server.push(Reply.error(429, "slow down", headers={"Retry-After": "7"}))
        with pytest.raises(Retry) as caught:
            await chat_with_llm(ai_ctx(resources), prompt="hi")
        assert caught.value.after == 7.0
        assert len(openai_server.requests) == 1  # the client itself did not retry

    async def test_server_error_then_success(self, resources: Resources, openai_server: OpenAIServer) -> None:
        """A 500 becomes Retry with no fixed delay; the next attempt succeeds."""
        openai_server.push(Reply.error(500, "boom"))
        with pytest.raises(Retry) as caught:
            await chat_with_llm(ai_ctx(resources), prompt="hi")
        assert caught.value.after is None
        assert "HTTP 500" in str(caught.value)
        result = await chat_with_llm(ai_ctx(resources), prompt="hi")
        assert result["text"] == "echo: hi"

    async def test_timeout_is_retried(self, make_resources: MakeResources, openai_server: OpenAIServer) -> None:
        """A server slower than the client timeout gives Retry, promptly."""
        resources = await make_resources(openai_timeout=0.3)
        openai_server.push(Reply(delay=3))
        started = time.monotonic()
        with pytest.raises(Retry, match="did not answer in time"):
            await chat_with_llm(ai_ctx(resources), prompt="hi")
        assert time.monotonic() - started < 2

    async def test_unreachable_server_is_retried(self, make_resources: MakeResources) -> None:
        """A refused connection gives Retry."""
        resources = await make_resources(openai_base_url="http://127.0.0.1:9/v1")
        with pytest.raises(Retry, match="cannot reach"):
            await chat_with_llm(ai_ctx(resources), prompt="hi")

    async def test_unauthorized_is_permanent_and_hides_the_key(
        self, make_resources: MakeResources, openai_server: OpenAIServer
    ) -> None:
        """401 fails permanently, says to check the key, and never repeats the key."""
        resources = await make_resources(env={"OPENAI_API_KEY": KEY})
        openai_server.push(Reply.error(401, f"Incorrect API key provided: {KEY}.", code="invalid_api_key"))
        with pytest.raises(PermanentError, match="check OPENAI_API_KEY") as caught:
            await chat_with_llm(ai_ctx(resources), prompt="hi")
        assert openai_server.requests[0].headers["authorization"] == f"Bearer {KEY}"
        logged = "".join(traceback.format_exception(caught.value))  # what a log line would show
        assert "Incorrect API key" in logged and "SECRET" not in logged
        assert "SECRET" not in repr(resources.settings)

    @pytest.mark.parametrize(
        ("reply", "message"),
        [
            (Reply.error(400, "bad request"), "HTTP 400"),
            (Reply.error(404, "no such model"), "check the model name"),
            (Reply.error(400, "unsafe", code="content_policy_violation"), "content policy"),
            (Reply(content="", finish_reason="content_filter"), "content filter"),
            (Reply.error(429, "no money", code="insufficient_quota"), "quota"),
        ],
        ids=["400", "404", "policy", "filtered", "quota"],
    )
    async def test_client_errors_are_permanent(
        self, resources: Resources, openai_server: OpenAIServer, reply: Reply, message: str
    ) -> None:
        """400/404, content-policy rejections, filtered answers and exhausted quota fail at once."""
        openai_server.push(reply)
        with pytest.raises(PermanentError, match=message):
            await chat_with_llm(ai_ctx(resources), prompt="hi")


class TestClassify:
    async def test_s3_image_with_json_schema(self, resources: Resources, openai_server: OpenAIServer) -> None:
        """An S3 image goes to the vision model as a data URL with the strict JSON schema; the
        checked classification comes back."""
        image = jpeg()
        await put_object(resources, "bins/item.jpg", image)
        result = await classify_waste_image(ai_ctx(resources, "classify_waste_image"), source_key="bins/item.jpg")
        assert result == DEFAULT_CLASSIFICATION | {"model": "gpt-4o"}
        assert result["category"] in CATEGORIES
        (request,) = openai_server.requests
        assert request.body["model"] == "gpt-4o"
        assert request.body["response_format"] == CLASSIFICATION_FORMAT
        schema = request.body["response_format"]["json_schema"]
        assert (schema["name"], schema["strict"]) == ("waste_classification", True)
        (url,) = request.image_urls()
        prefix = "data:image/jpeg;base64,"
        assert url.startswith(prefix)
        assert base64.b64decode(url[len(prefix) :]) == image

    async def test_image_url_is_passed_on(self, resources: Resources, openai_server: OpenAIServer) -> None:
        """An http(s) image URL is given to the API as is."""
        await classify_waste_image(ai_ctx(resources), image_url="https://img.example/x.png")
        assert openai_server.requests[0].image_urls() == ["https://img.example/x.png"]

    async def test_invalid_then_valid(self, resources: Resources, openai_server: OpenAIServer) -> None:
        """An invalid answer is corrected once inside the same call."""
        openai_server.push(Reply(content="I think it is plastic"))
        result = await classify_waste_image(ai_ctx(resources), image_url="https://img.example/x.png")
        assert result["category"] == "recyclable_plastic"
        _, second = openai_server.requests
        assert second.body["messages"][-2] == {"role": "assistant", "content": "I think it is plastic"}
        assert "not JSON" in second.body["messages"][-1]["content"]

    async def test_invalid_twice_fails_with_raw_text(self, resources: Resources, openai_server: OpenAIServer) -> None:
        """Two schema-invalid answers fail permanently, keeping the raw answer in the message."""
        bad = json.dumps({"category": "spaceship", "confidence": 0.5, "disposal_instructions": "launch"})
        openai_server.push(Reply(content=bad), Reply(content=bad))
        with pytest.raises(PermanentError, match="invalid classification twice") as caught:
            await classify_waste_image(ai_ctx(resources), image_url="https://img.example/x.png")
        assert "spaceship" in str(caught.value)
        assert len(openai_server.requests) == 2

    @pytest.mark.parametrize(
        "answer",
        [
            {"category": "glass", "confidence": 1.5, "disposal_instructions": "x"},
            {"category": "glass", "confidence": True, "disposal_instructions": "x"},
            {"category": "glass", "confidence": 0.5, "disposal_instructions": ""},
            {"category": "glass", "confidence": 0.5},
            ["glass"],
        ],
        ids=["range", "bool", "empty-text", "missing", "not-object"],
    )
    async def test_schema_checks(self, resources: Resources, openai_server: OpenAIServer, answer: object) -> None:
        """Out-of-range, mistyped or missing fields are rejected (twice: permanent)."""
        openai_server.push(Reply(content=json.dumps(answer)), Reply(content=json.dumps(answer)))
        with pytest.raises(PermanentError, match="invalid classification"):
            await classify_waste_image(ai_ctx(resources), image_url="https://img.example/x.png")

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({}, "exactly one"),
            ({"source_key": "a.jpg", "image_url": "https://x/y.jpg"}, "exactly one"),
            ({"image_url": "file:///etc/passwd"}, "not an http"),
            ({"source_key": "text.txt"}, "not an image the API accepts"),
            ({"source_key": "missing.jpg"}, "NoSuchKey"),
        ],
        ids=["none", "both", "file-url", "not-image", "missing"],
    )
    async def test_bad_sources(
        self, resources: Resources, openai_server: OpenAIServer, kwargs: dict, message: str
    ) -> None:
        """Missing, doubled, non-http, non-image and absent sources fail without an API call."""
        await put_object(resources, "text.txt", b"hello")
        with pytest.raises(PermanentError, match=message):
            await classify_waste_image(ai_ctx(resources), **kwargs)
        assert openai_server.requests == []


def text_image(words: str, rotate_with_exif: bool = False) -> bytes:
    """A white image with `words` in black DejaVu Sans at 40 px (PNG, or an EXIF-rotated JPEG)."""
    if not FONT.exists():
        pytest.skip(f"OCR test needs the font {FONT} (Debian: fonts-dejavu-core)")
    image = Image.new("RGB", (900, 160), "white")
    ImageDraw.Draw(image).text((30, 50), words, fill="black", font=ImageFont.truetype(str(FONT), 40))
    buffer = io.BytesIO()
    if rotate_with_exif:  # stored on its side; EXIF orientation 8 turns it upright for display
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = 8
        image.transpose(Image.Transpose.ROTATE_270).save(buffer, "JPEG", quality=95, exif=exif)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def tesseract_children() -> list[int]:
    """Pids of live tesseract processes started by this process."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            comm = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, IndexError):
            continue
        if comm == "tesseract" and int(fields[1]) == os.getpid() and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


class TestOCR:
    async def test_tesseract_file(self, resources: Resources, upload_root: Path) -> None:
        """tesseract reads the words of a file under the upload root with a high confidence."""
        (upload_root / "scan.png").write_bytes(text_image("Recycle glass bottles 2024"))
        result = await extract_text_from_image(ai_ctx(resources), file_path="scan.png", engine="tesseract")
        assert result["engine"] == "tesseract"
        for word in ("Recycle", "glass", "bottles", "2024"):
            assert word in result["text"]
        assert result["confidence"] > 50

    async def test_tesseract_s3_rotated(self, resources: Resources) -> None:
        """An S3 JPEG stored sideways is turned upright per EXIF before tesseract reads it."""
        await put_object(resources, "scan.jpg", text_image("Paper and cardboard", rotate_with_exif=True))
        result = await extract_text_from_image(ai_ctx(resources), source_key="scan.jpg", engine="tesseract")
        assert "Paper and cardboard" in result["text"]

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"file_path": "scan.png", "lang": "eng; rm -rf /"}, "lang"),
            ({"file_path": "scan.png", "lang": "xyz"}, "no language data for 'xyz'"),
            ({"image_url": "https://img.example/x.png"}, "use engine='openai'"),
            ({"file_path": "../outside.png"}, "outside the upload root"),
            ({"file_path": "scan.png", "engine": "magic"}, "engine"),
        ],
        ids=["bad-lang", "unknown-lang", "url", "traversal", "bad-engine"],
    )
    async def test_tesseract_refusals(
        self, resources: Resources, upload_root: Path, kwargs: dict, message: str
    ) -> None:
        """Bad languages, URLs, paths outside the root and unknown engines fail permanently."""
        (upload_root / "scan.png").write_bytes(text_image("x"))
        with pytest.raises(PermanentError, match=message):
            await extract_text_from_image(ai_ctx(resources), **{"engine": "tesseract", **kwargs})

    async def test_cancelled_task_kills_tesseract(self, resources: Resources, upload_root: Path) -> None:
        """Cancelling the task (its timeout) kills the tesseract process: no orphan keeps running."""
        buffer = io.BytesIO()
        Image.effect_noise((1500, 1500), 80).convert("L").save(buffer, "PNG")  # seconds of work
        (upload_root / "noise.png").write_bytes(buffer.getvalue())
        task = asyncio.create_task(
            extract_text_from_image(ai_ctx(resources), file_path="noise.png", engine="tesseract")
        )
        for _ in range(200):
            if tesseract_children():
                break
            await asyncio.sleep(0.05)
        assert tesseract_children(), "tesseract never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert tesseract_children() == []

    async def test_openai_engine(self, resources: Resources, openai_server: OpenAIServer) -> None:
        """engine='openai' sends the image to the vision model and returns its transcription."""
        image = text_image("Hello")
        await put_object(resources, "note.png", image)
        openai_server.push(Reply(content="Hello\n"))
        result = await extract_text_from_image(ai_ctx(resources), source_key="note.png", engine="openai")
        assert result == {"text": "Hello", "engine": "openai", "confidence": None, "model": "gpt-4o"}
        (url,) = openai_server.requests[0].image_urls()
        assert url == "data:image/png;base64," + base64.b64encode(image).decode()

    def test_tsv_parsing(self) -> None:
        """Lines and paragraphs survive, non-words are skipped, confidence is the word mean."""
        head = "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext"
        rows = [
            "1\t1\t0\t0\t0\t0\t0\t0\t10\t10\t-1\t",
            "5\t1\t1\t1\t1\t1\t0\t0\t1\t1\t90\tfirst",
            "5\t1\t1\t1\t1\t2\t0\t0\t1\t1\t80\tline",
            "5\t1\t1\t1\t2\t1\t0\t0\t1\t1\t70\tsecond",
            "5\t1\t2\t1\t1\t1\t0\t0\t1\t1\t60\tnext",
        ]
        assert parse_tesseract_tsv("\n".join([head, *rows])) == ("first line\nsecond\n\nnext", 75.0)
        assert parse_tesseract_tsv(head) == ("", None)


class TestSettings:
    def test_defaults(self) -> None:
        """An empty environment gives the documented defaults."""
        settings = HandlerSettings.from_env({"PATH": "/nonexistent"})
        assert settings.bucket == "ecoeco-uploads"
        assert settings.upload_root == Path("/var/lib/ecoeco/uploads")
        assert (settings.vision_model, settings.chat_model) == ("gpt-4o", "gpt-4o-mini")
        assert settings.ocr_engine == "openai"  # no tesseract on that PATH
        assert settings.max_download_bytes == 50 * 1024 * 1024
        assert settings.max_image_pixels == 50_000_000
        assert (settings.image_processes, settings.openai_timeout) == (2, 60.0)

    def test_environment(self, tmp_path: Path) -> None:
        """Each variable lands in its setting; the key file is read and never shown."""
        key_file = tmp_path / "key"
        key_file.write_text(KEY + "\n")
        settings = HandlerSettings.from_env(
            {
                "S3_BUCKET": "fallback-bucket",
                "ECOWORKER_UPLOAD_ROOT": "/srv/up",
                "OPENAI_API_KEY_FILE": str(key_file),
                "OPENAI_BASE_URL": "http://llm:8000/v1/",
                "ECOWORKER_OCR_ENGINE": "OpenAI",
                "ECOWORKER_MAX_IMAGE_PIXELS": "1000",
                "AWS_REGION": "eu-central-1",
            }
        )
        assert settings.bucket == "fallback-bucket"
        assert settings.upload_root == Path("/srv/up")
        assert settings.openai_api_key is not None and settings.openai_api_key.get() == KEY
        assert settings.openai_base_url == "http://llm:8000/v1"
        assert (settings.ocr_engine, settings.max_image_pixels) == ("openai", 1000)
        assert settings.aws_region == "eu-central-1"
        assert "SECRET" not in repr(settings) and "SECRET" not in str(settings.openai_api_key)

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"ECOWORKER_MAX_DOWNLOAD_BYTES": "lots"}, "ECOWORKER_MAX_DOWNLOAD_BYTES='lots' is not a number"),
            ({"ECOWORKER_IMAGE_PROCESSES": "0"}, "at least 1"),
            ({"ECOWORKER_OCR_ENGINE": "magic"}, "ECOWORKER_OCR_ENGINE"),
            ({"OPENAI_BASE_URL": "llm:8000"}, "OPENAI_BASE_URL"),
            ({"ECOWORKER_UPLOAD_ROOT": "relative/dir"}, "absolute"),
            ({"ECOWORKER_S3_BUCKET": "Bad_Bucket"}, "bucket name"),
            ({"OPENAI_API_KEY": "a", "OPENAI_API_KEY_FILE": "/k"}, "only one"),
            ({"OPENAI_API_KEY_FILE": "/nonexistent/key"}, "cannot be read"),
        ],
    )
    def test_bad_values(self, env: dict[str, str], message: str) -> None:
        """Bad values raise ConfigError naming the variable."""
        with pytest.raises(ConfigError, match=message):
            HandlerSettings.from_env(env)

    async def test_ai_queue_needs_a_key_or_base_url(self) -> None:
        """Serving 'ai' without OPENAI_API_KEY or OPENAI_BASE_URL is a ConfigError at start-up;
        serving only 'storage' is fine."""
        settings = HandlerSettings.from_env({})
        settings.check_for_queues(["storage"])
        with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
            async with open_resources(settings, ["storage", "ai"]):
                pass
        HandlerSettings.from_env({"OPENAI_API_KEY": KEY}).check_for_queues(["ai"])
        HandlerSettings.from_env({"OPENAI_BASE_URL": "http://llm/v1"}).check_for_queues(["ai"])

    def test_tesseract_engine_needs_the_binary(self) -> None:
        """ECOWORKER_OCR_ENGINE=tesseract without the binary is a ConfigError for 'ai'."""
        settings = HandlerSettings.from_env(
            {"PATH": "/nonexistent", "ECOWORKER_OCR_ENGINE": "tesseract", "OPENAI_API_KEY": KEY}
        )
        with pytest.raises(ConfigError, match="no `tesseract` binary"):
            settings.check_for_queues(["ai"])

    def test_retry_after_forms(self) -> None:
        """Retry-After is read as seconds, an HTTP date, or retry-after-ms; junk is ignored."""
        assert retry_after({"Retry-After": "12"}) == 12.0
        assert retry_after({"retry-after-ms": "1500"}) == 1.5
        future = email.utils.formatdate(time.time() + 30, usegmt=True)
        assert 25 <= (retry_after({"Retry-After": future}) or 0) <= 31
        assert retry_after({"Retry-After": "soon"}) is None
        assert retry_after({}) is None
