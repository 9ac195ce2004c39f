"""What every handler shares: settings, the clients created once, errors, safe paths.

The CLI builds `HandlerSettings.from_env(os.environ)`, opens `open_resources()`
once and hands the `Resources` to the worker, which puts them on every
`TaskContext`. Handlers never read the environment and never build clients.

Library errors become `Retry` (transient: timeouts, connection errors, 429,
5xx, S3 throttling; `Retry-After` is honoured) or `PermanentError` (400/401/
403/404, missing objects, bad input) through `s3_errors()` and
`openai_errors()`. Messages never carry a secret.
"""

from __future__ import annotations

import asyncio
import email.utils
import multiprocessing
import os
import re
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aioboto3
import aiohttp
import botocore.exceptions as bce
import openai
from aiobotocore.config import AioConfig

from ecoworker.errors import ConfigError, EcoworkerError, PermanentError, Retry
from ecoworker.registry import DEFAULT_TRANSIENT, TaskContext

T = TypeVar("T")
N = TypeVar("N", int, float)
MiB = 1024 * 1024
OPENAI_DEFAULT_URL = "https://api.openai.com/v1"
OCR_ENGINES = ("tesseract", "openai")

#: Library errors that mean "try again later"; part of every handler's RetryPolicy.
S3_TRANSIENT: tuple[type[BaseException], ...] = (
    bce.HTTPClientError,  # ReadTimeout, ConnectionClosed, ResponseStreaming
    bce.ConnectionError,  # EndpointConnection, ConnectTimeout
    bce.IncompleteReadError,
    bce.ChecksumError,
    bce.CredentialRetrievalError,
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
)
OPENAI_TRANSIENT: tuple[type[BaseException], ...] = (
    openai.APIConnectionError,  # includes APITimeoutError
    openai.RateLimitError,
    openai.InternalServerError,
)
TRANSIENT_ERRORS = (*DEFAULT_TRANSIENT, *S3_TRANSIENT, *OPENAI_TRANSIENT)


