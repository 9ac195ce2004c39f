"""Run due PENDING rows with bounded concurrency, and journal what happened.

The claim (PENDING → RUNNING, attempts+1) is committed before a handler
starts, so a task that kills the process is counted. Outcomes are buffered and
written in batches by one finisher: a natural group commit for state changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import orjson

from ecoworker import metrics
from ecoworker.aio import wait_event
from ecoworker.deadlines import Deadlines
from ecoworker.errors import PermanentError, Retry
from ecoworker.journal import ClaimedTask, Journal, Outcome
from ecoworker.registry import Registry, TaskContext, TaskSpec
from ecoworker.schema import DL_OWED
from ecoworker.settings import Settings

log = logging.getLogger("ecoworker.scheduler")
MAX_CLAIM = 500
MAX_ERROR = 4000


class FailureLog:
    """Logs a retried journal operation once when it starts failing and once when it works
    again, instead of every second while it fails (a full disk can last hours)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.failures == 1:
            log.error("could not %s: %s; retrying every second (logged again once it works)", self.what, exc)

    def worked(self) -> None:
        if self.failures:
            log.info("could %s again after %d failed attempt(s)", self.what, self.failures)
            self.failures = 0


class Scheduler:
    """Claims due rows, runs their handlers, records outcomes."""

    def __init__(self, settings: Settings, journal: Journal, registry: Registry, resources: Any,
                 on_finished: Callable[[list[Outcome], bool], None]) -> None:
        self.settings = settings
        self.journal = journal
        self.registry = registry
        self.resources = resources
        self.on_finished = on_finished  # (outcomes, urgent)
        self._wake = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._deadlines = Deadlines()  # handler time limits: one timer, not one per task
        self._per_task: Counter[str] = Counter()
        self._outcomes: list[Outcome] = []
        self._urgent = False
        self._outcome_ready = asyncio.Event()
        self._stopping = False
        self._releasing = False
        self._reserved = 0  # slots promised to the consumer for rows it journals as RUNNING
        self._reserved_for: Counter[str] = Counter()  # … of them, per task name
        # due rows may wait in the journal: set at start, by wake(), by a full claim, by a
        # retry and by the due timer; only then does a freed slot cost a claim (a claim per
        # finished task had kept the slots from intake: every row was written twice)
        self._backlog = True
        self._due_at: float | None = None  # the earliest not_before seen in the journal, if later
        self._held_back: set[str] = set()  # tasks at their own limit at the last claim
        self._claim_failures = FailureLog("claim due tasks from the journal")
        self._finish_failures = FailureLog("journal task outcomes")
        metrics.IN_FLIGHT.set_function(lambda: len(self._running))  # read at scrape, not set per task

    def wake(self) -> None:
        """Rows may be due in the journal now (the consumer journaled PENDING rows): claim them."""
        self._backlog = True
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------ straight from intake

    def reserve(self, names: Sequence[str]) -> list[int]:
        """Promise slots to rows the consumer is about to journal as RUNNING (one write instead
        of ingest + claim); `names` are their task names. Returns the indexes that got a slot,
        within the global and each task's own limit. While due rows wait in the journal, new
        deliveries get at most half the free slots, so the backlog keeps draining."""
        if self._stopping:
            return []
        free = self.settings.concurrency - len(self._running) - self._reserved
        if self._backlog:
            free //= 2
        picked: list[int] = []
        for i, name in enumerate(names):
            if len(picked) >= free:
                break
            spec = self.registry.get(name)
            if spec is None or self._at_limit(spec):
                continue
            self._reserved_for[name] += 1
            picked.append(i)
        self._reserved += len(picked)
        return picked

    def adopt(self, rows: list[ClaimedTask], reserved: Sequence[str]) -> None:
        """Give back the slots reserved for tasks `reserved` (names), then run `rows`
        (journaled RUNNING and committed)."""
        self._reserved -= len(reserved)
        self._reserved_for.subtract(reserved)
        for row in rows:
            self._start(row)

    # ------------------------------------------------------------ main loops

    async def run(self) -> None:
        finisher = asyncio.create_task(self._finish_loop(), name="finisher")
        try:
            await self._claim_loop()
        finally:
            self._stopping = True  # so the finisher returns even when we are cancelled
            self._outcome_ready.set()
            await finisher

    async def stop(self, grace: float) -> None:
        """Stop claiming; give running handlers `grace` seconds; hand the rest back unrun."""
        self._stopping = True
        self._wake.set()
        running = list(self._running.values())
        if running:
            log.info("waiting up to %.0fs for %d running task(s)", grace, len(running))
            _, late = await asyncio.wait(running, timeout=grace)
            if late:
                log.warning("%d task(s) still running after the grace period: returned to PENDING", len(late))
                self._releasing = True
                for task in late:
                    task.cancel()
                await asyncio.wait(late)
        self._outcome_ready.set()

    async def _claim_loop(self) -> None:
        limit = self.settings.concurrency
        while not self._stopping:
            self._wake.clear()
            if self._due_at is not None and self._due_at <= time.time():
                self._backlog, self._due_at = True, None
            free = limit - len(self._running) - self._reserved
            claimed: list[ClaimedTask] = []
            if free > 0 and self._backlog:
                ask = min(free, MAX_CLAIM)
                self._reserved += ask  # the consumer must not promise these slots while we claim
                now, self._held_back = time.time(), set(self._saturated())
                try:
                    claimed = await self.journal.claim(now, ask, self._held_back)
                except Exception as exc:  # e.g. disk full: keep the loop alive, try again
                    self._claim_failures.failed(exc)
                    self._reserved -= ask
                    await asyncio.sleep(1)
                    continue
                self._claim_failures.worked()
                self._reserved -= ask
                self._backlog = len(claimed) == ask  # a full claim may have left due rows behind
                for row in claimed:
                    self._start(row)
                if claimed and self._backlog:
                    await asyncio.sleep(0)  # more may be due: claim again after letting others run
                    continue
                if not self._backlog:  # all due rows are running: when is the next one due?
                    due = await self.journal.next_due()
                    # one due at the claim was held back by its task's own limit: that task's
                    # next finish looks again (_execute), not a timer
                    self._due_at = due if due is not None and due > now else None
            await self._sleep_until_due()

    async def _sleep_until_due(self) -> None:
        """Until woken (slots freed, rows journaled), the next row is due, or a second passes;
        a second without news claims anyway (a row held back by its task's own limit)."""
        timeout = 1.0
        if self._due_at is not None:
            timeout = max(0.0, min(timeout, self._due_at - time.time()))
        if timeout > 0 and not self._stopping and not await wait_event(self._wake, timeout):
            self._backlog = True

    def _saturated(self) -> list[str]:
        return [s.name for s in self.registry if self._at_limit(s)]

    def _at_limit(self, spec: TaskSpec) -> bool:
        """This task's own concurrency limit is taken (running plus promised to the consumer)."""
        taken = self._per_task[spec.name] + self._reserved_for[spec.name]
        return spec.concurrency is not None and taken >= spec.concurrency

    def _start(self, row: ClaimedTask) -> None:
        spec = self.registry.get(row.task_name)
        if spec is not None and self._at_limit(spec):
            # claimed past this task's own limit: hand it back unrun, uncounted
            self._record(Outcome(row.task_id, "PENDING", not_before=time.time(), attempts_inc=-1), False)
            return
        self._per_task[row.task_name] += 1
        task = asyncio.create_task(self._execute(row, spec), name=f"task:{row.task_id}")
        self._running[row.task_id] = task

    # ------------------------------------------------------------ one task

    async def _execute(self, row: ClaimedTask, spec: TaskSpec | None) -> None:
        started = time.monotonic()
        outcome: Outcome | None = None
        try:
            outcome = await self._outcome_of(row, spec)
        except asyncio.CancelledError:
            if self._releasing:
                outcome = Outcome(row.task_id, "PENDING", not_before=time.time(), attempts_inc=-1,
                                  error="interrupted by shutdown; will run again")
            raise
        finally:
            self._per_task[row.task_name] -= 1
            self._running.pop(row.task_id, None)
            if row.task_name in self._held_back:  # its rows waited for this slot
                self._backlog = True
            if outcome is not None:
                _seconds(row.task_name).observe(time.monotonic() - started)
                _finished(row.task_name, _label(outcome)).inc()
                if outcome.status in ("FAILURE", "DEAD"):
                    log.warning("task %s (%s) failed for good after %d attempt(s): %s", row.task_id,
                                row.task_name, row.attempts, (outcome.error or "")[:500], extra={
                                    "task_id": row.task_id, "task": row.task_name, "queue": row.queue,
                                    "attempt": row.attempts})
                self._record(outcome, spec is not None and spec.urgent)
            self._wake.set()

    async def _outcome_of(self, row: ClaimedTask, spec: TaskSpec | None) -> Outcome:
        now = time.time()
        if spec is None:
            return _failed(row, f"no handler for {row.task_name!r} in this worker; "
                                "run a worker that serves it, or `ecoworker dlq replay` later")
        if row.expires_at is not None and row.expires_at <= now:
            return Outcome(row.task_id, "EXPIRED", error="expired before it could run", completed_at=now)
        timeout = row.timeout or spec.timeout
        loop = asyncio.get_running_loop()
        ctx = TaskContext(
            task_id=row.task_id, task_name=row.task_name, queue=row.queue or "", attempt=row.attempts,
            max_attempts=_max_retries(row, spec) + 1, deadline=loop.time() + timeout,
            logger=logging.LoggerAdapter(_task_logger(row.task_name), {
                "task_id": row.task_id, "task": row.task_name, "queue": row.queue,
                "attempt": row.attempts}),
            resources=self.resources,
        )
        try:
            args, kwargs = orjson.loads(row.args), orjson.loads(row.kwargs)
            result = await self._deadlines.run(spec.handler(ctx, *args, **kwargs), ctx.deadline)
            text = orjson.dumps(result).decode()
        except Retry as exc:
            return self._retry_or_fail(row, spec, f"retry requested: {exc}", exc.after)
        except PermanentError as exc:
            return _failed(row, f"{type(exc).__name__}: {exc}")
        except TimeoutError:
            return self._retry_or_fail(row, spec, f"timed out after {timeout:g}s", None)
        except orjson.JSONEncodeError as exc:
            return _failed(row, f"handler result is not JSON-serialisable: {exc}")
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            if spec.retry.is_transient(exc):
                return self._retry_or_fail(row, spec, message, None)
            ctx.logger.exception("task failed permanently")
            return _failed(row, message)
        return Outcome(row.task_id, "SUCCESS", result=text, completed_at=time.time())

    def _retry_or_fail(self, row: ClaimedTask, spec: TaskSpec, error: str, after: float | None) -> Outcome:
        max_retries = _max_retries(row, spec)
        if row.retry_count >= max_retries:
            return _failed(row, f"gave up after {row.attempts} attempt(s): {error}")
        delay = spec.retry.delay(row.retry_count + 1) if after is None else max(0.0, after)
        metrics.RETRIES.labels(row.task_name).inc()
        log.info("task %s (%s) attempt %d failed: %s; retrying in %.1fs", row.task_id, row.task_name,
                 row.attempts, error[:300], delay, extra={"task_id": row.task_id, "task": row.task_name,
                                                          "queue": row.queue, "attempt": row.attempts})
        return Outcome(row.task_id, "PENDING", error=error[:MAX_ERROR], not_before=time.time() + delay,
                       retry_inc=1)

    # ------------------------------------------------------------ outcomes

    def _record(self, outcome: Outcome, urgent: bool) -> None:
        self._outcomes.append(outcome)
        self._urgent = self._urgent or urgent
        self._outcome_ready.set()

    async def _finish_loop(self) -> None:
        while True:
            if not self._outcomes:
                if self._stopping and not self._running:
                    return
                self._outcome_ready.clear()
                await self._outcome_ready.wait()
                continue
            batch, self._outcomes = self._outcomes, []
            urgent, self._urgent = self._urgent, False
            try:
                await asyncio.shield(self.journal.finish(batch))
            except Exception as exc:
                self._finish_failures.failed(exc)
                self._outcomes[:0] = batch
                await asyncio.sleep(1)
                continue
            self._finish_failures.worked()
            self.on_finished(batch, urgent)
            if any(o.status == "PENDING" for o in batch):
                self._backlog = True
                self._wake.set()


# per task name, looked up once: these ran for every task in a profile
@lru_cache(maxsize=1024)
def _task_logger(task_name: str) -> logging.Logger:
    return logging.getLogger(f"ecoworker.task.{task_name}")


@lru_cache(maxsize=1024)
def _seconds(task_name: str) -> Any:
    return metrics.TASK_SECONDS.labels(task_name)


@lru_cache(maxsize=4096)
def _finished(task_name: str, label: str) -> Any:
    return metrics.TASKS_FINISHED.labels(task_name, label)


def _label(outcome: Outcome) -> str:
    """The metric label: terminal statuses as they are; a PENDING outcome is a retry or a hand-back."""
    if outcome.status != "PENDING":
        return outcome.status
    return "RETRY" if outcome.retry_inc else "RELEASED"


def _max_retries(row: ClaimedTask, spec: TaskSpec) -> int:
    return spec.retry.max_retries if row.max_retries is None else row.max_retries


def _failed(row: ClaimedTask, error: str) -> Outcome:
    return Outcome(row.task_id, "FAILURE", error=error[:MAX_ERROR], completed_at=time.time(),
                   dl_state=DL_OWED)
