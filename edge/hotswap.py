"""Swap the acting policy between episodes.

The updater thread builds and validates a new policy off the control thread and
``offer``s it; the control loop calls ``swap_if_pending`` at an episode boundary,
which swaps one reference and keeps the previous policy for ``rollback``
(MLServer's "load the new model before unloading the old one"). Rollback
listeners (the updater) hear which version was rolled back, so that it is
refused and no longer kept as the last good policy on disk.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from fleet.policies.base import ActingPolicy

log = logging.getLogger(__name__)


class PolicySlot:
    """Holds the acting policy, at most one pending replacement, and the previous one."""

    def __init__(self, initial: ActingPolicy):
        self._lock = threading.Lock()
        self._current = initial
        self._pending: ActingPolicy | None = None
        self._previous: ActingPolicy | None = None
        self._rollback_listeners: list[Callable[[int], None]] = []
        self.swapped = threading.Event()  # set after every swap; tests wait on it

    def add_rollback_listener(self, listener: Callable[[int], None]) -> None:
        """``listener(bad_version)`` runs on the rolling-back (control) thread after a rollback: keep it quick."""
        self._rollback_listeners.append(listener)

    @property
    def current(self) -> ActingPolicy:
        return self._current

    @property
    def pending_version(self) -> int | None:
        with self._lock:
            return None if self._pending is None else self._pending.version

    def offer(self, policy: ActingPolicy) -> None:
        """Called by the updater: replace any older pending policy with this one."""
        with self._lock:
            if policy.version <= self._current.version:
                log.info("ignoring policy v%d: already acting with v%d", policy.version, self._current.version)
                return
            if self._pending is None or policy.version > self._pending.version:
                self._pending = policy

    def swap_if_pending(self) -> bool:
        """Called by the control loop between episodes. Returns True if it swapped."""
        with self._lock:
            if self._pending is None:
                return False
            self._previous, self._current, self._pending = self._current, self._pending, None
        self._current.reset()
        log.info("swapped policy v%d -> v%d", self._previous.version, self._current.version)
        self.swapped.set()
        return True

    def rollback(self, reason: str) -> bool:
        """Go back to the previous policy (e.g. the new one produced NaN actions)."""
        with self._lock:
            if self._previous is None:
                return False
            bad, self._current, self._previous = self._current, self._previous, None
        log.warning("rolled back policy v%d -> v%d: %s", bad.version, self._current.version, reason)
        self._current.reset()
        for listener in self._rollback_listeners:
            try:
                listener(bad.version)
            except Exception:  # noqa: BLE001 - a listener must not break the control loop
                log.exception("rollback listener failed")
        return True