class Secret:
    """A string that never shows itself in repr(), str() or a log line; `.get()` reveals it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class HandlerSettings:
    """Configuration of the handlers; built from the environment by the CLI only."""

    s3_endpoint_url: str | None = None
    aws_region: str = "us-east-1"
    aws_access_key_id: str | None = None  # None: botocore's default credential chain
    aws_secret_access_key: Secret | None = None
    aws_session_token: Secret | None = None
    s3_max_attempts: int = 3  # botocore's own retries per call (multipart parts, SlowDown)
    bucket: str = "ecoeco-uploads"
    upload_root: Path = Path("/var/lib/ecoeco/uploads")
    openai_api_key: Secret | None = None
    openai_base_url: str | None = None
    openai_timeout: float = 60.0
    vision_model: str = "gpt-4o"
    chat_model: str = "gpt-4o-mini"
    ocr_engine: str = "openai"
    tesseract_cmd: str | None = None
    tessdata_prefix: str | None = None
    max_download_bytes: int = 50 * MiB
    max_image_pixels: int = 50_000_000
    image_processes: int = 2

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HandlerSettings:
        """Read `S3_*`, `AWS_*`, `OPENAI_*` and `ECOWORKER_*` variables (see README)."""

        def get(*names: str) -> str | None:
            for name in names:
                value = env.get(name, "").strip()
                if value:
                    return value
            return None

        tesseract = get("ECOWORKER_TESSERACT_CMD") or shutil.which("tesseract", path=env.get("PATH", os.defpath))
        ocr_engine = get("ECOWORKER_OCR_ENGINE") or ("tesseract" if tesseract else "openai")
        if ocr_engine.lower() not in OCR_ENGINES:
            raise ConfigError(f"ECOWORKER_OCR_ENGINE={ocr_engine!r}: use 'tesseract' or 'openai'")
        base_url = get("OPENAI_BASE_URL")
        if base_url and not re.match(r"https?://", base_url):
            raise ConfigError(f"OPENAI_BASE_URL={base_url!r} must start with http:// or https://")
        endpoint = get("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
        if endpoint and not re.match(r"https?://", endpoint):
            raise ConfigError(f"S3_ENDPOINT_URL={endpoint!r} must start with http:// or https://")
        root = Path(get("ECOWORKER_UPLOAD_ROOT") or cls.upload_root)
        if not root.is_absolute():
            raise ConfigError(f"ECOWORKER_UPLOAD_ROOT={str(root)!r} must be an absolute path")
        bucket = get("ECOWORKER_S3_BUCKET", "S3_BUCKET") or cls.bucket
        if not _BUCKET_RE.fullmatch(bucket):
            raise ConfigError(f"ECOWORKER_S3_BUCKET={bucket!r} is not a valid S3 bucket name")
        secret_key = get("AWS_SECRET_ACCESS_KEY")
        token = get("AWS_SESSION_TOKEN")
        return cls(
            s3_endpoint_url=endpoint,
            aws_region=get("AWS_DEFAULT_REGION", "AWS_REGION") or cls.aws_region,
            aws_access_key_id=get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=Secret(secret_key) if secret_key else None,
            aws_session_token=Secret(token) if token else None,
            s3_max_attempts=_number(env, "ECOWORKER_S3_MAX_ATTEMPTS", int, cls.s3_max_attempts, 1),
            bucket=bucket,
            upload_root=root,
            openai_api_key=_openai_key(get("OPENAI_API_KEY"), get("OPENAI_API_KEY_FILE")),
            openai_base_url=base_url.rstrip("/") if base_url else None,
            openai_timeout=_number(env, "ECOWORKER_OPENAI_TIMEOUT", float, cls.openai_timeout, 0.1),
            vision_model=get("ECOWORKER_VISION_MODEL") or cls.vision_model,
            chat_model=get("ECOWORKER_CHAT_MODEL") or cls.chat_model,
            ocr_engine=ocr_engine.lower(),
            tesseract_cmd=tesseract,
            tessdata_prefix=get("TESSDATA_PREFIX"),
            max_download_bytes=_number(env, "ECOWORKER_MAX_DOWNLOAD_BYTES", int, cls.max_download_bytes, 1),
            max_image_pixels=_number(env, "ECOWORKER_MAX_IMAGE_PIXELS", int, cls.max_image_pixels, 1),
            image_processes=_number(env, "ECOWORKER_IMAGE_PROCESSES", int, cls.image_processes, 1),
        )

    def check_for_queues(self, queues: Iterable[str]) -> None:
        """Raise ConfigError when the served queues need something that is not configured."""
        if "ai" not in set(queues):
            return
        if self.openai_api_key is None and self.openai_base_url is None:
            raise ConfigError(
                "OPENAI_API_KEY is not set: the 'ai' queue needs an OpenAI API key "
                "(OPENAI_API_KEY or OPENAI_API_KEY_FILE), or OPENAI_BASE_URL pointing at an "
                "OpenAI-compatible server; or do not consume the 'ai' queue"
            )
        if self.ocr_engine == "tesseract" and not self.tesseract_cmd:
            raise ConfigError(
                "ECOWORKER_OCR_ENGINE=tesseract but no `tesseract` binary is on PATH: install "
                "tesseract-ocr, set ECOWORKER_TESSERACT_CMD, or set ECOWORKER_OCR_ENGINE=openai"
            )


_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


def _number(env: Mapping[str, str], name: str, kind: Callable[[str], N], default: N, low: N) -> N:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < low:
        raise ConfigError(f"{name}={raw!r} must be at least {low}")
    return value


def _openai_key(value: str | None, key_file: str | None) -> Secret | None:
    if value and key_file:
        raise ConfigError("set only one of OPENAI_API_KEY and OPENAI_API_KEY_FILE")
    if key_file:
        try:
            value = Path(key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"OPENAI_API_KEY_FILE={key_file!r} cannot be read: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"OPENAI_API_KEY_FILE={key_file!r} is empty")
    return Secret(value) if value else None


# --------------------------------------------------------------------------- resources


@dataclass(eq=False)
class Resources:
    """The shared clients, created once per process by `open_resources()`."""

    settings: HandlerSettings
    s3: Any  # aiobotocore S3 client
    openai: openai.AsyncOpenAI | None
    pool: ProcessPoolExecutor
    secrets: tuple[str, ...] = field(default=(), repr=False)  # scrubbed from error messages

    def replace_pool(self, broken: ProcessPoolExecutor) -> None:
        """Swap a broken pool (a child died) for a fresh one, once per breakage."""
        if self.pool is broken:
            self.pool = _new_pool(self.settings)
            broken.shutdown(wait=False, cancel_futures=True)


@asynccontextmanager
async def open_resources(settings: HandlerSettings, queues: Iterable[str]) -> AsyncIterator[Resources]:
    """Create the S3 client, the OpenAI client and the process pool; close them all on exit."""
    queues = frozenset(queues)
    settings.check_for_queues(queues)
    async with AsyncExitStack() as stack:
        s3 = await stack.enter_async_context(_s3_client(settings))
        client = None
        if settings.openai_api_key is not None or settings.openai_base_url is not None:
            client = openai.AsyncOpenAI(
                # OpenAI-compatible servers (vLLM, Ollama, tests) ignore the key.
                api_key=settings.openai_api_key.get() if settings.openai_api_key else "unused",
                base_url=settings.openai_base_url or OPENAI_DEFAULT_URL,
                timeout=settings.openai_timeout,
                max_retries=0,  # the worker retries, with back-off and a journal
            )
            stack.push_async_callback(client.close)
        secrets = tuple(s.get() for s in (settings.openai_api_key, settings.aws_secret_access_key) if s)
        resources = Resources(settings, s3, client, _new_pool(settings), secrets)
        if queues & {"storage", "ai"}:
            # Start the pool processes now, off the loop (the first start of the
            # forkserver imports the preloaded modules), not on the first task.
            await asyncio.to_thread(resources.pool.submit, int)
        # Reads resources.pool at exit: it may have been replaced after a breakage.
        stack.push_async_callback(lambda: asyncio.to_thread(_shutdown_pool, resources))
        yield resources


def _s3_client(settings: HandlerSettings) -> Any:
    session = aioboto3.Session(
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=(settings.aws_secret_access_key.get() if settings.aws_secret_access_key else None),
        aws_session_token=settings.aws_session_token.get() if settings.aws_session_token else None,
        region_name=settings.aws_region,
    )
    config = AioConfig(
        connect_timeout=10,
        read_timeout=60,
        retries={"mode": "standard", "max_attempts": settings.s3_max_attempts},
        max_pool_connections=32,
        # Custom endpoints (moto, MinIO, Ceph) rarely do virtual-host buckets.
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
    )
    return session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


def _new_pool(settings: HandlerSettings) -> ProcessPoolExecutor:
    # fork is unsafe in a threaded asyncio process. The forkserver imports the
    # heavy modules (Pillow, the clients) once; the children it forks, including
    # replacements, inherit them. (Each child still re-runs the main module's
    # imports, as spawn does: the entry point must be guarded by __name__.)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["handlers.images"])  # Pillow only: the children need no clients
    return ProcessPoolExecutor(
        max_workers=settings.image_processes,
        mp_context=context,
        max_tasks_per_child=200,  # bounds Pillow's memory fragmentation
    )


def _shutdown_pool(resources: Resources) -> None:
    resources.pool.shutdown(wait=True, cancel_futures=True)


def get_resources(ctx: TaskContext) -> Resources:
    """The Resources on `ctx`, or a PermanentError naming the wiring mistake."""
    if not isinstance(ctx.resources, Resources):
        raise PermanentError(
            f"task {ctx.task_id}: the worker was started without handler resources; "
            "open handlers.base.open_resources() and pass it to the Worker"
        )
    return ctx.resources


def require_openai(ctx: TaskContext) -> openai.AsyncOpenAI:
    client = get_resources(ctx).openai
    if client is None:
        raise PermanentError(f"task {ctx.task_id}: no OpenAI client: set OPENAI_API_KEY or OPENAI_BASE_URL")
    return client


async def run_in_pool(ctx: TaskContext, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` in the process pool; a dead child becomes a Retry and a fresh pool."""
    resources = get_resources(ctx)
    pool = resources.pool
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    except BrokenProcessPool:
        resources.replace_pool(pool)
        raise Retry(
            f"task {ctx.task_id}: a pool process died while running {fn.__name__} "
            "(out of memory?); the pool was restarted"
        ) from None


