"""Diagnostic tasks registered on every queue: used by tests, benchmarks and the demo."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from ecoworker.registry import Registry, RetryPolicy, TaskContext

registry = Registry()


@registry.task("ecoworker.noop", timeout=10)
async def noop(ctx: TaskContext, **kwargs: Any) -> dict[str, Any]:
    """Return the keyword arguments unchanged."""
    return kwargs


@registry.task("ecoworker.urgent", timeout=10, urgent=True)
async def urgent(ctx: TaskContext, **kwargs: Any) -> dict[str, Any]:
    """Like noop, but its result is shipped to PostgreSQL at once (the seed's real-time tier)."""
    return kwargs


@registry.task("ecoworker.sleep", timeout=3600)
async def sleep(ctx: TaskContext, seconds: float = 1.0) -> dict[str, float]:
    """Sleep without blocking the loop."""
    await asyncio.sleep(float(seconds))
    return {"slept": float(seconds)}


@registry.task("ecoworker.flaky", timeout=60, retry=RetryPolicy(backoff_base=0.5, backoff_max=5.0))
async def flaky(ctx: TaskContext, fail_times: int = 1, key: str | None = None) -> dict[str, Any]:
    """Fail transiently on the first `fail_times` attempts, then succeed.

    Counting by attempt (from the journal) rather than in memory keeps the
    behaviour the same across worker restarts.
    """
    if ctx.attempt <= int(fail_times):
        raise ConnectionError(f"flaky: failing attempt {ctx.attempt} of {fail_times} on purpose")
    return {"attempt": ctx.attempt, "key": key}


test_registry = Registry()


@test_registry.task("ecoworker.crash", timeout=60)
async def crash(ctx: TaskContext) -> None:
    """Kill the worker process outright (test-only: proves crash loops end)."""
    os.kill(os.getpid(), signal.SIGKILL)


@test_registry.task("ecoworker.sleep_limited", timeout=60, concurrency=2)
async def sleep_limited(ctx: TaskContext, seconds: float = 0.05) -> dict[str, float]:
    """Like sleep, but at most two run at once in a worker (test-only: proves per-task limits)."""
    await asyncio.sleep(float(seconds))
    return {"slept": float(seconds)}
