"""Exceptions that cross module boundaries, each saying what to do next.

Handlers raise `Retry` or `PermanentError` to steer the scheduler; anything else
is classified by the task's retry policy (see `registry.RetryPolicy`).
"""

from __future__ import annotations


class EcoworkerError(Exception):
    """Base class of every error ecoworker raises on purpose."""


class ConfigError(EcoworkerError):
    """The configuration is wrong; the message names the setting to fix."""


class JournalError(EcoworkerError):
    """The journal file cannot be used; the message names the file and the fix."""


class DecodeError(EcoworkerError):
    """A delivery is not a task ecoworker can run: it is dead-lettered once.

    `reason` is a short, stable label used in metrics and the
    `x-ecoworker-error` header; the message text explains it to a human.
    """

    def __init__(self, reason: str, message: str, task_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.task_id = task_id


class Retry(EcoworkerError):
    """Raised by a handler: run this task again later.

    `after` is the delay in seconds (None: the task's back-off policy decides).
    The attempt still counts toward the task's maximum retries.
    """

    def __init__(self, message: str = "retry requested", *, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


class PermanentError(EcoworkerError):
    """Raised by a handler: retrying cannot help; the task fails now and is dead-lettered."""
