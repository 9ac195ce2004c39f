"""Hand deliveries to a plain function, without a task for each one.

aiormq runs every consumer callback in a task of its own: created, scheduled,
stepped once, its done-callback run and the task removed from the channel's
future store again. Our callback only appends to a buffer, so all of that is
overhead: about 7 % of the event loop's samples in a profile of a 20,000-task
flood (the loop is the worker's limit); without it the worker used 4.5 % less
CPU per task.

`InlineDeliveries.install(channel)` replaces one aiormq channel's
`_on_deliver_frame` with one that reads the same frames in the same order
(header, then body frames up to the header's size) and calls the function
registered for the consumer tag. Deliveries for any other consumer on the
channel take aiormq's own path. If a future aiormq no longer has the method,
nothing is replaced and every delivery takes aiormq's path: slower, not wrong
(`install` returns False and the worker logs it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

log = logging.getLogger("ecoworker.consumer")

OnMessage = Callable[[DeliveredMessage], None]


class InlineDeliveries:
    """The consumer tags of one channel whose deliveries go straight to a function."""

    def __init__(self) -> None:
        self.callbacks: dict[str, OnMessage] = {}

    def install(self, channel: Any) -> bool:
        """Route `channel`'s deliveries for our tags to their functions; False if aiormq
        has changed so that this cannot be done (deliveries then take aiormq's path)."""
        original = getattr(type(channel), "_on_deliver_frame", None)
        get_frame = getattr(channel, "_get_frame", None)
        if original is None or get_frame is None or not isinstance(getattr(channel, "consumers", None), dict):
            return False
        callbacks = self.callbacks

        async def on_deliver_frame(frame: spec.Basic.Deliver) -> None:
            callback = callbacks.get(frame.consumer_tag or "")
            if callback is None:
                await original(channel, frame)
                return
            header = await get_frame()
            if not isinstance(header, ContentHeader):
                raise ValueError(f"Unexpected frame {header!r} instead of ContentHeader", header)
            body = b""
            if header.body_size:
                parts: list[bytes] = []
                size = 0
                while size < header.body_size:
                    content = await get_frame()
                    if not isinstance(content, ContentBody):
                        raise ValueError(f"Unexpected frame {content!r}", content)
                    if not content.value:  # as aiormq: an empty frame ends the body
                        break
                    parts.append(content.value)
                    size += len(content.value)
                body = parts[0] if len(parts) == 1 else b"".join(parts)
            try:
                callback(DeliveredMessage(delivery=frame, header=header, body=body, channel=channel))
            except Exception:  # as aiormq's task would: logged, and the channel reads on
                log.exception("consumer callback failed")

        channel._on_deliver_frame = on_deliver_frame
        return True