# --------------------------------------------------------------------------- errors


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds asked for by `Retry-After` / `retry-after-ms`, or None when absent or unreadable."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        if "retry-after-ms" in lower:
            return max(0.0, float(lower["retry-after-ms"]) / 1000)
        raw = lower.get("retry-after")
        if raw is None:
            return None
        try:
            return max(0.0, float(raw))
        except ValueError:
            when = email.utils.parsedate_to_datetime(raw)
            return max(0.0, when.timestamp() - time.time())
    except (ValueError, TypeError):
        return None


_S3_THROTTLED = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequests", "ServiceUnavailable", "InternalError", "RequestTimeout",
    "RequestTimeTooSkewed", "OperationAborted",
}  # fmt: skip
_S3_HINTS = {
    "NoSuchBucket": "create the bucket or fix ECOWORKER_S3_BUCKET / the task's bucket",
    "NoSuchKey": "check the key: the object does not exist",
    "404": "check the key: the object does not exist",
    "AccessDenied": "grant the worker's credentials access to this bucket and key",
    "403": "grant the worker's credentials access to this bucket and key",
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
    "SignatureDoesNotMatch": "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
}


def classify_s3_error(exc: bce.ClientError, action: str) -> EcoworkerError:
    """A botocore ClientError as Retry (throttling, 5xx) or PermanentError (4xx)."""
    error = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    code = str(error.get("Code") or meta.get("HTTPStatusCode") or "unknown")
    status = int(meta.get("HTTPStatusCode") or 0)
    text = str(error.get("Message") or "").strip()
    detail = f"{code} (HTTP {status}){': ' + text if text else ''}"
    if code in _S3_THROTTLED or status == 429 or status >= 500:
        after = retry_after(meta.get("HTTPHeaders"))
        return Retry(f"{action}: S3 is busy or failing: {detail}; retrying later", after=after)
    hint = _S3_HINTS.get(code, "fix the request; retrying will not help")
    return PermanentError(f"{action}: S3 refused: {detail}; {hint}")


