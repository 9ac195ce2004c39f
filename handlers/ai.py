"""The `ai` queue: waste classification (vision + JSON schema), chat, and OCR.

All calls go through the one AsyncOpenAI client in `Resources` (built with
`max_retries=0`: the worker retries, with back-off, from its journal), so any
OpenAI-compatible server works via OPENAI_BASE_URL. Images from S3 or the
upload root are sent inline as base64 data URLs; http(s) URLs are passed on
for the API to fetch. OCR runs the local `tesseract` binary as a subprocess
(the loop never blocks) or asks the vision model, as configured.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
from typing import Any

from openai.types.chat import ChatCompletion

from ecoworker.errors import PermanentError, Retry
from ecoworker.registry import DEFAULT_TRANSIENT, Registry, RetryPolicy, TaskContext
from handlers import images
from handlers.base import OCR_ENGINES, MiB, get_resources, run_in_pool
from handlers.llm import OPENAI_TRANSIENT, openai_errors, require_openai
from handlers.paths import read_upload_file
from handlers.s3 import S3_TRANSIENT, download_object, validate_bucket, validate_s3_key

registry = Registry()

AI_RETRY = RetryPolicy(
    max_retries=5, retry_on=(*DEFAULT_TRANSIENT, *S3_TRANSIENT, *OPENAI_TRANSIENT), backoff_base=2.0, backoff_max=300.0
)
MAX_INLINE_IMAGE_BYTES = 20 * MiB  # OpenAI's limit for one image
RAW_KEPT = 500  # characters of an invalid answer kept in the error message

CATEGORIES = (
    "general", "recyclable_plastic", "paper", "glass", "metal",
    "food_waste", "hazardous", "electronics", "bulky", "other",
)  # fmt: skip
CLASSIFICATION_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "waste_classification",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "category": {"type": "string", "enum": list(CATEGORIES)},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "disposal_instructions": {"type": "string"},
            },
            "required": ["category", "confidence", "disposal_instructions"],
            "additionalProperties": False,
        },
    },
}
CLASSIFY_PROMPT = (
    "You sort household waste. Look at the item in the image and answer with its waste "
    f"category (one of: {', '.join(CATEGORIES)}), your confidence from 0 to 1, and short, "
    "practical disposal instructions (one or two sentences)."
)
OCR_PROMPT = (
    "You are an OCR engine. Transcribe all text visible in the image exactly as written, "
    "keeping line breaks. Reply with the text only, without comments or formatting. "
    "If there is no text, reply with an empty message."
)
CHAT_ROLES = ("system", "developer", "user", "assistant")
_LANG = re.compile(r"[A-Za-z0-9_+]{1,64}")
_URL = re.compile(r"https?://[^\s]{1,8000}")


# --------------------------------------------------------------------------- tasks


@registry.task("classify_waste_image", queue="ai", timeout=180.0, concurrency=8, retry=AI_RETRY)
async def classify_waste_image(
    ctx: TaskContext, source_key: str | None = None, image_url: str | None = None
) -> dict[str, Any]:
    """Classify the waste item in an image (S3 object or URL) with the vision model."""
    settings = get_resources(ctx).settings
    action = f"task {ctx.task_id}: classifying an image"
    url = await _image_url(ctx, source_key=source_key, image_url=image_url)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": CLASSIFY_PROMPT},
        {"role": "user", "content": [_image_part(url)]},
    ]
    for attempt in (1, 2):  # an invalid answer gets one correction inside this call
        completion = await _complete(
            ctx,
            action,
            model=settings.vision_model,
            messages=messages,
            response_format=CLASSIFICATION_FORMAT,
        )
        raw = _answer(completion, action)
        try:
            return _parse_classification(raw) | {"model": completion.model or settings.vision_model}
        except ValueError as exc:
            problem = str(exc)
        ctx.logger.warning("invalid classification (attempt %d of 2): %s", attempt, problem)
        correction = f"That answer is invalid: {problem}. Answer again with only a JSON object matching the schema."
        messages = [*messages, {"role": "assistant", "content": raw[:4000]}, {"role": "user", "content": correction}]
    raise PermanentError(
        f"{action}: the model gave an invalid classification twice ({problem}); raw answer: {raw[:RAW_KEPT]!r}"
    )


@registry.task("chat_with_llm", queue="ai", timeout=300.0, concurrency=16, retry=AI_RETRY)
async def chat_with_llm(
    ctx: TaskContext,
    prompt: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    system: str | None = None,
    model: str | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """One chat completion: a `prompt` or a list of `messages`; returns text and token usage."""
    settings = get_resources(ctx).settings
    action = f"task {ctx.task_id}: chat completion"
    request: dict[str, Any] = {
        "model": _model(model, settings.chat_model),
        "messages": _conversation(prompt, messages, system),
    }
    if max_tokens is not None:
        if type(max_tokens) is not int or not 1 <= max_tokens <= 1_000_000:
            raise PermanentError(f"{action}: max_tokens must be an integer 1..1000000")
        # api.openai.com wants the new name; compatible servers know the old one.
        name = "max_completion_tokens" if settings.openai_base_url is None else "max_tokens"
        request[name] = max_tokens
    completion = await _complete(ctx, action, **request)
    text = _answer(completion, action)
    usage = completion.usage
    return {
        "text": text,
        "model": completion.model or request["model"],
        "finish_reason": completion.choices[0].finish_reason,
        "usage": {
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "total_tokens": usage.total_tokens if usage else 0,
        },
    }


@registry.task("extract_text_from_image", queue="ai", timeout=180.0, concurrency=4, retry=AI_RETRY)
async def extract_text_from_image(
    ctx: TaskContext,
    source_key: str | None = None,
    file_path: str | None = None,
    image_url: str | None = None,
    engine: str | None = None,
    lang: str = "eng",
) -> dict[str, Any]:
    """OCR an image (S3 object, file under the upload root, or URL) with tesseract or OpenAI."""
    settings = get_resources(ctx).settings
    engine = settings.ocr_engine if engine is None else engine
    if engine not in OCR_ENGINES:
        raise PermanentError(f"task {ctx.task_id}: engine {engine!r:.40} is not one of {OCR_ENGINES}")
    if not isinstance(lang, str) or not _LANG.fullmatch(lang):
        raise PermanentError(f"task {ctx.task_id}: lang {lang!r:.40} must be like 'eng' or 'eng+deu'")
    sources = {"source_key": source_key, "file_path": file_path, "image_url": image_url}
    if engine == "openai":
        action = f"task {ctx.task_id}: OCR with the vision model"
        url = await _image_url(ctx, **sources)
        completion = await _complete(
            ctx,
            action,
            model=settings.vision_model,
            messages=[
                {"role": "system", "content": OCR_PROMPT},
                {"role": "user", "content": [_image_part(url)]},
            ],
        )
        text = _answer(completion, action).strip()
        return {"text": text, "engine": "openai", "confidence": None, "model": completion.model}
    if image_url is not None:
        raise PermanentError(
            f"task {ctx.task_id}: tesseract reads S3 objects and files only; use engine='openai' for an image_url"
        )
    data = await _image_bytes(ctx, settings.max_download_bytes, **sources)
    try:
        png = await run_in_pool(ctx, images.prepare_for_ocr, data, settings.max_image_pixels)
    except images.ImageError as exc:
        raise PermanentError(f"task {ctx.task_id}: {exc}") from None
    text, confidence = parse_tesseract_tsv(await _tesseract(ctx, png, lang))
    return {"text": text, "engine": "tesseract", "confidence": confidence, "lang": lang}


# --------------------------------------------------------------------------- OpenAI calls


async def _complete(ctx: TaskContext, action: str, **request: Any) -> ChatCompletion:
    client = require_openai(ctx)
    with openai_errors(action, get_resources(ctx).secrets):
        completion: ChatCompletion = await client.chat.completions.create(**request)
    return completion


def _answer(completion: ChatCompletion, action: str) -> str:
    """The text of the first choice; PermanentError when it was filtered or refused."""
    if not completion.choices:
        raise Retry(f"{action}: the API returned no choices")
    choice = completion.choices[0]
    if choice.finish_reason == "content_filter":
        raise PermanentError(f"{action}: the answer was withheld by the content filter")
    if choice.message.refusal:
        raise PermanentError(f"{action}: the model refused: {choice.message.refusal[:300]}")
    return choice.message.content or ""


def _parse_classification(raw: str) -> dict[str, Any]:
    """The checked classification in `raw`, or ValueError saying what is wrong with it."""
    try:
        value = json.loads(raw)
    except ValueError:
        raise ValueError("the answer is not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("the answer is not a JSON object")
    missing = {"category", "confidence", "disposal_instructions"} - value.keys()
    if missing:
        raise ValueError(f"fields missing: {sorted(missing)}")
    category, confidence = value["category"], value["confidence"]
    instructions = value["disposal_instructions"]
    if category not in CATEGORIES:
        raise ValueError(f"category {category!r:.60} is not one of {', '.join(CATEGORIES)}")
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, int | float)
        or not math.isfinite(confidence)
        or not 0 <= confidence <= 1
    ):
        raise ValueError(f"confidence {confidence!r:.40} is not a number from 0 to 1")
    if not isinstance(instructions, str) or not instructions.strip():
        raise ValueError("disposal_instructions is not a non-empty string")
    return {
        "category": category,
        "confidence": float(confidence),
        "disposal_instructions": instructions.strip(),
    }


def _model(model: object, default: str) -> str:
    if model is None:
        return default
    if not isinstance(model, str) or not re.fullmatch(r"[\w.:/@\-]{1,200}", model):
        raise PermanentError(f"model {model!r:.80} is not a valid model name")
    return model


def _conversation(prompt: object, messages: object, system: object) -> list[dict[str, Any]]:
    if (prompt is None) == (messages is None):
        raise PermanentError("give exactly one of prompt and messages")
    if system is not None and (not isinstance(system, str) or not system):
        raise PermanentError("system must be a non-empty string")
    head = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise PermanentError("prompt must be a non-empty string")
        return [*head, {"role": "user", "content": prompt}]
    if not isinstance(messages, list) or not 1 <= len(messages) <= 1000:
        raise PermanentError("messages must be a list of 1 to 1000 messages")
    for number, message in enumerate(messages, start=1):
        if (
            not isinstance(message, dict)
            or message.get("role") not in CHAT_ROLES
            or not isinstance(message.get("content"), str | list)
        ):
            raise PermanentError(
                f"message {number} must be an object with a role ({', '.join(CHAT_ROLES)}) "
                "and a content (string or list of parts)"
            )
    return [*head, *messages]


# --------------------------------------------------------------------------- images


def _one_source(sources: dict[str, object]) -> tuple[str, object]:
    given = [(name, value) for name, value in sources.items() if value is not None]
    if len(given) != 1:
        raise PermanentError(f"give exactly one of {', '.join(sources)} (got {len(given)})")
    return given[0]


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


async def _image_bytes(ctx: TaskContext, max_bytes: int, **sources: object) -> bytes:
    """The bytes of the one S3 object or upload-root file named in `sources`."""
    name, value = _one_source(sources)
    settings = get_resources(ctx).settings
    if name == "source_key":
        key = validate_s3_key(value, "source_key")
        return await download_object(ctx, validate_bucket(None, settings), key, max_bytes)
    if name == "file_path":
        return await read_upload_file(settings, value, max_bytes)
    raise PermanentError(f"{name} cannot be read locally")


async def _image_url(ctx: TaskContext, **sources: object) -> str:
    """An http(s) URL given by the task, or a base64 data URL of the S3 object / file."""
    name, value = _one_source(sources)
    if name == "image_url":
        if not isinstance(value, str) or not _URL.fullmatch(value):
            raise PermanentError(f"image_url {value!r:.100} is not an http(s) URL")
        return value
    limit = min(get_resources(ctx).settings.max_download_bytes, MAX_INLINE_IMAGE_BYTES)
    data = await _image_bytes(ctx, limit, **sources)
    content_type = images.sniff_image_type(data)
    if content_type is None:
        raise PermanentError(f"{name} {value!r:.200}: not an image the API accepts (PNG, JPEG, GIF, WebP)")
    encoded = await asyncio.to_thread(base64.b64encode, data)
    return f"data:{content_type};base64,{encoded.decode('ascii')}"


# --------------------------------------------------------------------------- tesseract


async def _tesseract(ctx: TaskContext, image: bytes, lang: str) -> str:
    """Run `tesseract stdin stdout -l LANG tsv`; kill it if the task is cancelled."""
    settings = get_resources(ctx).settings
    if not settings.tesseract_cmd:
        raise PermanentError("tesseract is not installed: install tesseract-ocr or use engine='openai'")
    # A minimal environment: one thread per run (the worker runs several), no secrets.
    env = {"OMP_THREAD_LIMIT": "1", "LC_ALL": "C"}
    if settings.tessdata_prefix:
        env["TESSDATA_PREFIX"] = settings.tessdata_prefix
    try:
        process = await asyncio.create_subprocess_exec(
            settings.tesseract_cmd, "stdin", "stdout", "-l", lang, "tsv",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )  # fmt: skip
    except OSError as exc:
        raise PermanentError(f"cannot run {settings.tesseract_cmd}: {exc.strerror}") from None
    try:
        out, err = await process.communicate(image)
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    code = await process.wait()  # already exited: gives the code as an int
    if code == 0:
        return out.decode("utf-8", errors="replace")
    message = err.decode("utf-8", errors="replace").strip()[-500:]
    if code < 0:  # killed (out of memory?): may work next time
        raise Retry(f"task {ctx.task_id}: tesseract was killed by signal {-code}")
    if "Failed loading language" in message or "Error opening data file" in message:
        raise PermanentError(
            f"task {ctx.task_id}: tesseract has no language data for {lang!r}: install "
            f"tesseract-ocr-{lang.split('+')[0]} (or set TESSDATA_PREFIX); {message[-200:]}"
        )
    raise PermanentError(f"task {ctx.task_id}: tesseract failed (exit {code}): {message}")


def parse_tesseract_tsv(tsv: str) -> tuple[str, float | None]:
    """Text (lines and paragraphs kept) and mean word confidence (0-100) from tesseract TSV."""
    paragraphs: dict[tuple[str, ...], dict[str, list[str]]] = {}
    confidences: list[float] = []
    for row in tsv.splitlines()[1:]:
        cols = row.split("\t")
        if len(cols) < 12 or cols[0] != "5" or not cols[11].strip():
            continue  # not a word
        page, block, par, line = cols[1:5]
        lines = paragraphs.setdefault((page, block, par), {})
        lines.setdefault(line, []).append(cols[11].strip())
        try:
            if (conf := float(cols[10])) >= 0:
                confidences.append(conf)
        except ValueError:
            pass
    text = "\n\n".join("\n".join(" ".join(words) for words in lines.values()) for lines in paragraphs.values())
    confidence = round(sum(confidences) / len(confidences), 1) if confidences else None
    return text, confidence
