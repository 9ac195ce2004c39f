"""What every handler shares: settings, the clients created once, the process pool.

The CLI builds `HandlerSettings.from_env(os.environ)`, opens `open_resources()`
once and hands the `Resources` to the worker, which puts them on every
`TaskContext`. Handlers never read the environment and never build clients.

Nothing heavy is imported here: `open_resources()` imports the S3 client
(`handlers.s3`) only when a handler queue is served and the OpenAI client
(`handlers.llm`) only when the "ai" queue is served, so a storage worker never
pays for `import openai` and a worker of built-in tasks pays for neither.
Errors are translated next to their clients: `handlers.s3.s3_errors()` and
`handlers.llm.openai_errors()`; input paths are checked in `handlers.paths`.
"""

from __future__ import annotations

import asyncio
import email.utils
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ecoworker.errors import ConfigError, PermanentError, Retry
from ecoworker.registry import TaskContext
from handlers.poolchild import exit_with

if TYPE_CHECKING:
    from openai import AsyncOpenAI

T = TypeVar("T")
N = TypeVar("N", int, float)
MiB = 1024 * 1024
OCR_ENGINES = ("tesseract", "openai")
#: The queues whose handlers use the clients and the pool.
HANDLER_QUEUES = frozenset({"storage", "ai"})
#: A valid S3 bucket name (checked for the default here, for a task's bucket in `handlers.s3`).
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


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
        if not BUCKET_RE.fullmatch(bucket):
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
    """The shared clients, created once per process by `open_resources()`.

    `s3` is None when neither "storage" nor "ai" is served, `openai` when "ai"
    is not: no handler that needs them is registered then.
    """

    settings: HandlerSettings
    s3: Any  # aiobotocore S3 client
    openai: AsyncOpenAI | None
    secrets: tuple[str, ...] = field(default=(), repr=False)  # scrubbed from error messages
    started_pool: ProcessPoolExecutor | None = field(default=None, repr=False)  # see `pool`

    @property
    def pool(self) -> ProcessPoolExecutor:
        """The image process pool, created on first use.

        A worker whose queues have no image task never creates one, so it never
        starts multiprocessing's resource tracker either (a 12 MB process).
        """
        if self.started_pool is None:
            self.started_pool = _new_pool(self.settings)
        return self.started_pool

    def replace_pool(self, broken: ProcessPoolExecutor) -> None:
        """Swap a broken pool (a child died) for a fresh one, once per breakage."""
        if self.started_pool is broken:
            self.started_pool = _new_pool(self.settings)
            broken.shutdown(wait=False, cancel_futures=True)


@asynccontextmanager
async def open_resources(settings: HandlerSettings, queues: Iterable[str]) -> AsyncIterator[Resources]:
    """Create the clients the served `queues` need, and start the image process pool when
    they have image tasks ("storage", "ai"); close them all on exit."""
    queues = frozenset(queues)
    settings.check_for_queues(queues)
    async with AsyncExitStack() as stack:
        s3 = client = None
        if queues & HANDLER_QUEUES:
            from handlers.s3 import s3_client  # imports aioboto3 (botocore)

            s3 = await stack.enter_async_context(s3_client(settings))
        if "ai" in queues:
            from handlers.llm import openai_client  # imports openai (seconds of CPU)

            client = openai_client(settings)
            stack.push_async_callback(client.close)
        secrets = tuple(s.get() for s in (settings.openai_api_key, settings.aws_secret_access_key) if s)
        resources = Resources(settings, s3, client, secrets)
        if queues & HANDLER_QUEUES:
            # Start the pool processes now, off the loop (the first start of the
            # forkserver imports the preloaded modules), not on the first task.
            await asyncio.to_thread(resources.pool.submit, int)
        # Reads resources.started_pool at exit: it may have been replaced after a breakage.
        stack.push_async_callback(lambda: asyncio.to_thread(_shutdown_pool, resources))
        yield resources


def _new_pool(settings: HandlerSettings) -> ProcessPoolExecutor:
    # fork is unsafe in a threaded asyncio process. The forkserver imports the
    # heavy modules (Pillow) once; the children it forks, including
    # replacements, inherit them. (Each child still re-runs the main module's
    # imports, as spawn does: the entry point must be guarded by __name__.)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # Pillow only (the children need no clients), and the children's initializer
        context.set_forkserver_preload(["handlers.images", "handlers.poolchild"])
    return ProcessPoolExecutor(
        max_workers=settings.image_processes,
        mp_context=context,
        initializer=exit_with,  # a child ends with its worker, even after kill -9
        initargs=(os.getpid(),),
        max_tasks_per_child=200,  # bounds Pillow's memory fragmentation
    )


def _shutdown_pool(resources: Resources) -> None:
    if resources.started_pool is not None:
        resources.started_pool.shutdown(wait=True, cancel_futures=True)


def get_resources(ctx: TaskContext) -> Resources:
    """The Resources on `ctx`, or a PermanentError naming the wiring mistake."""
    if not isinstance(ctx.resources, Resources):
        raise PermanentError(
            f"task {ctx.task_id}: the worker was started without handler resources; "
            "open handlers.base.open_resources() and pass it to the Worker"
        )
    return ctx.resources


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


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds asked for by `Retry-After` / `retry-after-ms`, or None when absent or unreadable.

    Shared by the S3 and OpenAI error translation (`handlers.s3`, `handlers.llm`).
    """
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