@contextmanager
def s3_errors(action: str) -> Iterator[None]:
    """Translate S3 client errors raised inside the block; `action` says what was being done."""
    try:
        yield
    except EcoworkerError:
        raise
    except bce.ClientError as exc:
        raise classify_s3_error(exc, action) from exc
    except (bce.NoCredentialsError, bce.PartialCredentialsError) as exc:
        raise PermanentError(
            f"{action}: no usable AWS credentials ({type(exc).__name__}): "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a role"
        ) from None
    except (*S3_TRANSIENT, *DEFAULT_TRANSIENT) as exc:
        raise Retry(f"{action}: S3 unreachable: {type(exc).__name__}: {exc}") from exc


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


# --------------------------------------------------------------------------- input checks


class MissingFileError(PermanentError):
    """The file named by a task does not exist under the upload root."""


def validate_s3_key(key: object, what: str = "s3_key") -> str:
    """`key` if it is a safe S3 key, else PermanentError saying what is wrong."""
    if not isinstance(key, str) or not key:
        raise PermanentError(f"{what} must be a non-empty string, got {key!r:.80}")
    if key.startswith("/"):
        raise PermanentError(f"{what} {key!r:.200} must not start with '/'")
    if ".." in key.split("/"):
        raise PermanentError(f"{what} {key!r:.200} must not contain a '..' segment")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise PermanentError(f"{what} {key!r:.200} must not contain control characters")
    if len(key.encode()) > 1024:
        raise PermanentError(f"{what} is {len(key.encode())} bytes long; S3 allows 1024")
    return key


