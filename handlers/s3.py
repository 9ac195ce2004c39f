"""S3 for the handlers: the client, error translation, key and bucket checks, downloads.

`open_resources()` creates the one client with `s3_client()`; handlers wrap
their calls in `s3_errors(action)`, which turns botocore errors into `Retry`
(throttling, 5xx, connection trouble; `Retry-After` is honoured) or
`PermanentError` (4xx, missing objects, no credentials) with a hint at the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aioboto3
import aiohttp
import botocore.exceptions as bce
from aiobotocore.config import AioConfig

from ecoworker.errors import EcoworkerError, PermanentError, Retry
from ecoworker.registry import DEFAULT_TRANSIENT, TaskContext
from handlers.base import BUCKET_RE, HandlerSettings, MiB, get_resources, retry_after

#: S3 library errors that mean "try again later"; part of the handlers' RetryPolicy.
S3_TRANSIENT: tuple[type[BaseException], ...] = (
    bce.HTTPClientError,  # ReadTimeout, ConnectionClosed, ResponseStreaming
    bce.ConnectionError,  # EndpointConnection, ConnectTimeout
    bce.IncompleteReadError,
    bce.ChecksumError,
    bce.CredentialRetrievalError,
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
)


def s3_client(settings: HandlerSettings) -> Any:
    """An (unopened) aiobotocore S3 client for `settings`: enter it with `async with`."""
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


# --------------------------------------------------------------------------- errors


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


# --------------------------------------------------------------------------- input checks


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
    if not isinstance(bucket, str) or not BUCKET_RE.fullmatch(bucket):
        raise PermanentError(f"bucket {bucket!r:.80} is not a valid S3 bucket name")
    return bucket


# --------------------------------------------------------------------------- downloads


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
