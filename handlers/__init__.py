"""Task handlers, one module per domain; the CLI registers them with `build_registry()`.

Wiring (in the CLI, the only place that reads the environment)::

    from handlers import build_registry
    from handlers.base import HandlerSettings, open_resources

    settings = HandlerSettings.from_env(os.environ)
    async with open_resources(settings, queues) as resources:
        ...  # Worker(..., registry=build_registry(queues), resources=resources)

Modules: `base` (settings, resources, pool), `s3` and `llm` (the clients and
their errors), `paths` (files under the upload root), `images` (Pillow, run in
the pool), and the handlers: `storage` (queue "storage") and `ai` (queue "ai").

Importing is the expensive part of starting a worker (`openai` alone takes
seconds), so nothing heavy is imported until it is needed: `build_registry()`
imports only the handler modules of the served queues, `open_resources()`
only the clients they use, and the pool children only `handlers.images`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ecoworker.registry import Registry

__all__ = ["build_registry"]


def build_registry(queues: Iterable[str] | None = None) -> Registry:
    """The handlers of the served `queues` (None: all of them): `upload_to_s3`, `process_image`
    (queue "storage") and `classify_waste_image`, `chat_with_llm`, `extract_text_from_image`
    (queue "ai"). Modules of queues not served are not imported."""
    from ecoworker.registry import Registry

    served = None if queues is None else frozenset(queues)
    registry = Registry()
    if served is None or "storage" in served:
        from handlers import storage

        registry = registry.merge(storage.registry)
    if served is None or "ai" in served:
        from handlers import ai  # imports openai

        registry = registry.merge(ai.registry)
    return registry
