"""A background thread that runs until asked to stop: the edge's loop, streamer and updater, the sampler's
prefetcher, the systemd watchdog.

The owner passes its run function, which checks (or waits on) ``stopping``; ``stop`` sets it and joins.
An owner whose thread blocks elsewhere (a gRPC call, a condition) sets ``stopping``, wakes it, then calls
``stop``. Threads with another life cycle (the recorder drains its queue first; the publisher's one-shot
writers) keep their own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Worker:
    """One named daemon thread running ``run`` and an Event, ``stopping``, that asks it to return."""

    def __init__(self, name: str, run: Callable[[], None]):
        self.name = name
        self._run = run
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (once)."""
        if self.thread is not None:
            raise RuntimeError(f"{self.name} already started")
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Set ``stopping`` and join for up to ``timeout_s``; True if the thread ended (or never started)."""
        self.stopping.set()
        if self.thread is None:
            return True
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            log.warning("thread %s did not stop within %.1f s", self.name, timeout_s)
            return False
        return True

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()