def validate_bucket(bucket: object, settings: HandlerSettings) -> str:
    """The task's bucket (or the configured default) if it is a valid bucket name."""
    if bucket is None:
        return settings.bucket
    if not isinstance(bucket, str) or not _BUCKET_RE.fullmatch(bucket):
        raise PermanentError(f"bucket {bucket!r:.80} is not a valid S3 bucket name")
    return bucket


def resolve_upload_path(settings: HandlerSettings, file_path: object) -> Path:
    """The real path of `file_path` (relative to, or absolute inside, the upload root).

    Refuses with PermanentError anything whose real path (symlinks resolved)
    leaves the root, and anything that is not an existing regular file.
    """
    if not isinstance(file_path, str) or not file_path or "\0" in file_path:
        raise PermanentError(f"file_path must be a non-empty string, got {file_path!r:.80}")
    root = Path(os.path.realpath(settings.upload_root))
    real = Path(os.path.realpath(root / file_path))  # an absolute file_path replaces root
    if not real.is_relative_to(root) or real == root:
        raise PermanentError(
            f"file_path {file_path!r:.200} is outside the upload root {str(root)!r} "
            "(after resolving '..' and symlinks): put the file under ECOWORKER_UPLOAD_ROOT and "
            "pass its path relative to it"
        )
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise MissingFileError(
            f"file_path {file_path!r:.200}: no such file under {root}; check the path (relative to the upload root)"
        ) from None
    except OSError as exc:
        raise PermanentError(f"file_path {file_path!r:.200}: cannot stat: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise PermanentError(f"file_path {file_path!r:.200} is not a regular file")
    return real


def open_regular_file(path: Path) -> int:
    """Open a path from `resolve_upload_path` for reading without following a late symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: the file disappeared before it could be read") from None
    except OSError as exc:
        raise PermanentError(f"{path}: cannot open: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PermanentError(f"{path} is not a regular file")
    return fd


async def read_upload_file(settings: HandlerSettings, file_path: object, max_bytes: int) -> bytes:
    """The bytes of a file under the upload root, refused when larger than `max_bytes`."""
    path = resolve_upload_path(settings, file_path)

    def read() -> bytes:
        fd = open_regular_file(path)
        with os.fdopen(fd, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise PermanentError(f"{path} is larger than the {max_bytes}-byte limit")
        return data

    return await asyncio.to_thread(read)


async def download_object(ctx: TaskContext, bucket: str, key: str, max_bytes: int) -> bytes:
    """The bytes of s3://bucket/key, refused (PermanentError) when larger than `max_bytes`."""
    action = f"task {ctx.task_id}: downloading s3://{bucket}/{key}"
    too_big = f"{action}: the object is larger than the {max_bytes}-byte limit"
    with s3_errors(action):
        response = await get_resources(ctx).s3.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        async with body:  # releases (or closes) the connection however we leave
            if int(response.get("ContentLength") or 0) > max_bytes:
                raise PermanentError(too_big + " (ECOWORKER_MAX_DOWNLOAD_BYTES)")
            chunks: list[bytes] = []
            size = 0
            while chunk := await body.read(MiB):
                size += len(chunk)
                if size > max_bytes:  # the server lied about the length
                    raise PermanentError(too_big)
                chunks.append(chunk)
        return b"".join(chunks)
