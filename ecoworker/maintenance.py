"""The seed's Celery-beat jobs, in-process: checkpoints, retention cleanup, vacuum, size warning."""

from __future__ import annotations

import asyncio
import logging
import time

from ecoworker import metrics
from ecoworker.aio import wait_event
from ecoworker.journal import Journal
from ecoworker.settings import MaintenanceSettings

log = logging.getLogger("ecoworker.maintenance")


class Maintenance:
    """Runs each job at its own interval; errors are logged and retried next time."""

    def __init__(self, settings: MaintenanceSettings, journal: Journal, tick: float = 1.0) -> None:
        self.settings = settings
        self.journal = journal
        self.tick = tick
        self._stop = asyncio.Event()
        self._warned_size = False

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        s = self.settings
        now = time.monotonic()
        next_checkpoint = now + s.checkpoint_interval
        next_cleanup = now + min(60.0, s.cleanup_interval)  # first cleanup soon after start
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_checkpoint:
                    next_checkpoint = now + s.checkpoint_interval
                    await self.checkpoint()
                if now >= next_cleanup:
                    next_cleanup = now + s.cleanup_interval
                    await self.cleanup()
                self.check_size()
            except Exception as exc:
                log.warning("maintenance job failed (retried at its next interval): %s", exc)
            await wait_event(self._stop, self.tick)

    async def checkpoint(self) -> None:
        busy, pages, done = await self.journal.checkpoint("PASSIVE")
        log.debug("PASSIVE checkpoint: %d of %d pages%s", done, pages, " (readers busy)" if busy else "")

    async def cleanup(self) -> int:
        deleted = await self.journal.cleanup_old_tasks(self.settings.retention_days)
        if deleted:
            log.info("retention cleanup removed %d synced row(s) older than %g days",
                     deleted, self.settings.retention_days)
        return deleted

    def check_size(self) -> None:
        wal = self.journal.wal_file
        size = wal.stat().st_size if wal.exists() else 0
        metrics.WAL_FILE.set(size)
        over = size > self.settings.wal_warn_bytes
        if over and not self._warned_size:
            log.warning("the journal's -wal file is %.0f MB (over %.0f MB): a long reader may be "
                        "blocking checkpoints; run `ecoworker wal checkpoint --mode truncate`",
                        size / 1e6, self.settings.wal_warn_bytes / 1e6)
        self._warned_size = over
