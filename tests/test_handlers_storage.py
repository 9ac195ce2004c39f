"""The storage handlers against a real S3 server (moto): uploads, image variants, refusals."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from aiohttp import web
from PIL import ExifTags, Image

from ecoworker.errors import PermanentError, Retry
from handlers.base import HandlerSettings, Resources, open_resources, run_in_pool
from handlers.storage import process_image, upload_to_s3
from tests.handler_fixtures import *  # noqa: F403
from tests.handler_fixtures import MakeResources, get_object, list_keys, make_ctx, put_object
from tests.workers import WorkerProcess, descendants, env_for_worker, process_alive, wait_for

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


def write(root: Path, name: str, data: bytes) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def jpeg_with_exif(size: tuple[int, int] = (400, 200), orientation: int = 6) -> bytes:
    """A JPEG whose EXIF has an orientation, a camera make and a GPS position."""
    image = Image.new("RGB", size, (200, 40, 40))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Make] = "SecretCam"
    exif[ExifTags.IFD.GPSInfo] = {
        ExifTags.GPS.GPSLatitudeRef: "N",
        ExifTags.GPS.GPSLatitude: (52.0, 31.0, 12.0),
        ExifTags.GPS.GPSLongitudeRef: "E",
        ExifTags.GPS.GPSLongitude: (13.0, 24.0, 0.0),
    }
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=90)
    return buffer.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG that claims width x height pixels but is a few hundred bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    rows = zlib.compress(b"\0" * (1 + width // 8) * 16, 9)  # a few rows of zeros
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


class TestUploadToS3:
    async def test_small_file(self, resources: Resources, upload_root: Path) -> None:
        """A small file is uploaded byte for byte with a guessed content type and task tag."""
        write(upload_root, "docs/report.json", b'{"ok": true}')
        ctx = make_ctx(resources, "upload_to_s3")
        result = await upload_to_s3(ctx, "docs/report.json", "reports/r1.json")
        data, response = await get_object(resources, "reports/r1.json")
        assert data == b'{"ok": true}'
        assert response["ContentType"] == "application/json"
        assert response["Metadata"] == {"ecoworker-task-id": ctx.task_id}
        bucket = resources.settings.bucket
        assert result == {
            "status": "success",
            "bucket": bucket,
            "s3_key": "reports/r1.json",
            "etag": response["ETag"].strip('"'),
            "size": 12,
            "url": f"s3://{bucket}/reports/r1.json",
            "content_type": "application/json",
        }

    async def test_multipart_large_file(self, resources: Resources, upload_root: Path) -> None:
        """A 9 MiB file goes up as a 2-part multipart upload and reads back identical."""
        payload = os.urandom(9 * MiB)
        write(upload_root, "big.bin", payload)
        result = await upload_to_s3(make_ctx(resources), "big.bin", "big/file.bin")
        data, response = await get_object(resources, "big/file.bin")
        assert data == payload
        assert result["size"] == 9 * MiB
        assert result["etag"].endswith("-2")  # S3's multipart ETag: <md5 of md5s>-<parts>
        assert response["ContentType"] == "application/octet-stream"

    async def test_given_content_type_and_absolute_path(self, resources: Resources, upload_root: Path) -> None:
        """An absolute path inside the root is accepted and an explicit content type wins."""
        path = write(upload_root, "a.dat", b"abc")
        await upload_to_s3(make_ctx(resources), str(path), "x/a.dat", content_type="text/csv")
        _, response = await get_object(resources, "x/a.dat")
        assert response["ContentType"] == "text/csv"

    async def test_delete_after(self, resources: Resources, upload_root: Path) -> None:
        """delete_after removes the local file once the object is stored."""
        path = write(upload_root, "gone.txt", b"bye")
        await upload_to_s3(make_ctx(resources), "gone.txt", "gone.txt", delete_after=True)
        assert not path.exists()
        assert await list_keys(resources) == ["gone.txt"]

    async def test_rerun_after_delete_finds_its_object(self, resources: Resources, upload_root: Path) -> None:
        """A re-run of the same task after its file was deleted reports the stored object;
        another task with the same key and no file still fails."""
        write(upload_root, "once.txt", b"once")
        ctx = make_ctx(resources)
        first = await upload_to_s3(ctx, "once.txt", "once.txt", delete_after=True)
        again = await upload_to_s3(ctx, "once.txt", "once.txt", delete_after=True)
        assert again == first
        with pytest.raises(PermanentError, match="no such file"):
            await upload_to_s3(make_ctx(resources), "once.txt", "once.txt", delete_after=True)

    @pytest.mark.parametrize(
        ("file_path", "message"),
        [
            ("../../etc/passwd", "outside the upload root"),
            ("/etc/hostname", "outside the upload root"),
            ("link-out", "outside the upload root"),
            ("dir-link-out/passwd", "outside the upload root"),
            ("missing.txt", "no such file"),
            ("empty.txt", "empty file"),
            ("subdir", "not a regular file"),
            ("", "non-empty string"),
        ],
    )
    async def test_refused_paths_write_nothing(
        self, resources: Resources, upload_root: Path, tmp_path: Path, file_path: str, message: str
    ) -> None:
        """Paths escaping the root (.., absolute, symlinks), missing, empty or non-regular
        files fail permanently with a clear message and no object is written."""
        outside = write(tmp_path, "outside/passwd", b"root:x:0:0")
        (upload_root / "link-out").symlink_to(outside)
        (upload_root / "dir-link-out").symlink_to(outside.parent)
        write(upload_root, "empty.txt", b"")
        (upload_root / "subdir").mkdir()
        with pytest.raises(PermanentError, match=message):
            await upload_to_s3(make_ctx(resources), file_path, "stolen")
        assert await list_keys(resources) == []

    @pytest.mark.parametrize(
        ("key", "message"),
        [
            ("/abs", "must not start with '/'"),
            ("a/../b", "'..' segment"),
            ("a\nb", "control characters"),
            ("k" * 1025, "1024"),
            ("", "non-empty string"),
        ],
    )
    async def test_bad_keys(self, resources: Resources, upload_root: Path, key: str, message: str) -> None:
        """Unsafe S3 keys are refused before anything is uploaded."""
        write(upload_root, "f.txt", b"x")
        with pytest.raises(PermanentError, match=message):
            await upload_to_s3(make_ctx(resources), "f.txt", key)
        assert await list_keys(resources) == []

    async def test_missing_bucket(self, resources: Resources, upload_root: Path) -> None:
        """An upload to a bucket that does not exist fails permanently, naming the fix."""
        write(upload_root, "f.txt", b"x")
        with pytest.raises(PermanentError, match=r"NoSuchBucket.*create the bucket"):
            await upload_to_s3(make_ctx(resources), "f.txt", "f.txt", bucket="no-such-bucket-x1")


Answer = Callable[[web.Request], Awaitable[web.Response]]
FakeS3 = Callable[[Answer], Awaitable[Resources]]


def s3_error(status: int, code: str, headers: dict[str, str] | None = None) -> web.Response:
    xml = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>scripted</Message></Error>"
    return web.Response(status=status, text=xml, content_type="application/xml", headers=headers)


def always(status: int, code: str, headers: dict[str, str] | None = None) -> Answer:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return s3_error(status, code, headers)

    return answer


@pytest.fixture
async def fake_s3(upload_root: Path) -> AsyncIterator[FakeS3]:
    """Factory: Resources whose S3 endpoint is a local HTTP server answering with `answer`."""
    async with AsyncExitStack() as stack:

        async def make(answer: Answer) -> Resources:
            app = web.Application(client_max_size=64 * MiB)
            app.router.add_route("*", "/{tail:.*}", answer)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            settings = HandlerSettings.from_env(
                {
                    "S3_ENDPOINT_URL": f"http://127.0.0.1:{runner.addresses[0][1]}",
                    "AWS_ACCESS_KEY_ID": "k",
                    "AWS_SECRET_ACCESS_KEY": "s",
                    "ECOWORKER_UPLOAD_ROOT": str(upload_root),
                    "ECOWORKER_S3_MAX_ATTEMPTS": "1",  # botocore would retry 503s itself
                }
            )
            return await stack.enter_async_context(open_resources(settings, ["storage"]))

        yield make


class TestS3Errors:
    async def test_slowdown_is_retried_after_retry_after(self, fake_s3: FakeS3, upload_root: Path) -> None:
        """S3 throttling (503 SlowDown) becomes Retry with the server's Retry-After delay."""
        resources = await fake_s3(always(503, "SlowDown", {"Retry-After": "7"}))
        write(upload_root, "f.txt", b"x")
        with pytest.raises(Retry) as caught:
            await upload_to_s3(make_ctx(resources), "f.txt", "f.txt")
        assert caught.value.after == 7.0
        assert "SlowDown" in str(caught.value)

    async def test_access_denied_is_permanent(self, fake_s3: FakeS3, upload_root: Path) -> None:
        """403 AccessDenied fails permanently and says to grant access."""
        resources = await fake_s3(always(403, "AccessDenied"))
        write(upload_root, "f.txt", b"x")
        with pytest.raises(PermanentError, match=r"AccessDenied.*grant"):
            await upload_to_s3(make_ctx(resources), "f.txt", "f.txt")

    async def test_failed_part_aborts_the_multipart_upload(self, fake_s3: FakeS3, upload_root: Path) -> None:
        """A part that fails (503) aborts the multipart upload, so no orphaned parts are left,
        and the task is retried."""
        seen: list[str] = []

        async def answer(request: web.Request) -> web.Response:
            await request.read()
            seen.append(f"{request.method} {'&'.join(sorted(request.query))}")
            if request.method == "POST" and "uploads" in request.query:
                xml = "<Bucket>b</Bucket><Key>k</Key><UploadId>U1</UploadId>"
                xml = f"<InitiateMultipartUploadResult>{xml}</InitiateMultipartUploadResult>"
                return web.Response(text=xml, content_type="application/xml")
            if request.method == "DELETE":
                return web.Response(status=204)
            return s3_error(503, "SlowDown")

        resources = await fake_s3(answer)
        write(upload_root, "big.bin", b"\0" * (9 * MiB))
        with pytest.raises(Retry, match="SlowDown"):
            await upload_to_s3(make_ctx(resources), "big.bin", "big.bin", bucket="bucket-b")
        assert seen[0] == "POST uploads"
        assert seen[-1] == "DELETE uploadId"
        assert any(s.startswith("PUT partNumber") for s in seen)

    async def test_unreachable_endpoint_is_retried(self, make_resources: MakeResources, upload_root: Path) -> None:
        """A refused connection to S3 becomes Retry (transient), never PermanentError."""
        resources = await make_resources()
        closed = await make_resources(s3_endpoint_url="http://127.0.0.1:9", s3_max_attempts=1)
        assert resources.settings.bucket == closed.settings.bucket
        write(upload_root, "f.txt", b"x")
        with pytest.raises(Retry, match="unreachable"):
            await upload_to_s3(make_ctx(closed), "f.txt", "f.txt")


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


