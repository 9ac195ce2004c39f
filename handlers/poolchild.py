"""Start-up of each process-pool child: end it when the worker that owns the pool ends.

A pool child waits on its call queue, whose pipe it holds both ends of, so it
never notices its worker was killed (`kill -9`, the OOM killer). It would live
on, and it keeps the forkserver alive too (the forkserver exits when the last
holder of the worker's "alive" pipe does). In a pod the container's end reaps
them; anywhere else (a dev shell, a supervisor that only kills the main pid)
they would pile up. A pidfd on the worker becomes readable when it exits.
"""

from __future__ import annotations

import os
import select
import threading


def exit_with(pid: int) -> None:
    """Pool initializer: exit at once when process `pid` (the worker) ends."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # already gone
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd here (not Linux ≥ 5.3): live as before
        return

    def watch() -> None:
        select.select([fd], [], [])
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-worker", daemon=True).start()
