"""Frozen settings for the worker, built in one place (`Settings.from_env`).

Only the CLI calls `from_env` (with `os.environ` and the parsed flags); every
other module receives the finished object. `*_FILE` variants read secrets from
files, and secrets are kept out of `repr()` so they never reach a log line.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from ecoworker.errors import ConfigError

DEFAULT_WAL_PATH = "/var/lib/ecoeco/wal/ecoworker.db"


SECRET_PARAMS = frozenset({"password", "sslpassword"})


def redact_url(url: str | None) -> str:
    """`amqp://user:secret@host/` → `amqp://user:***@host/`; `?password=` too (for logs)."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "(unparsable URL)"
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
        query = urlencode([(k, "***" if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True, slots=True)
class SinkSettings:
    """PostgreSQL shipping. `dsn` None means: keep results in the journal only."""

    dsn: str | None = field(default=None, repr=False)
    batch_size: int = 5000
    max_delay: float = 1.0
    # this many waiting rows ship at once when no task has finished for sink.LULL (a burst
    # ended) instead of waiting out max_delay; each such batch is still this big (0: off)
    lull_batch: int = 100
    pool_size: int = 2
    backoff_max: float = 30.0
    command_timeout: float = 15.0  # a statement PostgreSQL does not answer in time counts as an outage
    auto_migrate: bool = False

    def __repr__(self) -> str:
        return (
            f"SinkSettings(dsn={redact_url(self.dsn)!r}, batch_size={self.batch_size}, "
            f"max_delay={self.max_delay}, lull_batch={self.lull_batch}, pool_size={self.pool_size})"
        )

    def __post_init__(self) -> None:
        if self.lull_batch < 0:
            raise ConfigError(f"ECOWORKER_SYNC_LULL_BATCH must be 0 (off) or more, got {self.lull_batch}")


@dataclass(frozen=True, slots=True)
class MaintenanceSettings:
    """The seed's Celery-beat jobs, run in-process."""

    checkpoint_interval: float = 300.0
    cleanup_interval: float = 3600.0
    retention_days: float = 7.0
    wal_warn_bytes: int = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `ecoworker run` needs, validated."""

    queues: tuple[str, ...] = ("storage",)
    worker_name: str = field(default_factory=socket.gethostname)
    rabbitmq_url: str = field(default="amqp://guest:guest@127.0.0.1:5672/", repr=False)
    wal_path: Path = Path(DEFAULT_WAL_PATH)
    concurrency: int = 100
    prefetch: int = 1000
    ingest_batch_max: int = 500
    # ingest, claim, finish, mark synced and the sink's reads in a child process with its own GIL
    # (ecoworker.writer): +14 % tasks/s in a flood (the worker is CPU-bound), for about 15 MB more.
    # 0 keeps them in SQLite's thread, in one process
    journal_process: bool = True
    max_body_bytes: int = 1024 * 1024
    default_max_retries: int = 3
    grace_period: float = 50.0
    connect_timeout: float = 30.0
    pending_high_water: int = 100_000
    pending_low_water: int = 50_000
    unsynced_high_water: int = 1_000_000
    min_free_disk_bytes: int = 64 * 1024 * 1024
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9100  # 0: an ephemeral port (tests); -1: no HTTP server
    log_level: str = "INFO"
    log_format: str = "auto"  # json | text | auto (json unless stderr is a terminal)
    sink: SinkSettings = field(default_factory=SinkSettings)
    maintenance: MaintenanceSettings = field(default_factory=MaintenanceSettings)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "rabbitmq_url"
        )
        return f"Settings(rabbitmq_url={redact_url(self.rabbitmq_url)!r}, {shown})"

    def __post_init__(self) -> None:
        if not self.queues:
            raise ConfigError("no queue to consume: pass --queue NAME (several allowed)")
        for name in ("concurrency", "prefetch", "ingest_batch_max", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.pending_low_water >= self.pending_high_water:
            raise ConfigError("pending_low_water must be below pending_high_water")
        if self.ingest_batch_max > 1000:
            raise ConfigError("ingest_batch_max is capped at 1000 (one SQLite statement a batch)")

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> Settings:
        """Build settings from environment variables, then apply non-None `overrides` (flags)."""
        e = _Env(env)
        values: dict[str, Any] = {
            "queues": e.names("ECOWORKER_QUEUES"),
            "worker_name": e.text("ECOWORKER_WORKER_NAME") or e.text("HOSTNAME"),
            "rabbitmq_url": e.secret("RABBITMQ_URL"),
            "wal_path": e.text("WAL_DB_PATH") or e.text("ECOWORKER_WAL_PATH"),
            "concurrency": e.integer("ECOWORKER_CONCURRENCY"),
            "prefetch": e.integer("ECOWORKER_PREFETCH"),
            "ingest_batch_max": e.integer("ECOWORKER_INGEST_BATCH_MAX"),
            "journal_process": e.flag("ECOWORKER_JOURNAL_PROCESS"),
            "max_body_bytes": e.integer("ECOWORKER_MAX_BODY_BYTES"),
            "default_max_retries": e.integer("ECOWORKER_MAX_RETRIES"),
            "grace_period": e.number("ECOWORKER_GRACE_PERIOD"),
            "connect_timeout": e.number("ECOWORKER_CONNECT_TIMEOUT"),
            "pending_high_water": e.integer("ECOWORKER_PENDING_HIGH_WATER"),
            "pending_low_water": e.integer("ECOWORKER_PENDING_LOW_WATER"),
            "unsynced_high_water": e.integer("ECOWORKER_UNSYNCED_HIGH_WATER"),
            "min_free_disk_bytes": e.integer("ECOWORKER_MIN_FREE_DISK_BYTES"),
            "metrics_host": e.text("ECOWORKER_METRICS_HOST"),
            "metrics_port": e.integer("ECOWORKER_METRICS_PORT"),
            "log_level": e.text("ECOWORKER_LOG_LEVEL"),
            "log_format": e.text("ECOWORKER_LOG_FORMAT"),
        }
        sink: dict[str, Any] = {
            "dsn": e.secret("POSTGRES_DSN") or _dsn_from_parts(e),
            "batch_size": e.integer("ECOWORKER_SYNC_BATCH_SIZE"),
            "max_delay": e.number("ECOWORKER_SYNC_MAX_DELAY"),
            "lull_batch": e.integer("ECOWORKER_SYNC_LULL_BATCH"),
            "pool_size": e.integer("ECOWORKER_SYNC_POOL_SIZE"),
            "backoff_max": e.number("ECOWORKER_SYNC_BACKOFF_MAX"),
            "command_timeout": e.number("ECOWORKER_SYNC_COMMAND_TIMEOUT"),
        }
        maint: dict[str, Any] = {
            "checkpoint_interval": e.number("ECOWORKER_CHECKPOINT_INTERVAL"),
            "cleanup_interval": e.number("ECOWORKER_CLEANUP_INTERVAL"),
            "retention_days": e.number("ECOWORKER_RETENTION_DAYS"),
            "wal_warn_bytes": e.integer("ECOWORKER_WAL_WARN_BYTES"),
        }
        sink.update(_given(overrides.pop("sink", None)))
        maint.update(_given(overrides.pop("maintenance", None)))
        values.update(_given(overrides))
        values = {k: v for k, v in values.items() if v is not None}
        if "queues" in values:
            values["queues"] = tuple(dict.fromkeys(values["queues"]))
        if "wal_path" in values:
            values["wal_path"] = Path(values["wal_path"])
        values["sink"] = SinkSettings(**{k: v for k, v in sink.items() if v is not None})
        values["maintenance"] = MaintenanceSettings(
            **{k: v for k, v in maint.items() if v is not None}
        )
        return cls(**values)


def _given(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """The entries actually given (flags left out are None and must not hide the environment)."""
    return {k: v for k, v in (values or {}).items() if v is not None}


def _dsn_from_parts(e: _Env) -> str | None:
    """The seed's POSTGRES_HOST/PORT/USER/PASSWORD/DB variables as one DSN."""
    host = e.text("POSTGRES_HOST")
    if not host:
        return None
    user = quote(e.text("POSTGRES_USER") or "postgres", safe="")
    password = e.secret("POSTGRES_PASSWORD")
    auth = f"{user}:{quote(password, safe='')}" if password else user
    port = e.text("POSTGRES_PORT") or "5432"
    db = quote(e.text("POSTGRES_DB") or "ecoeco", safe="")
    return f"postgresql://{auth}@{host}:{port}/{db}"


class _Env:
    """Typed, error-reporting access to an environment mapping."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str) -> str | None:
        value = self.env.get(name)
        return value.strip() if value and value.strip() else None

    def secret(self, name: str) -> str | None:
        """`NAME`, or the contents of the file named by `NAME_FILE`."""
        path = self.text(f"{name}_FILE")
        if path:
            try:
                return Path(path).read_text().strip() or None
            except OSError as exc:
                raise ConfigError(f"{name}_FILE={path}: cannot read it ({exc.strerror})") from None
        return self.text(name)

    def integer(self, name: str) -> int | None:
        raw = self.text(name)
        if raw is None:
            return None
        if raw.lower() == "off":
            return -1
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a whole number") from None

    def flag(self, name: str) -> bool | None:
        raw = self.text(name)
        if raw is None:
            return None
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={raw!r} is not a yes/no value: use 1 or 0 (true/false, yes/no, on/off)")

    def number(self, name: str) -> float | None:
        raw = self.text(name)
        if raw is None:
            return None
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None

    def names(self, name: str) -> list[str] | None:
        raw = self.text(name)
        return [q.strip() for q in raw.split(",") if q.strip()] if raw else None


def environ() -> Mapping[str, str]:
    """The process environment (only the CLI calls this)."""
    return os.environ
