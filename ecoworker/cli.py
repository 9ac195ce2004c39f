"""Command line: argv and environment → Settings; logging; uvloop; wiring; subcommands.

This is the only module that reads `os.environ` or argv, and the only one in
`ecoworker/` that knows `handlers/` exists.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ecoworker import logs
from ecoworker.errors import EcoworkerError
from ecoworker.settings import Settings, environ

log = logging.getLogger("ecoworker")
SUBCOMMANDS = ("run", "wal", "db", "publish", "dlq")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]  # `ecoworker --queue storage` means `ecoworker run --queue storage`
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except EcoworkerError as exc:
        print(f"ecoworker: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def run_async(coro_fn: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run on uvloop when it is installed, plain asyncio otherwise."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro_fn())


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecoworker", description="Durable task worker: RabbitMQ → "
                                "SQLite WAL journal → handlers → PostgreSQL.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the worker daemon (the default command)")
    run.add_argument("--queue", action="append", dest="queues", help="queue to consume (repeatable)")
    run.add_argument("--concurrency", type=int, help="handlers running at once (default 100)")
    run.add_argument("--prefetch", type=int, help="unacked deliveries the broker may send (default 1000)")
    run.add_argument("--worker-name", help="name recorded with each task (default: hostname)")
    run.add_argument("--wal", dest="wal_path", help="journal file (env WAL_DB_PATH)")
    run.add_argument("--metrics-port", type=int, help="HTTP port for /metrics and probes (-1: off)")
    run.add_argument("--grace-period", type=float, help="seconds running tasks get at shutdown (50)")
    run.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    run.add_argument("--log-format", choices=("json", "text", "auto"))
    run.add_argument("--migrate", action="store_true", help="migrate the PostgreSQL schema at start")
    run.set_defaults(func=cmd_run)

    from ecoworker import ops  # subcommands that operate on files and queues

    ops.add_commands(sub)
    return p


# ---------------------------------------------------------------- run

def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {k: getattr(args, k, None) for k in (
        "queues", "concurrency", "prefetch", "worker_name", "wal_path", "metrics_port",
        "grace_period", "log_level", "log_format")}
    if getattr(args, "migrate", False):
        overrides["sink"] = {"auto_migrate": True}
    return Settings.from_env(environ(), **overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from handlers.base import HandlerSettings

    settings = settings_from(args)
    handler_settings = HandlerSettings.from_env(environ())
    handler_settings.check_for_queues(settings.queues)
    secrets = [v for k, v in environ().items() if any(w in k for w in ("PASSWORD", "SECRET", "KEY", "TOKEN"))]
    if handler_settings.openai_api_key is not None:
        secrets.append(handler_settings.openai_api_key.get())
    logs.setup(settings.log_level, settings.log_format, secrets)
    return run_async(lambda: serve(settings, handler_settings))


async def serve(settings: Settings, handler_settings: Any) -> int:
    from ecoworker.builtins import registry as builtin_registry
    from ecoworker.builtins import test_registry
    from ecoworker.worker import Worker
    from handlers import build_registry
    from handlers.base import open_resources

    registry = builtin_registry.merge(build_registry(settings.queues))  # imports only what is served
    if environ().get("ECOWORKER_TEST_TASKS") == "1":
        registry = registry.merge(test_registry)
    worker = Worker(settings, registry, lambda: open_resources(handler_settings, settings.queues))
    _install_signals(worker.request_stop)
    return await worker.serve()


def _install_signals(request_stop: Callable[[], None]) -> None:
    """First SIGTERM/SIGINT: graceful stop. Second: exit at once (the journal has everything)."""
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            log.info("received %s: shutting down gracefully (send again to exit at once)",
                     signal.Signals(signum).name)
            request_stop()
        else:
            log.warning("second signal: exiting now; unfinished tasks stay in the journal")
            logging.shutdown()
            os._exit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


if __name__ == "__main__":  # pragma: no cover
    main()
