"""Logging: JSON lines in production, a readable line on a terminal, secrets scrubbed."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

import orjson

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@/\s]+)@", re.I)
_EXTRA_FIELDS = ("task_id", "task", "queue", "attempt")


class Scrubber:
    """Removes known secret values and URL passwords from a formatted line."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


class JsonFormatter(logging.Formatter):
    def __init__(self, scrub: Scrubber) -> None:
        super().__init__()
        self.scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        # scrub before encoding: JSON escapes would hide a secret containing " or \
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": self.scrub(record.getMessage()),
        }
        for key in _EXTRA_FIELDS:
            if hasattr(record, key):
                value = getattr(record, key)
                doc[key] = self.scrub(value) if isinstance(value, str) else value
        if record.exc_info:
            doc["exc"] = self.scrub(self.formatException(record.exc_info))
        return self.scrub(orjson.dumps(doc, default=str).decode())


class TextFormatter(logging.Formatter):
    def __init__(self, scrub: Scrubber) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.scrub = scrub

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k}={getattr(record, k)}" for k in _EXTRA_FIELDS if hasattr(record, k)]
        return self.scrub(line + (" [" + " ".join(fields) + "]" if fields else ""))




def setup(level: str = "INFO", fmt: str = "auto", secrets: Iterable[str] = ()) -> None:
    """Configure the root logger once, for the whole process."""
    scrub = Scrubber(secrets)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(scrub) if use_json else TextFormatter(scrub))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiormq", "aio_pika", "botocore", "aiobotocore", "httpx", "httpx2", "httpcore", "httpcore2",
                  "openai", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # the broker supervisor logs connection loss and recovery in one line each
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)  # the sink logs outages once