class TestProcessImage:
    async def test_default_variants_are_upright_and_exif_free(self, resources: Resources) -> None:
        """Default variants (thumb webp, medium jpeg) are resized, rotated per EXIF, and carry
        no EXIF/GPS; they are stored under <stem>/<name>.<ext>."""
        source = jpeg_with_exif((1600, 800), orientation=6)  # displays as 800x1600
        assert Image.open(io.BytesIO(source)).getexif().get_ifd(ExifTags.IFD.GPSInfo)
        await put_object(resources, "photos/p1.jpg", source, ContentType="image/jpeg")
        result = await process_image(make_ctx(resources, "process_image"), "photos/p1.jpg")
        assert await list_keys(resources) == [
            "photos/p1.jpg",
            "photos/p1/medium.jpg",
            "photos/p1/thumb.webp",
        ]
        expected = {"thumb": ("WEBP", (128, 256)), "medium": ("JPEG", (512, 1024))}
        for variant in result["variants"]:
            data, response = await get_object(resources, variant["key"])
            image = decode(data)
            fmt, size = expected[variant["name"]]
            assert (image.format, image.size) == (fmt, size)
            assert (variant["width"], variant["height"]) == size
            assert variant["size"] == len(data)
            assert response["ContentType"] == f"image/{fmt.lower()}"
            assert len(image.getexif()) == 0
            assert "exif" not in image.info
            assert b"SecretCam" not in data
        assert result["source"] == {"format": "JPEG", "width": 1600, "height": 800, "size": len(source)}

    async def test_custom_variants(self, resources: Resources) -> None:
        """A `fit` variant is cropped to exactly its box; a `thumbnail` never enlarges."""
        await put_object(resources, "img.png", _png((300, 100)))
        variants = [
            {"name": "square", "width": 64, "height": 64, "mode": "fit", "format": "png"},
            {"name": "big", "width": 2000, "format": "jpeg", "quality": 70},
        ]
        result = await process_image(make_ctx(resources), "img.png", variants=variants)
        sizes = {v["name"]: (v["width"], v["height"], v["format"]) for v in result["variants"]}
        assert sizes == {"square": (64, 64, "png"), "big": (300, 100, "jpeg")}
        data, _ = await get_object(resources, "img/square.png")
        assert decode(data).size == (64, 64)

    async def test_keep_exif_when_asked(self, resources: Resources) -> None:
        """strip_exif=False keeps the EXIF (GPS included) with the orientation reset."""
        await put_object(resources, "keep.jpg", jpeg_with_exif((400, 200)))
        variants = [{"name": "v", "width": 100, "format": "jpeg"}]
        await process_image(make_ctx(resources), "keep.jpg", variants=variants, strip_exif=False)
        image = decode((await get_object(resources, "keep/v.jpg"))[0])
        exif = image.getexif()
        assert exif.get(ExifTags.Base.Make) == "SecretCam"
        assert exif.get_ifd(ExifTags.IFD.GPSInfo)
        assert exif.get(ExifTags.Base.Orientation, 1) == 1
        assert image.size == (50, 100)

    @pytest.mark.parametrize(
        ("data", "overrides", "message"),
        [
            (png_bomb(), {}, "decompression bomb"),
            (b"", {"max_image_pixels": 10_000}, "decompression bomb"),  # 200x200 below
            (b"%PDF-1.4 not an image at all", {}, "not an image"),
            (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, {}, "not an image|corrupt"),
            (os.urandom(4096), {"max_download_bytes": 1024}, "larger than the 1024-byte limit"),
        ],
        ids=["bomb-header", "over-pixel-limit", "not-image", "broken-png", "too-big"],
    )
    async def test_refused_images_write_nothing(
        self, make_resources: MakeResources, data: bytes, overrides: dict, message: str
    ) -> None:
        """Bombs, non-images, corrupt and oversize files fail permanently; no variant is written."""
        resources = await make_resources(**overrides)
        await put_object(resources, "in.png", data or _png((200, 200)))
        with pytest.raises(PermanentError, match=message):
            await process_image(make_ctx(resources), "in.png")
        assert await list_keys(resources) == ["in.png"]

    async def test_missing_source(self, resources: Resources) -> None:
        """A source key that does not exist fails permanently."""
        with pytest.raises(PermanentError, match="NoSuchKey"):
            await process_image(make_ctx(resources), "nope.jpg")

    async def test_bad_variants(self, resources: Resources) -> None:
        """A malformed variant list is refused before anything is downloaded."""
        with pytest.raises(PermanentError, match="format 'gif'"):
            await process_image(make_ctx(resources), "x.jpg", variants=[{"name": "a", "width": 5, "format": "gif"}])


