"""Task specifications: which handler runs a task name, on which queue, how it retries.

The registry is built once at start-up (by the CLI, from `handlers/` and the
built-in diagnostic tasks) and handed to the worker. The core never imports
`handlers/`; handlers import this module to describe themselves.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ecoworker.errors import ConfigError, DecodeError

Handler = Callable[..., Awaitable[Any]]

#: Exceptions that mean "the world hiccuped, try again" unless a task says otherwise.
DEFAULT_TRANSIENT: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a task is retried: which errors are transient, how many times, how long to wait."""

    max_retries: int = 3
    retry_on: tuple[type[BaseException], ...] = DEFAULT_TRANSIENT
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    jitter: float = 0.25

    def delay(self, retry_number: int) -> float:
        """Seconds to wait before retry `retry_number` (1-based): exponential, capped, jittered."""
        raw = min(self.backoff_max, self.backoff_base * 2 ** max(0, retry_number - 1))
        return float(max(0.0, raw * (1 + random.uniform(-self.jitter, self.jitter))))

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, self.retry_on)


SHAPES_KEPT = 64


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """Everything the worker needs to know to run one task name."""

    name: str
    handler: Handler
    queue: str | None = None  # None: accepted on every queue the worker consumes
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float = 300.0
    concurrency: int | None = None  # per-task limit; None: only the global limit applies
    urgent: bool = False  # ship its result to PostgreSQL at once, not with the next batch
    signature: inspect.Signature = field(init=False, repr=False, compare=False)
    # (number of args, kwargs names) → why they do not fit (None: they do); see check_arguments
    _shapes: dict[tuple[int, tuple[str, ...]], str | None] = field(
        init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "signature", inspect.signature(self.handler))

    def check_arguments(self, task_id: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Raise DecodeError when `args`/`kwargs` cannot be passed to the handler.

        Whether they fit depends only on how many args there are and which names the kwargs
        have, never on values, so the answer is kept per shape: `Signature.bind` for every
        delivery was 3 % of the ingest thread in a profile. At most SHAPES_KEPT shapes are kept
        per task, so odd producers cannot grow the cache without bound."""
        shape = (len(args), tuple(kwargs))
        try:
            problem = self._shapes[shape]
        except KeyError:
            problem = None
            try:
                self.signature.bind(None, *args, **kwargs)
            except TypeError as exc:
                problem = str(exc)
            if len(self._shapes) < SHAPES_KEPT:
                self._shapes[shape] = problem
        if problem is not None:
            raise DecodeError(
                "bad_arguments",
                f"task {task_id}: arguments do not fit {self.name}{self.signature}: {problem}",
                task_id,
            )


@dataclass(slots=True)
class TaskContext:
    """What a running handler receives as its first argument.

    `resources` holds the shared clients created once at start-up (S3, OpenAI,
    process pool); handlers read them through `handlers.base` helpers.
    """

    task_id: str
    task_name: str
    queue: str
    attempt: int
    max_attempts: int
    deadline: float  # loop.time() at which the handler is cancelled
    logger: logging.LoggerAdapter[logging.Logger]
    resources: Any = None


class Registry:
    """A name → TaskSpec map with a decorator for registering handlers."""

    def __init__(self, specs: Iterable[TaskSpec] = ()) -> None:
        self._specs: dict[str, TaskSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: TaskSpec) -> TaskSpec:
        if spec.name in self._specs:
            raise ConfigError(f"task {spec.name!r} is registered twice; give one of them another name")
        self._specs[spec.name] = spec
        return spec

    def task(self, name: str, **options: Any) -> Callable[[Handler], Handler]:
        """Decorator: `@registry.task("upload_to_s3", queue="storage", timeout=120)`."""

        def register(handler: Handler) -> Handler:
            self.add(TaskSpec(name=name, handler=handler, **options))
            return handler

        return register

    def merge(self, other: Registry) -> Registry:
        merged = Registry(self)
        for spec in other:
            merged.add(spec)
        return merged

    def for_queues(self, queues: Iterable[str]) -> Registry:
        """The tasks this worker accepts when it consumes `queues`."""
        wanted = set(queues)
        return Registry(s for s in self if s.queue is None or s.queue in wanted)

    def get(self, name: str) -> TaskSpec | None:
        return self._specs.get(name)

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(list(self._specs.values()))

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs
