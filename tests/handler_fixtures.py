"""Fixtures for the handler tests: real S3 (moto from `stack_env`), the OpenAI stand-in,
handler resources, and task contexts.

Use in a test module: `from tests.handler_fixtures import *  # noqa: F403` for the
fixtures (listed in `__all__`), plus explicit imports of the helpers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from ecoworker.registry import TaskContext
from handlers.base import HandlerSettings, Resources, open_resources
from tests.openai_server import OpenAIServer

__all__ = [
    "handler_env",
    "make_resources",
    "openai_server",
    "resources",
    "session_openai_server",
    "shared_resources",
    "upload_root",
]

S3_VARIABLES = ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
MakeResources = Callable[..., Awaitable[Resources]]


@pytest.fixture
def upload_root(tmp_path: Path) -> Path:
    """An empty upload root directory (real path, no symlinks)."""
    root = tmp_path / "uploads"
    root.mkdir()
    return root.resolve()


@pytest.fixture(scope="session")
async def session_openai_server() -> AsyncIterator[OpenAIServer]:
    async with OpenAIServer() as server:
        yield server


@pytest.fixture
def openai_server(session_openai_server: OpenAIServer) -> OpenAIServer:
    """The OpenAI-compatible server on 127.0.0.1 (tests/openai_server.py), reset for this test."""
    session_openai_server.reset()
    return session_openai_server


def _env(stack_env: dict[str, str], server: OpenAIServer) -> dict[str, str]:
    env = {name: stack_env[name] for name in S3_VARIABLES if name in stack_env}
    return env | {
        "OPENAI_BASE_URL": server.url,
        "ECOWORKER_OPENAI_TIMEOUT": "5",
        "ECOWORKER_IMAGE_PROCESSES": "1",
    }


@pytest.fixture(scope="session")
async def shared_resources(stack_env: dict[str, str], session_openai_server: OpenAIServer) -> AsyncIterator[Resources]:
    """One set of clients (S3, OpenAI, pool) for the tests that need no client settings of
    their own: opening them costs far more than the tests themselves."""
    settings = HandlerSettings.from_env(_env(stack_env, session_openai_server))
    async with open_resources(settings, ("storage", "ai")) as resources:
        yield resources


@pytest.fixture
def handler_env(stack_env: dict[str, str], upload_root: Path, openai_server: OpenAIServer) -> dict[str, str]:
    """The environment a worker would get: the stack's S3, a fresh bucket name, the
    upload root, and the OpenAI stand-in as OPENAI_BASE_URL (no key)."""
    return _env(stack_env, openai_server) | {
        "ECOWORKER_S3_BUCKET": f"test-{uuid.uuid4().hex[:20]}",
        "ECOWORKER_UPLOAD_ROOT": str(upload_root),
    }


#: Settings that shape the clients; the others (bucket, root, limits, models) do not.
CLIENT_SETTINGS = (
    "s3_endpoint_url",
    "aws_region",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "s3_max_attempts",
    "openai_api_key",
    "openai_base_url",
    "openai_timeout",
    "image_processes",
)


@pytest.fixture
async def make_resources(handler_env: dict[str, str], shared_resources: Resources) -> AsyncIterator[MakeResources]:
    """Factory: `await make_resources(env={...}, queues=(...), **settings_overrides)` gives
    Resources for those settings and creates their bucket (emptied and deleted after the
    test). The shared clients are reused unless a client setting differs; then new
    clients are opened (and closed after the test)."""
    shared = shared_resources
    async with AsyncExitStack() as stack:
        created: set[str] = set()

        async def make(
            env: dict[str, str] | None = None,
            queues: Iterable[str] = ("storage", "ai"),
            **overrides: Any,
        ) -> Resources:
            settings = HandlerSettings.from_env(handler_env | (env or {}))
            settings = dataclasses.replace(settings, **overrides)
            if all(getattr(settings, name) == getattr(shared.settings, name) for name in CLIENT_SETTINGS):
                settings.check_for_queues(queues)
                resources = Resources(settings, shared.s3, shared.openai, shared.secrets, shared.pool)
            else:
                resources = await stack.enter_async_context(open_resources(settings, queues))
            if settings.bucket not in created:
                await create_bucket(resources, settings.bucket)
                created.add(settings.bucket)
                stack.push_async_callback(delete_bucket, resources, settings.bucket)
            return resources

        yield make


@pytest.fixture
async def resources(make_resources: MakeResources) -> Resources:
    """Resources with the default test settings and a fresh, empty bucket."""
    return await make_resources()


def make_ctx(resources: Resources | None, task_name: str = "test", queue: str = "storage", **kw: Any) -> TaskContext:
    """A real TaskContext as the worker builds it (call inside the running loop)."""
    return TaskContext(
        task_id=kw.pop("task_id", f"t-{uuid.uuid4().hex}"),
        task_name=task_name,
        queue=queue,
        attempt=1,
        max_attempts=4,
        deadline=asyncio.get_running_loop().time() + 60,
        logger=logging.LoggerAdapter(logging.getLogger("test"), {}),
        resources=resources,
        **kw,
    )


async def create_bucket(resources: Resources, bucket: str) -> None:
    region = resources.settings.aws_region
    extra: dict[str, Any] = {}
    if region != "us-east-1":
        extra["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        await resources.s3.create_bucket(Bucket=bucket, **extra)
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
            raise


async def delete_bucket(resources: Resources, bucket: str) -> None:
    for key in await list_keys(resources, bucket):
        await resources.s3.delete_object(Bucket=bucket, Key=key)
    uploads = await resources.s3.list_multipart_uploads(Bucket=bucket)
    for upload in uploads.get("Uploads", []):
        await resources.s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    await resources.s3.delete_bucket(Bucket=bucket)


async def list_keys(resources: Resources, bucket: str | None = None) -> list[str]:
    """Every key in the bucket (default: the settings' bucket), sorted."""
    bucket = bucket or resources.settings.bucket
    paginator = resources.s3.get_paginator("list_objects_v2")
    keys: list[str] = []
    async for page in paginator.paginate(Bucket=bucket):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(keys)


async def get_object(resources: Resources, key: str) -> tuple[bytes, dict[str, Any]]:
    """The bytes and the response (ContentType, Metadata, ETag…) of an object."""
    response = await resources.s3.get_object(Bucket=resources.settings.bucket, Key=key)
    async with response["Body"]:
        data = await response["Body"].read()
    return data, response


async def put_object(resources: Resources, key: str, data: bytes, **extra: Any) -> None:
    await resources.s3.put_object(Bucket=resources.settings.bucket, Key=key, Body=data, **extra)
