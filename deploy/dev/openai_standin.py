"""A small OpenAI-compatible server for the demo: deterministic answers, no API key, no cost.

    python -m deploy.dev.openai_standin --port 8808
    OPENAI_BASE_URL=http://127.0.0.1:8808/v1 ecoworker --queue ai

`POST /v1/chat/completions` answers like the real API, with a realistic `usage`
block (about four characters a token, images at the "low detail" rate):

- a `json_schema` response format named `waste_classification`: a valid JSON
  classification whose category is picked from the image bytes' hash (from the
  schema's own enum), with a confidence from 0.6 to 0.95 and disposal advice;
- an OCR-style prompt ("transcribe", "OCR"): the text in the image, read with
  the local `tesseract` when it is installed, else a note saying it is not;
- anything else: a short reply about waste sorting picked from the prompt's words.

`GET /v1/models` lists the models, `GET /healthz` answers `{"status": "ok"}`.
Everything is deterministic: the same request gets the same answer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import io
import json
import logging
import math
import shutil
import time
from typing import Any

from aiohttp import web

log = logging.getLogger("openai-standin")

MODELS = ("gpt-4o", "gpt-4o-mini")
CATEGORIES = (
    "general", "recyclable_plastic", "paper", "glass", "metal",
    "food_waste", "hazardous", "electronics", "bulky", "other",
)  # fmt: skip
DISPOSAL = {
    "general": "Put it in the residual waste bin; it cannot be recycled.",
    "recyclable_plastic": "Empty and rinse it, then put it in the plastics recycling bin with the cap on.",
    "paper": "Flatten it and put it in the paper bin; keep it dry and free of food.",
    "glass": "Remove the lid and put it in the glass container, sorted by colour; no ceramics or window glass.",
    "metal": "Empty it and put it in the packaging or metal recycling bin; no need to remove labels.",
    "food_waste": "Put it in the organic waste bin or your home compost; no plastic bags.",
    "hazardous": "Take it to a hazardous-waste collection point; never put it in household bins.",
    "electronics": "Bring it to an e-waste drop-off or back to a shop; remove batteries first.",
    "bulky": "Book a bulky-waste pickup or take it to the recycling centre.",
    "other": "Check your municipality's sorting guide or ask the recycling centre.",
}
CHAT_REPLIES = (  # (words in the prompt, reply), first match wins
    (("battery", "batteries"), "Batteries are hazardous waste: tape the terminals of lithium cells and bring "
     "them to a collection point; most supermarkets have a box by the exit."),
    (("paint", "solvent", "chemical", "varnish"), "Leftover paint and solvents are hazardous waste: bring them "
     "to the recycling centre's collection point. Fully dried-out, empty metal cans go with metal packaging."),
    (("pizza", "greasy", "grease"), "Clean parts of a pizza box go in the paper bin; tear off the greasy parts "
     "and put them in organic or residual waste, since grease spoils paper recycling."),
    (("glass", "jar", "bottle"), "Glass bottles and jars go in the glass container, sorted by colour, lids off. "
     "Drinking glasses, ceramics and window glass do not belong there."),
    (("plastic", "yoghurt", "yogurt", "film", "bag"), "Empty plastic packaging goes in the plastics bin; it does "
     "not need washing, just scraping clean. Hard plastic objects that are not packaging go in residual waste."),
    (("compost", "food", "peel", "coffee"), "Fruit and vegetable peels, coffee grounds and leftovers go in the "
     "organic bin; leave out plastic, even bags labelled compostable, unless your municipality accepts them."),
    (("phone", "laptop", "electronic", "cable", "charger"), "Electronics belong at an e-waste drop-off or a shop "
     "that takes them back; wipe your data and remove the batteries first."),
)
GENERIC_REPLY = ("Sort at the source: paper, plastics and metal packaging, glass by colour, organic waste, and "
                 "residual waste for the rest. Hazardous items like batteries go to a collection point.")
IMAGE_TOKENS = 85  # an image at detail=low, as the API counts it


# --------------------------------------------------------------------------- helpers


def count_tokens(text: str) -> int:
    """About four characters a token, as OpenAI's rule of thumb says."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [p for p in content if isinstance(p, dict)] if isinstance(content, list) else []


def _texts(messages: list[dict[str, Any]], roles: tuple[str, ...]) -> str:
    return "\n".join(
        str(p.get("text", "")) for m in messages if m.get("role") in roles for p in _parts(m) if p.get("type") == "text"
    )


