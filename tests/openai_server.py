"""An OpenAI-compatible HTTP server for tests: real HTTP on 127.0.0.1, scripted answers.

The real `openai` client talks to it through OPENAI_BASE_URL (`server.url`).
`POST /v1/chat/completions` answers, in order, the replies queued with
`push()`; with none queued it gives a deterministic default: a valid waste
classification for a `json_schema` request, else `"echo: <last user text>"`.
Every request is recorded in `server.requests`.

    async with OpenAIServer() as server:
        server.push(Reply.error(429, headers={"Retry-After": "7"}), Reply(content="hi"))
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DEFAULT_CLASSIFICATION = {
    "category": "recyclable_plastic",
    "confidence": 0.93,
    "disposal_instructions": "Rinse the bottle and put it in the plastic recycling bin.",
}


@dataclass
class Reply:
    """One scripted answer: a chat completion with `content`, or any status/body/headers."""

    status: int = 200
    content: str | None = None  # None: the default answer for the request
    finish_reason: str = "stop"
    body: Any = None  # a full JSON body, sent as is (overrides `content`)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (to force client timeouts)

    @classmethod
    def error(cls, status: int, message: str = "scripted error", code: str | None = None, **kw: Any) -> Reply:
        body = {"error": {"message": message, "type": "test_error", "param": None, "code": code}}
        return cls(status=status, body=body, **kw)


@dataclass
class Request:
    """What the server received."""

    path: str
    headers: dict[str, str]
    body: Any

    def image_urls(self) -> list[str]:
        """Every image URL in the request's messages."""
        return [
            part["image_url"]["url"]
            for message in self.body.get("messages", [])
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if part.get("type") == "image_url"
        ]


class OpenAIServer:
    """The server; `url` is the base URL to give the client (ends in /v1)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._replies: deque[Reply] = deque()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def push(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order."""
        self._replies.extend(replies)

    def reset(self) -> None:
        """Forget queued replies and recorded requests (between tests)."""
        self._replies.clear()
        self.requests.clear()

    async def __aenter__(self) -> OpenAIServer:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()  # wakes delayed replies
        if self._runner is not None:
            await self._runner.cleanup()

    async def _record(self, request: web.Request) -> Request:
        try:
            body = await request.json()
        except ValueError:
            body = await request.text()
        recorded = Request(request.path, {k.lower(): v for k, v in request.headers.items()}, body)
        self.requests.append(recorded)
        return recorded

    async def _unknown(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            {"error": {"message": f"no route {request.method} {request.path}", "code": None}},
            status=404,
        )

    async def _chat(self, request: web.Request) -> web.Response:
        recorded = await self._record(request)
        reply = self._replies.popleft() if self._replies else Reply()
        if reply.delay:
            try:
                await asyncio.wait_for(self._closing.wait(), reply.delay)
            except TimeoutError:
                pass
        if reply.body is not None or reply.status != 200:
            return web.json_response(reply.body or {}, status=reply.status, headers=reply.headers)
        body = recorded.body
        content = reply.content if reply.content is not None else _default_content(body)
        return web.json_response(
            completion(body.get("model", "test-model"), content, reply.finish_reason, body),
            headers=reply.headers,
        )


def _default_content(body: dict[str, Any]) -> str:
    if (body.get("response_format") or {}).get("type") == "json_schema":
        return json.dumps(DEFAULT_CLASSIFICATION)
    last = next((m for m in reversed(body.get("messages", [])) if m.get("role") == "user"), {})
    content = last.get("content", "")
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return f"echo: {content}" if content else "echo: (an image)"


def completion(
    model: str, content: str, finish_reason: str = "stop", request: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A chat.completion body; token counts are word counts, so tests can predict them."""
    prompt_words = sum(len(str(m.get("content", "")).split()) for m in (request or {}).get("messages", []))
    answer_words = len(content.split())
    return {
        "id": f"chatcmpl-test-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_words,
            "completion_tokens": answer_words,
            "total_tokens": prompt_words + answer_words,
        },
    }
