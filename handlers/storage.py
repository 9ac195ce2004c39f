"""The `storage` queue: upload local files to S3, and make resized variants of S3 images.

Object keys written:
- `upload_to_s3`: exactly `s3_key`; the object carries `x-amz-meta-ecoworker-task-id`.
- `process_image`: `<source key without extension>/<variant name>.<ext>`, e.g.
  `photos/42.jpg` → `photos/42/thumb.webp` and `photos/42/medium.jpg`.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import posixpath
from pathlib import Path
from typing import Any, BinaryIO

from ecoworker.errors import PermanentError, Retry
from ecoworker.registry import DEFAULT_TRANSIENT, Registry, RetryPolicy, TaskContext
from handlers import images
from handlers.base import MiB, get_resources, run_in_pool
from handlers.paths import MissingFileError, open_regular_file, resolve_upload_path
from handlers.s3 import S3_TRANSIENT, download_object, s3_errors, validate_bucket, validate_s3_key

registry = Registry()

STORAGE_RETRY = RetryPolicy(
    max_retries=5, retry_on=(*DEFAULT_TRANSIENT, *S3_TRANSIENT), backoff_base=2.0, backoff_max=300.0
)
MULTIPART_THRESHOLD = 8 * MiB  # files above this go up in parts
MAX_PARTS = 10_000  # S3's limit: the part size grows for files above ~78 GiB
PARTS_IN_FLIGHT = 4  # per upload; bounds memory to 4 parts


@registry.task("upload_to_s3", queue="storage", timeout=1800.0, concurrency=8, retry=STORAGE_RETRY)
async def upload_to_s3(
    ctx: TaskContext,
    file_path: str,
    s3_key: str,
    bucket: str | None = None,
    content_type: str | None = None,
    delete_after: bool = False,
) -> dict[str, Any]:
    """Upload a file under the upload root to s3://bucket/s3_key (multipart above 8 MiB)."""
    resources = get_resources(ctx)
    key = validate_s3_key(s3_key)
    bucket = validate_bucket(bucket, resources.settings)
    if not isinstance(delete_after, bool):
        raise PermanentError(f"task {ctx.task_id}: delete_after must be true or false")
    try:
        path = resolve_upload_path(resources.settings, file_path)
    except MissingFileError:
        # A crash between deleting the file and recording success re-runs the task:
        # the object it left behind (tagged with our task id) is the result.
        done = await _uploaded_by(ctx, bucket, key) if delete_after else None
        if done is None:
            raise
        return done
    content_type = _content_type(content_type, key, path)
    action = f"task {ctx.task_id}: uploading {path} to s3://{bucket}/{key}"
    extra: dict[str, Any] = {"ContentType": content_type}
    if ctx.task_id.isascii() and ctx.task_id.isprintable():
        extra["Metadata"] = {"ecoworker-task-id": ctx.task_id}

    fd = await asyncio.to_thread(open_regular_file, path)
    with os.fdopen(fd, "rb") as file, s3_errors(action):
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            raise PermanentError(f"{action}: empty file (0 bytes); nothing was uploaded")
        if size <= MULTIPART_THRESHOLD:
            body = await _read_exactly(file, size, action)
            response = await resources.s3.put_object(Bucket=bucket, Key=key, Body=body, **extra)
            etag = response["ETag"]
        else:
            etag = await _multipart_upload(ctx, file, size, bucket, key, extra, action)

    ctx.logger.info("uploaded %s to s3://%s/%s (%d bytes)", path, bucket, key, size)
    if delete_after:
        try:
            await asyncio.to_thread(os.unlink, path)
        except OSError as exc:  # the upload stands; a leftover file is not worth a retry
            ctx.logger.warning("uploaded, but could not delete %s: %s", path, exc.strerror)
    return _result(bucket, key, etag, size, content_type)


def _result(bucket: str, key: str, etag: str, size: int, content_type: str) -> dict[str, Any]:
    return {
        "status": "success",
        "bucket": bucket,
        "s3_key": key,
        "etag": etag.strip('"'),
        "size": size,
        "url": f"s3://{bucket}/{key}",
        "content_type": content_type,
    }


def _content_type(given: object, key: str, path: Path) -> str:
    if given is None:
        guessed = mimetypes.guess_type(key)[0] or mimetypes.guess_type(path.name)[0]
        return guessed or "application/octet-stream"
    if not isinstance(given, str) or not given.isprintable() or not 0 < len(given) <= 255:
        raise PermanentError(f"content_type {given!r:.80} is not a valid MIME type")
    return given


