"""One supervised RabbitMQ connection, shared by the consumer and the dead-letter publisher.

We do not lean on aio-pika's robust connection (it has known cases of coming
back with zero consumers): this supervisor reconnects with back-off and each
user rebuilds its own channels and consumers on every new connection.
"""

from __future__ import annotations

import asyncio
import logging
import random
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractConnection

from ecoworker import metrics
from ecoworker.errors import ConfigError
from ecoworker.settings import redact_url

log = logging.getLogger("ecoworker.broker")


class BrokerUnavailable(ConfigError):
    """RabbitMQ could not be reached at start-up; check RABBITMQ_URL and the broker."""


def with_heartbeat(url: str, seconds: int = 10) -> str:
    """A silently dead connection (a firewall forgot it) is noticed after about 3 heartbeats;
    the client default of 60 s would leave a worker idle for minutes. A URL's own setting wins."""
    parts = urlsplit(url)
    if "heartbeat" in dict(parse_qsl(parts.query)):
        return url
    query = "&".join(q for q in (parts.query, f"heartbeat={seconds}") if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


class Broker:
    """Keeps one connection open; `await current()` waits for a live one."""

    def __init__(self, url: str, connect_timeout: float = 30.0, backoff_max: float = 10.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.backoff_max = backoff_max
        self._conn: AbstractConnection | None = None
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = False
        self.generation = 0  # bumped on every new connection

    @property
    def connected(self) -> bool:
        # aio-pika does not always flag a connection the server dropped as closed: trust our own event
        return self._up.is_set() and self._conn is not None and not self._conn.is_closed

    async def connect_first(self) -> None:
        """Connect at start-up, retrying for `connect_timeout` seconds, else a clear error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        delay = 0.2
        while True:
            try:
                await self._open()
                return
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
                if loop.time() + delay > deadline:
                    raise BrokerUnavailable(
                        f"cannot connect to RabbitMQ at {redact_url(self.url)} after "
                        f"{self.connect_timeout:.0f}s ({type(exc).__name__}: {exc}); "
                        "check RABBITMQ_URL and that the broker is up"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def run(self) -> None:
        """Reconnect whenever the connection drops, until `close()`."""
        failures = 0
        while not self._stopping:
            await self._lost.wait()
            if self._stopping:
                break
            try:
                await self._open()
                log.info("broker connection restored after %d attempt(s)", failures + 1)
                failures = 0
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("broker still unreachable (%d attempts): %s", failures, exc)
                await asyncio.sleep(min(self.backoff_max, 0.2 * 2 ** min(failures, 8)) * random.uniform(0.8, 1.2))

    async def current(self) -> AbstractConnection:
        """The live connection; waits through reconnects, raises ConnectionError once closed."""
        while True:
            if self._stopping:
                raise ConnectionError("broker connection closed by shutdown")
            await self._up.wait()
            conn = self._conn
            if conn is not None and not conn.is_closed:
                return conn
            await asyncio.sleep(0.05)

    async def wait_lost(self, generation: int) -> None:
        """Return once the connection of `generation` is gone."""
        while self.generation == generation and not self._lost.is_set():
            await self._lost.wait()

    async def close(self) -> None:
        self._stopping = True
        self._lost.set()  # wake run()
        conn, self._conn = self._conn, None
        self._up.set()  # wake current() waiters so they see the shutdown
        metrics.BROKER_UP.set(0)
        if conn is not None and not conn.is_closed:
            try:
                await asyncio.wait_for(conn.close(), 5)
            except (TimeoutError, Exception) as exc:
                log.debug("closing the broker connection: %s", exc)

    async def _open(self) -> None:
        conn = await aio_pika.connect(with_heartbeat(self.url), timeout=10)
        conn.close_callbacks.add(self._on_close)
        self._conn = conn
        self.generation += 1
        self._lost.clear()
        self._up.set()
        metrics.BROKER_UP.set(1)

    def _on_close(self, sender: object, exc: BaseException | None = None) -> None:
        if sender is not self._conn:
            return
        self._up.clear()
        metrics.BROKER_UP.set(0)
        if not self._stopping:
            log.warning("broker connection lost: %s; reconnecting", exc or "closed")
        self._lost.set()