class TestPool:
    async def test_dead_child_becomes_retry_and_pool_recovers(self, resources: Resources) -> None:
        """A pool process that dies makes the task Retry and the next task gets a fresh pool."""
        ctx = make_ctx(resources)
        broken = resources.pool
        with pytest.raises(Retry, match="pool process died"):
            await run_in_pool(ctx, os._exit, 1)
        assert resources.pool is not broken
        assert await run_in_pool(ctx, abs, -3) == 3

    async def test_missing_resources(self) -> None:
        """A context without resources fails with a message naming the wiring fix."""
        with pytest.raises(PermanentError, match="open_resources"):
            await upload_to_s3(make_ctx(None), "f", "k")


#: What a `--queue storage` worker does with the handlers at start-up, then a check of what it imported.
STORAGE_WORKER = """
import asyncio, sys
from handlers import build_registry
from handlers.base import HandlerSettings, open_resources

async def start():
    settings = HandlerSettings.from_env({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    async with open_resources(settings, ["storage"]) as resources:
        assert resources.s3 is not None and resources.openai is None

names = sorted(spec.name for spec in build_registry(["storage"]))
assert names == ["process_image", "upload_to_s3"], names
asyncio.run(start())
assert "openai" not in sys.modules, "a storage worker imported openai"
"""
#: The same for a worker of built-in tasks only.
BUILTIN_WORKER = """
import asyncio, sys
from handlers import build_registry
from handlers.base import HandlerSettings, open_resources

async def start():
    async with open_resources(HandlerSettings.from_env({}), ["other"]) as resources:
        assert resources.s3 is None and resources.openai is None

assert len(build_registry(["other"])) == 0
asyncio.run(start())
imported = {"handlers.storage", "handlers.ai", "handlers.s3", "openai", "aioboto3"} & sys.modules.keys()
assert not imported, f"a worker of built-in tasks imported {sorted(imported)}"
"""