async def _read_exactly(file: BinaryIO, size: int, action: str) -> bytes:
    data = await asyncio.to_thread(file.read, size)
    if len(data) != size:
        raise Retry(f"{action}: the file changed size while being read; trying again later")
    return data


async def _multipart_upload(
    ctx: TaskContext,
    file: BinaryIO,
    size: int,
    bucket: str,
    key: str,
    extra: dict[str, Any],
    action: str,
) -> str:
    """Upload `file` in parts, PARTS_IN_FLIGHT at a time; abort the upload on any failure."""
    s3 = get_resources(ctx).s3
    part_size = max(MULTIPART_THRESHOLD, -(-size // MAX_PARTS))
    upload_id = (await s3.create_multipart_upload(Bucket=bucket, Key=key, **extra))["UploadId"]
    parts: list[dict[str, Any]] = []
    slots = asyncio.Semaphore(PARTS_IN_FLIGHT)

    async def send(number: int, chunk: bytes) -> None:
        try:
            answer = await s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk)
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        finally:
            slots.release()

    try:
        try:
            async with asyncio.TaskGroup() as group:
                for number, offset in enumerate(range(0, size, part_size), start=1):
                    await slots.acquire()
                    length = min(part_size, size - offset)
                    group.create_task(send(number, await _read_exactly(file, length, action)))
        except BaseExceptionGroup as group_error:  # let s3_errors() see the first real error
            raise group_error.exceptions[0] from None
        parts.sort(key=lambda part: part["PartNumber"])
        done = await s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        # Orphaned parts cost money and never show up as objects: always abort.
        try:
            await asyncio.shield(s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id))
        except Exception as exc:
            ctx.logger.warning("could not abort multipart upload %s: %s", upload_id, exc)
        raise
    return str(done["ETag"])


async def _uploaded_by(ctx: TaskContext, bucket: str, key: str) -> dict[str, Any] | None:
    """The result of an earlier run of this task that uploaded `key`, if there was one."""
    s3 = get_resources(ctx).s3
    try:
        head = await s3.head_object(Bucket=bucket, Key=key)
    except Exception:
        return None
    if head.get("Metadata", {}).get("ecoworker-task-id") != ctx.task_id:
        return None
    ctx.logger.info("s3://%s/%s was uploaded by an earlier run of this task", bucket, key)
    size, content_type = int(head["ContentLength"]), str(head.get("ContentType", ""))
    return _result(bucket, key, str(head["ETag"]), size, content_type)


@registry.task("process_image", queue="storage", timeout=300.0, concurrency=4, retry=STORAGE_RETRY)
async def process_image(
    ctx: TaskContext,
    source_key: str,
    variants: list[dict[str, Any]] | None = None,
    bucket: str | None = None,
    strip_exif: bool = True,
) -> dict[str, Any]:
    """Download an image, make resized EXIF-free variants in the pool, upload them beside it."""
    resources = get_resources(ctx)
    settings = resources.settings
    key = validate_s3_key(source_key, "source_key")
    bucket = validate_bucket(bucket, settings)
    if not isinstance(strip_exif, bool):
        raise PermanentError(f"task {ctx.task_id}: strip_exif must be true or false")
    try:
        specs = images.parse_variants(variants)
    except images.ImageError as exc:
        raise PermanentError(f"task {ctx.task_id}: {exc}") from None
    stem = posixpath.splitext(key)[0]
    keys = {v.name: validate_s3_key(f"{stem}/{v.name}.{v.extension}") for v in specs}

    data = await download_object(ctx, bucket, key, settings.max_download_bytes)
    try:
        made = await run_in_pool(ctx, images.make_variants, data, specs, settings.max_image_pixels, strip_exif)
    except images.ImageError as exc:
        raise PermanentError(f"task {ctx.task_id}: s3://{bucket}/{key}: {exc}") from None

    async def put(variant: dict[str, Any]) -> None:
        variant_key = keys[variant["name"]]
        with s3_errors(f"task {ctx.task_id}: uploading s3://{bucket}/{variant_key}"):
            await resources.s3.put_object(
                Bucket=bucket,
                Key=variant_key,
                Body=variant["data"],
                ContentType=variant["content_type"],
            )

    await asyncio.gather(*(put(v) for v in made["variants"]))
    ctx.logger.info("made %d variants of s3://%s/%s", len(made["variants"]), bucket, key)
    return {
        "source_key": key,
        "bucket": bucket,
        "source": made["source"] | {"size": len(data)},
        "variants": [
            {
                "name": v["name"],
                "key": keys[v["name"]],
                "width": v["width"],
                "height": v["height"],
                "format": v["format"],
                "content_type": v["content_type"],
                "size": len(v["data"]),
            }
            for v in made["variants"]
        ],
    }
