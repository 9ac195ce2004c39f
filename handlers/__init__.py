"""Task handlers, one module per domain; the CLI registers them with `build_registry()`.

Wiring (in the CLI, the only place that reads the environment)::

    from handlers import build_registry
    from handlers.base import HandlerSettings, open_resources

    settings = HandlerSettings.from_env(os.environ)
    async with open_resources(settings, queues) as resources:
        ...  # Worker(..., registry=build_registry().for_queues(queues), resources=resources)

This module imports nothing heavy at import time: the process-pool children
import `handlers.images` (Pillow only), not the S3 and OpenAI clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ecoworker.registry import Registry

__all__ = ["build_registry"]


def build_registry() -> Registry:
    """Every handler: `upload_to_s3`, `process_image` (queue "storage") and
    `classify_waste_image`, `chat_with_llm`, `extract_text_from_image` (queue "ai")."""
    from handlers import ai, storage

    return storage.registry.merge(ai.registry)
