"""Stopping the proxy's background tasks without ever hanging shutdown.

On Python 3.11, a cancellation that lands while a socket timeout fires can surface
inside redis-py as a timeout or connection error instead of ``CancelledError``; a loop
that retries on those errors would then swallow its own cancellation and run forever,
and awaiting it would hang shutdown. So loops also ask ``cancel_requested()`` when they
catch such an error, and ``stop_task`` waits only a bounded time.

Pure asyncio; imports nothing of the proxy.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("qnp.proxy.tasks")


def cancel_requested() -> bool:
    """True if the running task has been asked to stop (its cancel may have been lost)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def stop_task(task: asyncio.Task[None], grace: float = 2.0) -> None:
    """Cancel ``task`` and wait for it to end, at most ``grace`` seconds."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        log.error("background task %s did not stop within %.1fs", task.get_name(), grace)
    elif not task.cancelled() and task.exception() is not None:
        log.error("background task %s ended with %s", task.get_name(),
                  type(task.exception()).__name__)
