"""Swap the acting policy between episodes.

The updater thread loads and validates a new policy off the control thread and
``offer``s it; the control loop calls ``swap_if_pending`` at an episode boundary,
which swaps one reference and keeps the previous policy for ``rollback``
(MLServer's "load the new model before unloading the old one"). Rollback
listeners (the updater) hear which version was rolled back, so that it is
refused and no longer kept as the last good policy on disk.

At most two models are resident: the updater writes the next version into the
previous model (``take_previous``) or, when none was swapped in since, into the
pending one (``take_pending``), never into the acting one. Writing over the pending
model can make an episode boundary pass without a swap; the next version then waits for
a boundary (``wait_swap``) instead of taking the pending model again, so a robot whose
transfers are slower than the publish rate still moves on at every other boundary and
never acts on one version for ever. Once the previous
model's memory is reused, a rollback cannot be instant: listeners still hear it
(the updater reloads the previous version from disk into its standby model and
``offer_restore``s it), and the restored version is swapped in at the next
episode boundary.
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
        self._swap_done = threading.Condition(self._lock)
        self._current = initial
        self._pending: ActingPolicy | None = None
        self._previous: ActingPolicy | None = None
        self._previous_usable = False
        """Whether ``_previous`` may be rolled back to (not a version rolled back from, not being rewritten)."""
        self._restore = False
        """``_pending`` is a restored older version (a rollback from disk)."""
        self._reclaimed = False
        """The previous model (a version to roll back to) was taken by the updater since the last swap."""
        self._pending_taken = False
        """The updater took the pending model back to write a newer version into it (until it offers one)."""
        self.missed_swaps = 0
        """Episode boundaries that found no pending version because the updater was rewriting it."""
        self._missed = False
        self._rolled_back: set[int] = set()
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

    def offer(self, policy: ActingPolicy) -> bool:
        """Called by the updater: replace any older pending policy with this one. Returns whether it is pending."""
        with self._lock:
            if policy.version <= self._current.version:
                log.info("ignoring policy v%d: already acting with v%d", policy.version, self._current.version)
                return False
            if self._pending is None or self._restore or policy.version > self._pending.version:
                self._pending, self._restore, self._pending_taken = policy, False, False
            return self._pending is policy

    def offer_restore(self, policy: ActingPolicy) -> None:
        """Called by the updater after a rollback from disk: swap to this older version at the next boundary."""
        with self._lock:
            self._pending, self._restore, self._pending_taken = policy, True, False

    def take_pending(self) -> ActingPolicy | None:
        """The updater takes back the pending policy (to write a newer version into it); None if none."""
        with self._lock:
            pending, self._pending, self._restore = self._pending, None, False
            self._pending_taken = self._pending_taken or pending is not None
            return pending

    @property
    def missed_swap(self) -> bool:
        """Whether the last episode boundary found no pending version because the updater was rewriting it
        (the next version should wait for a boundary, not take the pending model again)."""
        with self._lock:
            return self._missed

    def wait_swap(self, timeout_s: float) -> bool:
        """Block until a swap (or a rollback in memory) makes up for a missed one; False on timeout."""
        with self._swap_done:
            return self._swap_done.wait_for(lambda: not self._missed, timeout_s)

    def take_previous(self) -> ActingPolicy | None:
        """The updater takes the previous policy's memory (rollback then goes through the disk)."""
        with self._lock:
            if self._previous is not None and self._previous_usable:
                self._reclaimed = True
            previous, self._previous, self._previous_usable = self._previous, None, False
            return previous

    def swap_if_pending(self) -> bool:
        """Called by the control loop between episodes. Returns True if it swapped."""
        with self._lock:
            if self._pending is None:
                if self._pending_taken:
                    self._missed = True
                    self.missed_swaps += 1
                return False
            self._previous, self._current, self._pending = self._current, self._pending, None
            self._previous_usable, self._restore, self._reclaimed = not self._restore, False, False
            self._missed = False
            self._swap_done.notify_all()
        self._current.reset()
        log.info("swapped policy v%d -> v%d", self._previous.version, self._current.version)
        self.swapped.set()
        return True

    def rollback(self, reason: str) -> bool:
        """Go back to the previous policy (e.g. the new one produced NaN actions). Returns False when it is not
        in memory any more: listeners still hear it once, to restore it from disk."""
        with self._lock:
            bad = self._current
            if self._previous is not None and self._previous_usable:
                self._current, self._previous, self._previous_usable = self._previous, bad, False
                in_memory, self._missed = True, False  # the model rolled back from is free to write into
                self._swap_done.notify_all()
            elif not self._reclaimed or bad.version in self._rolled_back or not self._rollback_listeners:
                return False
            else:
                in_memory = False
            self._rolled_back.add(bad.version)
        if in_memory:
            log.warning("rolled back policy v%d -> v%d: %s", bad.version, self._current.version, reason)
            self._current.reset()
        else:
            log.warning("rolling back policy v%d from disk (the previous model's memory holds a newer version); "
                        "it acts until the restored version is swapped in: %s", bad.version, reason)
        for listener in self._rollback_listeners:
            try:
                listener(bad.version)
            except Exception:  # noqa: BLE001 - a listener must not break the control loop
                log.exception("rollback listener failed")
        return in_memory
