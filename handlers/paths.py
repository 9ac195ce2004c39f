"""Files named by tasks: resolved inside the upload root, opened without following late symlinks.

A task's `file_path` is relative to (or absolute inside) `ECOWORKER_UPLOAD_ROOT`.
Anything whose real path leaves the root, and anything that is not an existing
regular file, is refused with a PermanentError that says how to fix the task.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from ecoworker.errors import PermanentError
from handlers.base import HandlerSettings


class MissingFileError(PermanentError):
    """The file named by a task does not exist under the upload root."""


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