class TestStartupImports:
    def run_python(self, code: str) -> None:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def test_storage_worker_does_not_import_openai(self) -> None:
        """A storage-only worker registers the storage handlers and opens its clients
        without ever importing openai (seconds of start-up CPU)."""
        self.run_python(STORAGE_WORKER)

    def test_builtin_worker_imports_no_handler_module(self) -> None:
        """A worker of other queues imports neither handler module nor any client library."""
        self.run_python(BUILTIN_WORKER)


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


class TestPoolLifetime:
    async def test_pool_processes_end_when_the_worker_is_killed(self, tmp_path: Path, stack_env: dict[str, str],
                                                               queue_name: str) -> None:
        """After kill -9 of a storage worker, its image pool children and their forkserver exit too."""
        env = env_for_worker(stack_env, POSTGRES_DSN="", ECOWORKER_IMAGE_PROCESSES="2")
        w = WorkerProcess(tmp_path / "journal.db", ["storage", queue_name], env, tmp_path / "worker.log").start()
        try:
            await asyncio.to_thread(w.wait_ready, 60)
            assert w.proc is not None
            below = descendants(w.proc.pid)
            assert len(below) >= 3, below  # the forkserver, its 2 pool children, the resource tracker
        finally:
            w.kill()
        await wait_for(lambda: not [p for p in below if process_alive(p)], 15, message=lambda: (
            f"still running after the worker was killed: {[p for p in below if process_alive(p)]}"))

    async def test_a_worker_without_image_tasks_starts_no_process(self, tmp_path: Path, stack_env: dict[str, str],
                                                                  queue_name: str) -> None:
        """A worker of queues with no image task creates no pool, so no child process at all
        (no forkserver, no resource tracker: 12 MB each); a task needing the pool still gets one."""
        env = env_for_worker(stack_env, POSTGRES_DSN="", ECOWORKER_JOURNAL_PROCESS="0")
        w = WorkerProcess(tmp_path / "journal.db", [queue_name], env, tmp_path / "worker.log").start()
        try:
            await asyncio.to_thread(w.wait_ready, 60)
            assert w.proc is not None
            assert not descendants(w.proc.pid)
        finally:
            w.kill()

    async def test_the_pool_starts_on_first_use(self, handler_env: dict[str, str]) -> None:
        """Resources for queues without image tasks start no pool until a task runs in it."""
        settings = HandlerSettings.from_env(handler_env)
        async with open_resources(settings, ["other"]) as resources:
            assert resources.started_pool is None
            assert await run_in_pool(make_ctx(resources), abs, -3) == 3
            assert resources.started_pool is not None
