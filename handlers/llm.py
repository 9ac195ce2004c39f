"""Everything `openai`: the client, its transient errors, and error translation.

Importing this module imports `openai` (seconds of CPU), so only the "ai"
handlers and `open_resources()` (when the "ai" queue is served) import it.
The client is built with `max_retries=0`: the worker retries, with back-off,
from its journal. `openai_errors(action)` turns library errors into `Retry`
(timeouts, connection errors, 408/409/429, 5xx; `Retry-After` is honoured) or
`PermanentError` (other 4xx, exhausted quota, content policy); messages are
redacted, never carrying a key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import openai

from ecoworker.errors import EcoworkerError, PermanentError, Retry
from ecoworker.registry import TaskContext
from handlers.base import HandlerSettings, get_resources, retry_after

OPENAI_DEFAULT_URL = "https://api.openai.com/v1"

#: OpenAI library errors that mean "try again later"; part of the ai handlers' RetryPolicy.
OPENAI_TRANSIENT: tuple[type[BaseException], ...] = (
    openai.APIConnectionError,  # includes APITimeoutError
    openai.RateLimitError,
    openai.InternalServerError,
)


def openai_client(settings: HandlerSettings) -> openai.AsyncOpenAI:
    """The AsyncOpenAI client for `settings` (the caller closes it)."""
    return openai.AsyncOpenAI(
        # OpenAI-compatible servers (vLLM, Ollama, tests) ignore the key.
        api_key=settings.openai_api_key.get() if settings.openai_api_key else "unused",
        base_url=settings.openai_base_url or OPENAI_DEFAULT_URL,
        timeout=settings.openai_timeout,
        max_retries=0,  # the worker retries, with back-off and a journal
    )


def require_openai(ctx: TaskContext) -> openai.AsyncOpenAI:
    """The OpenAI client on `ctx`, or a PermanentError saying why there is none."""
    client = get_resources(ctx).openai
    if client is None:
        raise PermanentError(
            f"task {ctx.task_id}: no OpenAI client: the worker must serve the 'ai' queue "
            "with OPENAI_API_KEY or OPENAI_BASE_URL set"
        )
    return client


_KEYLIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{3,}|Bearer\s+\S+)")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with known secrets and anything shaped like an API key replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _KEYLIKE.sub("***", text)


def classify_openai_error(exc: openai.APIStatusError, action: str) -> EcoworkerError:
    """An OpenAI HTTP error as Retry (429, 408, 409, 5xx) or PermanentError (other 4xx)."""
    status = exc.status_code
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    code = str(error.get("code") or error.get("type") or "") if isinstance(error, dict) else ""
    message = error.get("message") if isinstance(error, dict) else None
    text = str(message or exc.message)[:300]
    detail = f"HTTP {status}{' ' + code if code else ''}: {text}"
    if exc.request_id:
        detail += f" (request id {exc.request_id})"
    if status == 429 and code == "insufficient_quota":
        return PermanentError(f"{action}: OpenAI quota exhausted ({detail}); add credit")
    if status in (408, 409, 429) or status >= 500:
        after = retry_after(exc.response.headers)
        return Retry(f"{action}: OpenAI is busy or failing: {detail}", after=after)
    hint = {
        401: "check OPENAI_API_KEY",
        403: "the key has no access to this model or project",
        404: "check the model name (ECOWORKER_*_MODEL) and OPENAI_BASE_URL",
    }.get(status, "fix the request; retrying will not help")
    if "content_policy" in code or "content_filter" in code:
        hint = "the input was rejected by the content policy"
    return PermanentError(f"{action}: OpenAI refused: {detail}; {hint}")


@contextmanager
def openai_errors(action: str, secrets: Iterable[str] = ()) -> Iterator[None]:
    """Translate OpenAI client errors raised inside the block; messages are redacted."""
    try:
        yield
    except EcoworkerError:
        raise
    except openai.APITimeoutError:
        raise Retry(f"{action}: the OpenAI API did not answer in time") from None
    except openai.APIConnectionError as exc:
        cause = type(exc.__cause__).__name__ if exc.__cause__ else "connection error"
        raise Retry(f"{action}: cannot reach the OpenAI API ({cause})") from None
    except openai.APIStatusError as exc:
        # `from None`: the library's own message may echo part of the key.
        error = classify_openai_error(exc, action)
        error.args = (redact(str(error), secrets),)
        raise error from None