def _image_bytes(messages: list[dict[str, Any]]) -> list[bytes]:
    """Every inline (data: URL) image in the request, decoded; remote URLs as their text."""
    images = []
    for message in messages:
        for part in _parts(message):
            if part.get("type") != "image_url":
                continue
            url = str((part.get("image_url") or {}).get("url", ""))
            if url.startswith("data:") and ";base64," in url:
                try:
                    images.append(base64.b64decode(url.split(";base64,", 1)[1], validate=True))
                    continue
                except (binascii.Error, ValueError):
                    pass
            images.append(url.encode())
    return images


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Tokens the API would bill for `messages`: text, 3 a message, 85 an image."""
    total = 3
    for message in messages:
        total += 3
        for part in _parts(message):
            total += IMAGE_TOKENS if part.get("type") == "image_url" else count_tokens(str(part.get("text", "")))
    return total


def classify(images: list[bytes], schema: dict[str, Any]) -> dict[str, Any]:
    """A deterministic classification of the image bytes, within the schema's category enum."""
    digest = hashlib.sha256(b"".join(images) or b"no image").digest()
    enum = (((schema.get("properties") or {}).get("category") or {}).get("enum")) or list(CATEGORIES)
    category = enum[digest[0] % len(enum)]
    confidence = round(0.6 + (int.from_bytes(digest[1:3], "big") / 65535) * 0.35, 2)
    return {
        "category": category,
        "confidence": confidence,
        "disposal_instructions": DISPOSAL.get(category, DISPOSAL["other"]),
    }


def chat_reply(prompt: str) -> str:
    words = prompt.lower()
    for keys, reply in CHAT_REPLIES:
        if any(k in words for k in keys):
            return reply
    return GENERIC_REPLY


async def transcribe(images: list[bytes]) -> str:
    """The text in the first image, read by the local tesseract if there is one.

    Like a vision model, it reads the image the way it is meant to be seen: turned
    upright per its EXIF orientation.
    """
    tesseract = shutil.which("tesseract")
    if not images or tesseract is None:
        return "(the OCR stand-in has no tesseract installed, so it cannot read this image)"
    try:
        upright = await asyncio.to_thread(_upright_png, images[0])
    except OSError:  # Pillow's "cannot identify image file"
        return ""
    process = await asyncio.create_subprocess_exec(
        tesseract, "stdin", "stdout", "-l", "eng",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={"OMP_THREAD_LIMIT": "1", "LC_ALL": "C"},
    )  # fmt: skip
    out, _ = await process.communicate(upright)
    return "\n".join(line for line in out.decode("utf-8", errors="replace").splitlines() if line.strip())


def _upright_png(data: bytes) -> bytes:
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        ImageOps.exif_transpose(image).convert("L").save(buffer, "PNG")
    return buffer.getvalue()


def _is_ocr(messages: list[dict[str, Any]]) -> bool:
    instructions = _texts(messages, ("system", "developer", "user")).lower()
    return "ocr" in instructions.split() or "transcribe" in instructions or "ocr engine" in instructions


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return web.json_response(body, status=status)


# --------------------------------------------------------------------------- routes


async def chat_completions(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "We could not parse the JSON body of your request.")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return _error(400, "'messages' must be a non-empty array.", param="messages")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return _error(400, "you must provide a model parameter", param="model")
    if body.get("stream"):
        return _error(400, "the demo stand-in does not stream; send stream=false", param="stream")
    messages: list[dict[str, Any]] = [m for m in body["messages"] if isinstance(m, dict)]
    images = _image_bytes(messages)
    response_format = body.get("response_format") or {}
    json_schema = response_format.get("json_schema") or {}
    if response_format.get("type") == "json_schema" and json_schema.get("name") == "waste_classification":
        content = json.dumps(classify(images, json_schema.get("schema") or {}))
    elif response_format.get("type") in ("json_schema", "json_object"):
        content = "{}"
    elif images and _is_ocr(messages):
        content = await transcribe(images)
    else:
        content = chat_reply(_texts(messages, ("user",)))

    finish_reason = "stop"
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and 0 < limit < count_tokens(content):
        content, finish_reason = content[: limit * 4], "length"
    return web.json_response(completion(body["model"], content, finish_reason, prompt_tokens(messages)))


def completion(model: str, content: str, finish_reason: str, prompt: int) -> dict[str, Any]:
    """A chat.completion body, shaped like api.openai.com's."""
    answer = count_tokens(content)
    digest = hashlib.sha256(f"{model}\0{content}".encode()).hexdigest()
    return {
        "id": f"chatcmpl-standin{digest[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_standin",
        "service_tier": "default",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": answer,
            "total_tokens": prompt + answer,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
    }


async def models(request: web.Request) -> web.Response:
    data = [{"id": m, "object": "model", "created": 1715367049, "owned_by": "ecoworker-demo"} for m in MODELS]
    return web.json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def unknown(request: web.Request) -> web.Response:
    return _error(404, f"Unknown request URL: {request.method} {request.path}.", code="unknown_url")


def build_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)  # images arrive inline, base64
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", unknown)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible stand-in for the ecoworker demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8808)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("OpenAI stand-in on http://%s:%d/v1", args.host, args.port)
    web.run_app(build_app(), host=args.host, port=args.port, print=None, access_log=log,
                access_log_format='%r %s %b %Tfs')


if __name__ == "__main__":
    main()
