"""Task specifications: retry policies, argument checks and the registry."""

from __future__ import annotations

from typing import Any

import pytest

from ecoworker import builtins
from ecoworker.errors import ConfigError, DecodeError, PermanentError, Retry
from ecoworker.registry import DEFAULT_TRANSIENT, Registry, RetryPolicy, TaskContext, TaskSpec


async def handler(ctx: TaskContext, path: str, size: int = 64, *, mode: str = "fit") -> None:
    """A handler with a required, a defaulted and a keyword-only argument."""


async def variadic(ctx: TaskContext, *args: Any, **kwargs: Any) -> None:
    """A handler that takes anything."""


def spec(name: str, queue: str | None = None, fn: Any = handler, **options: Any) -> TaskSpec:
    return TaskSpec(name=name, handler=fn, queue=queue, **options)


class TestRetryPolicyDelay:
    """RetryPolicy.delay: exponential back-off, capped, jittered."""

    def test_exponential_without_jitter(self) -> None:
        """With no jitter the delays double from the base: 1, 2, 4, 8, ..."""
        policy = RetryPolicy(backoff_base=1.0, backoff_max=1000.0, jitter=0.0)
        assert [policy.delay(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]

    def test_base_scales(self) -> None:
        """The base multiplies every delay."""
        policy = RetryPolicy(backoff_base=0.5, backoff_max=1000.0, jitter=0.0)
        assert [policy.delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]

    def test_capped(self) -> None:
        """Delays never exceed backoff_max, however many retries."""
        policy = RetryPolicy(backoff_base=1.0, backoff_max=30.0, jitter=0.0)
        assert policy.delay(5) == 16.0
        assert policy.delay(6) == 30.0
        assert policy.delay(1000) == 30.0

    def test_first_retry_and_below(self) -> None:
        """Retry numbers below 1 are treated as the first retry."""
        policy = RetryPolicy(backoff_base=2.0, jitter=0.0)
        assert policy.delay(0) == policy.delay(-3) == policy.delay(1) == 2.0

    def test_jitter_bounds(self) -> None:
        """Jittered delays stay within ±jitter of the un-jittered delay and actually vary."""
        policy = RetryPolicy(backoff_base=1.0, backoff_max=300.0, jitter=0.25)
        for n in range(1, 12):
            raw = min(300.0, 2.0 ** (n - 1))
            delays = [policy.delay(n) for _ in range(200)]
            assert all(raw * 0.75 <= d <= raw * 1.25 for d in delays), (n, min(delays), max(delays))
            assert len(set(delays)) > 1

    def test_jitter_at_cap(self) -> None:
        """At the cap, jitter still applies around backoff_max (up to +jitter above it)."""
        policy = RetryPolicy(backoff_base=1.0, backoff_max=10.0, jitter=0.1)
        assert all(9.0 <= policy.delay(50) <= 11.0 for _ in range(200))

    def test_never_negative(self) -> None:
        """Even a jitter above 1 never gives a negative delay."""
        policy = RetryPolicy(backoff_base=1.0, jitter=3.0)
        assert all(policy.delay(1) >= 0.0 for _ in range(500))

    def test_defaults(self) -> None:
        """The default policy: 3 retries, 1 s base, 300 s cap, 25 % jitter, connection and timeout errors."""
        policy = RetryPolicy()
        assert (policy.max_retries, policy.backoff_base, policy.backoff_max, policy.jitter) == (3, 1.0, 300.0, 0.25)
        assert policy.retry_on == DEFAULT_TRANSIENT == (ConnectionError, TimeoutError)


class TestRetryPolicyIsTransient:
    """RetryPolicy.is_transient: which exceptions are worth another attempt."""

    @pytest.mark.parametrize("exc", [ConnectionError("x"), ConnectionResetError("x"), ConnectionRefusedError(),
                                     BrokenPipeError(), TimeoutError()])
    def test_default_transient(self, exc: BaseException) -> None:
        """Connection errors (and their subclasses) and timeouts are transient by default."""
        assert RetryPolicy().is_transient(exc)

    @pytest.mark.parametrize("exc", [ValueError("x"), KeyError("k"), RuntimeError(), PermanentError("no"),
                                     OSError("disk"), Retry()])
    def test_default_not_transient(self, exc: BaseException) -> None:
        """Programming errors, permanent errors and plain OSErrors are not transient by default."""
        assert not RetryPolicy().is_transient(exc)

    def test_custom(self) -> None:
        """A task may choose its own transient exceptions."""
        policy = RetryPolicy(retry_on=(ValueError,))
        assert policy.is_transient(ValueError())
        assert policy.is_transient(UnicodeDecodeError("utf-8", b"", 0, 1, "x"))  # a ValueError subclass
        assert not policy.is_transient(ConnectionError())

    def test_nothing_transient(self) -> None:
        """An empty retry_on makes every error final."""
        assert not RetryPolicy(retry_on=()).is_transient(ConnectionError())


class TestCheckArguments:
    """TaskSpec.check_arguments: the arguments must fit the handler's signature (after the context)."""

    @pytest.mark.parametrize(("args", "kwargs"), [
        (["a.png"], {}), ([], {"path": "a.png"}), (["a.png", 32], {}), (["a.png"], {"size": 32, "mode": "crop"}),
        ([], {"path": "a.png", "mode": "crop"}),
    ])
    def test_fitting(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Positional, keyword, defaulted and keyword-only arguments that fit are accepted."""
        spec("resize").check_arguments("t1", args, kwargs)

    @pytest.mark.parametrize(("args", "kwargs"), [
        ([], {}),  # missing path
        (["a.png", 32, "crop"], {}),  # mode is keyword-only
        (["a.png"], {"nope": 1}),  # unknown keyword
        (["a.png"], {"path": "b.png"}),  # path twice
        (["a.png"], {"ctx": None}),  # the context is not the caller's to pass
        (["a", 1, 2, 3], {}),  # too many
    ])
    def test_not_fitting(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Arguments that do not fit raise DecodeError('bad_arguments') naming task id and task."""
        with pytest.raises(DecodeError) as info:
            spec("resize").check_arguments("t1", args, kwargs)
        assert info.value.reason == "bad_arguments"
        assert info.value.task_id == "t1"
        assert "t1" in str(info.value) and "resize" in str(info.value)

    def test_answers_stay_right_for_repeated_shapes(self) -> None:
        """One spec, many deliveries: each shape (arg count, kwarg names) gets the same answer every
        time whatever came before, a repeated misfit names its own task id, and shapes past the
        kept ones are still checked."""
        from ecoworker.registry import SHAPES_KEPT

        resize = spec("resize")
        for i in range(3):
            resize.check_arguments(f"ok{i}", [f"{i}.png"], {"size": i})
            with pytest.raises(DecodeError) as info:
                resize.check_arguments(f"bad{i}", [f"{i}.png"], {"nope": i})
            assert f"bad{i}" in str(info.value) and "nope" in str(info.value)
        for i in range(SHAPES_KEPT + 5):  # a flood of odd keyword names
            with pytest.raises(DecodeError):
                resize.check_arguments("odd", ["a.png"], {f"k{i}": 1})
        resize.check_arguments("late", [], {"path": "b.png", "mode": "crop"})  # a new shape, still fits
        with pytest.raises(DecodeError):
            resize.check_arguments("late-bad", [], {"mode": "crop"})  # a new shape, still refused

    def test_variadic_accepts_anything(self) -> None:
        """A handler with *args and **kwargs accepts any arguments."""
        spec("any", fn=variadic).check_arguments("t", [1, 2, 3], {"a": 1, "b": 2})

    def test_builtin_noop(self) -> None:
        """ecoworker.noop takes keywords only: positional arguments are bad_arguments."""
        noop = builtins.registry.get("ecoworker.noop")
        assert noop is not None
        noop.check_arguments("t", [], {"any": 1, "thing": [2]})
        with pytest.raises(DecodeError, match="do not fit") as info:
            noop.check_arguments("t", [1, 2], {})
        assert info.value.reason == "bad_arguments"

    def test_builtin_sleep(self) -> None:
        """ecoworker.sleep takes one optional `seconds`: an unknown keyword is bad_arguments."""
        sleep = builtins.registry.get("ecoworker.sleep")
        assert sleep is not None
        sleep.check_arguments("t", [], {})
        sleep.check_arguments("t", [0.1], {})
        sleep.check_arguments("t", [], {"seconds": 2})
        with pytest.raises(DecodeError) as info:
            sleep.check_arguments("t", [], {"nope": 1})
        assert info.value.reason == "bad_arguments"

    def test_signature_not_in_repr_or_equality(self) -> None:
        """The cached signature does not clutter repr() or affect equality."""
        assert "signature" not in repr(spec("a"))
        assert spec("a") == spec("a")


class TestRegistry:
    """Registry: a name → TaskSpec map built once at start-up."""

    def test_add_and_get(self) -> None:
        """Added specs are found by name; unknown names give None."""
        registry = Registry([spec("a"), spec("b", "images")])
        found = registry.get("a")
        assert found is not None and found.name == "a"
        assert registry.get("nope") is None
        assert "b" in registry and "nope" not in registry
        assert len(registry) == 2
        assert [s.name for s in registry] == ["a", "b"]

    def test_duplicate_rejected(self) -> None:
        """Registering a name twice is a ConfigError that names the task."""
        registry = Registry([spec("a")])
        with pytest.raises(ConfigError, match="'a' is registered twice"):
            registry.add(spec("a", "other"))
        with pytest.raises(ConfigError):
            Registry([spec("x"), spec("x")])

    def test_decorator(self) -> None:
        """@registry.task registers the handler with its options and returns it unchanged."""
        registry = Registry()

        @registry.task("upload", queue="storage", timeout=120, urgent=True)
        async def upload(ctx: TaskContext, key: str) -> None:
            """Upload."""

        task = registry.get("upload")
        assert task is not None
        assert (task.handler, task.queue, task.timeout, task.urgent) == (upload, "storage", 120, True)
        with pytest.raises(ConfigError):
            registry.task("upload")(upload)

    def test_for_queues(self) -> None:
        """for_queues keeps queue-less specs and those of the named queues, nothing else."""
        registry = Registry([spec("anywhere"), spec("store", "storage"), spec("think", "ai"), spec("img", "images")])
        assert [s.name for s in registry.for_queues(["storage"])] == ["anywhere", "store"]
        assert [s.name for s in registry.for_queues(["storage", "ai"])] == ["anywhere", "store", "think"]
        assert [s.name for s in registry.for_queues([])] == ["anywhere"]
        assert len(registry) == 4  # the original is untouched

    def test_merge(self) -> None:
        """merge returns a new registry with both sets of specs, leaving both inputs unchanged."""
        left, right = Registry([spec("a")]), Registry([spec("b", "q")])
        merged = left.merge(right)
        assert sorted(s.name for s in merged) == ["a", "b"]
        assert (len(left), len(right)) == (1, 1)

    def test_merge_conflict(self) -> None:
        """Merging registries that share a name is a ConfigError."""
        with pytest.raises(ConfigError, match="'a'"):
            Registry([spec("a")]).merge(Registry([spec("a", "q")]))

    def test_iteration_is_a_snapshot(self) -> None:
        """Adding while iterating does not break the iteration."""
        registry = Registry([spec("a")])
        for _ in registry:
            registry.add(spec("b"))
        assert len(registry) == 2

    def test_builtins(self) -> None:
        """The built-in diagnostic tasks are registered on every queue; the crash task is test-only."""
        names = {s.name for s in builtins.registry}
        assert {"ecoworker.noop", "ecoworker.sleep", "ecoworker.flaky"} <= names
        assert all(s.queue is None for s in builtins.registry)
        assert "ecoworker.crash" not in builtins.registry
        assert "ecoworker.crash" in builtins.test_registry
