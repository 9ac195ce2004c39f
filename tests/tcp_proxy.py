"""A small TCP proxy for fault injection, run in a thread with its own event loop.

A worker subprocess connects to the proxy instead of the server (point its URL at
`proxy.port`); the test then changes what the "network" does, at any moment:

- `pass_()`    forward everything (the default), re-listening if `refuse()` stopped it;
- `delay(s)`   forward every chunk `s` seconds late (added latency, order kept);
- `cut()`      reset every current connection now (both sides see it at once);
- `blackhole()` keep connections open but drop every byte. A connection that lost a byte
               stays silent for good, even after `pass_()`, as after a firewall or NAT
               forgot the flow: only the peers' own timeouts (heartbeats) can notice.
               Connections accepted meanwhile are silent in the same way;
- `refuse()`   stop listening: new connections are refused, current ones carry on.

    with TcpProxy("127.0.0.1", 5672) as proxy:
        url = proxy.url("amqp://guest:guest@127.0.0.1:5672/")
        ...
        proxy.cut()
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

CHUNK = 64 * 1024


@dataclass(eq=False)
class _Flow:
    """One proxied connection: the client side, the server side, and whether it went silent."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    silent: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.server):
            if writer is not None:
                writer.transport.abort()


class TcpProxy:
    """Listens on `host`:ephemeral and forwards to `target_host`:`target_port`."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.mode = "pass"
        self.latency = 0.0
        self.accepted = 0  # connections accepted so far
        self.cuts = 0  # connections reset by cut()
        self._flows: set[_Flow] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)

    # ------------------------------------------------------------ lifecycle (any thread)

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's (user, password, path kept)."""
        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@{self.host}:{self.port}" if auth else f"{self.host}:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @property
    def active(self) -> int:
        """Connections open right now."""
        return len(self._flows)

    # ------------------------------------------------------------ faults (any thread)

    def pass_(self) -> None:
        """Forward everything again, listening again if `refuse()` stopped it."""
        self.mode, self.latency = "pass", 0.0
        if self._server is None:
            self._call(self._listen())

    def delay(self, seconds: float) -> None:
        """Deliver every chunk `seconds` late, in both directions."""
        self.mode, self.latency = "delay", seconds

    def blackhole(self) -> None:
        """Drop every byte from now on without closing anything."""
        self.mode = "blackhole"

    def refuse(self) -> None:
        """Stop listening: connecting is refused until `pass_()`."""
        self._call(self._unlisten())

    def cut(self) -> int:
        """Reset every current connection; returns how many there were."""
        return self._call(self._cut())

    # ------------------------------------------------------------ the proxy's own loop

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # stops accepting; current connections are untouched

    async def _cut(self) -> int:
        flows = list(self._flows)
        for flow in flows:
            flow.abort()
        self.cuts += len(flows)
        return len(flows)

    async def _shutdown(self) -> None:
        await self._unlisten()
        await self._cut()
        tasks = [t for flow in self._flows for t in flow.tasks]
        if tasks:  # reset connections end their tasks by themselves; cancel only stragglers
            _, late = await asyncio.wait(tasks, timeout=2)
            for task in late:
                task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        flow = _Flow(writer)
        task = asyncio.current_task()
        if task is not None:
            flow.tasks.append(task)
        self._flows.add(flow)
        try:
            if self.mode == "blackhole":
                flow.silent = True
                await self._swallow(reader)
                return
            try:
                up_reader, flow.server = await asyncio.open_connection(*self.target)
            except OSError:
                return  # the server is not there: the client sees its connection close
            await asyncio.gather(self._pump(reader, flow.server, flow), self._pump(up_reader, writer, flow))
        except (ConnectionError, OSError):
            pass
        finally:
            self._flows.discard(flow)
            flow.abort()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(CHUNK):
            pass

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: _Flow) -> None:
        """Copy one direction through a latency queue until EOF or a reset."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def send() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not flow.silent and self.mode != "blackhole":
                    writer.write(data)
                    await writer.drain()
                else:
                    flow.silent = True

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(CHUNK):
                if flow.silent or self.mode == "blackhole":
                    flow.silent = True  # a lost byte breaks the stream for good
                    continue
                queue.put_nowait((loop.time() + self.latency, data))
            if flow.silent:
                return
            queue.put_nowait(None)  # EOF: deliver what is queued, then close
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender
            if not flow.silent:
                flow.abort()  # one side closed: close the other (AMQP and PostgreSQL never half-close)
