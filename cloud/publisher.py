"""Publish the trainer's policy as a new version in the store (the gateway serves it), off the training thread.

``publish_async`` takes one snapshot of the weights on the calling (training) thread: a single
device-to-host copy into host buffers reused from one version to the next (``cloud.snapshot``). A
publisher thread then hashes the snapshot (BLAKE3 piece digests), writes it to the store and announces it;
the trainer collects the outcome with ``poll`` (the new version number, or the error the write raised),
never waiting for it. While a version is being written, the next one is not started (``publish_async``
returns False and the trainer tries again at its next step), so at most one snapshot exists.
"""

from __future__ import annotations

import logging
import threading
import time

from cloud.policy_store import PolicyStore
from cloud.snapshot import HostSnapshot
from fleet import metrics
from fleet.weights import Manifest

log = logging.getLogger(__name__)


def _state(policy) -> dict:
    state = getattr(policy, "state_tensors", None)
    return state() if state is not None else policy.tensors()


class Publisher:
    """Every ``every_steps`` optimizer steps (and/or every ``every_s`` seconds, if it trained since), publish.

    Every ``full_every_versions``-th version is a keyframe that edges get without element deltas, which
    bounds the chain of deltas an edge applies (0 = only the first version is one).
    """

    def __init__(self, store: PolicyStore, every_steps: int, every_s: float = 0.0, full_every_versions: int = 20):
        if every_steps < 0 or every_s < 0 or full_every_versions < 0:
            raise ValueError(f"every_steps ({every_steps}), every_s ({every_s}) and full_every_versions "
                             f"({full_every_versions}) must be >= 0")
        self.store = store
        self.every_steps = every_steps
        self.every_s = every_s
        self.full_every_versions = full_every_versions
        self._last_step = 0
        self._last_time = time.monotonic()
        self.latest: Manifest | None = None
        self.snapshot_s = 0.0
        """Seconds the training thread spent in the last snapshot (the only publish work it does)."""
        self._snapshot = HostSnapshot()
        self._thread: threading.Thread | None = None
        self._outcome: tuple[int, Manifest | BaseException] | None = None

    def due(self, step: int) -> bool:
        if self.every_steps and step - self._last_step >= self.every_steps:
            return True
        return (bool(self.every_s) and step > self._last_step
                and time.monotonic() - self._last_time >= self.every_s)

    @property
    def busy(self) -> bool:
        """A version is being written (its snapshot is in use)."""
        return self._thread is not None and self._thread.is_alive()

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the step of the last publication (the clock restarts on resume)."""
        return {"last_step": self._last_step}

    def load_state_dict(self, state: dict) -> None:
        self._last_step = int(state["last_step"])
        self._last_time = time.monotonic()

    def publish_async(self, policy, step: int, tensors: dict | None = None) -> bool:
        """Snapshot ``policy`` now (``tensors``: these in place of its state, e.g. averaged weights) and write
        it as a new version in the background; False (nothing done) while the previous version is still being
        written or its outcome was not collected with :meth:`poll`."""
        if self.busy or self._outcome is not None:
            return False
        t0 = time.perf_counter()
        tensors = self._snapshot.copy_from(_state(policy) if tensors is None else tensors)
        config, trainable, parent = policy.manifest_config(), policy.trainable_names(), policy.version
        self.snapshot_s = time.perf_counter() - t0
        self._thread = threading.Thread(target=self._write, args=(tensors, config, trainable, parent, step, t0),
                                        name="publisher", daemon=True)
        self._thread.start()
        return True

    def _write(self, tensors, config, trainable, parent: int, step: int, t0: float) -> None:
        try:
            manifest = self.store.publish(tensors, config, trainable, parent_version=parent,
                                          full_every_versions=self.full_every_versions)
            metrics.TRAINER_PUBLISH.observe(time.perf_counter() - t0)
            self._outcome = (step, manifest)
        except BaseException as exc:  # handed to the training thread by poll()
            self._outcome = (step, exc)

    def poll(self, policy) -> Manifest | None:
        """The version written since the last call (``policy.version`` is set to it), None if none finished; raises
        what the write raised (the schedule is then unchanged: the trainer retries)."""
        if self.busy or self._outcome is None:
            return None
        (step, outcome), self._outcome = self._outcome, None
        if isinstance(outcome, BaseException):
            raise outcome
        policy.version = outcome.version
        self._last_step, self._last_time = step, time.monotonic()
        self.latest = outcome
        metrics.TRAINER_VERSIONS.inc()
        metrics.TRAINER_LATEST_VERSION.set(outcome.version)
        return outcome

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the version being written (if any); whether none is being written any more."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        return not self.busy

    def publish(self, policy, step: int) -> Manifest:
        """Publish now and wait for it (start-up, tools, tests): :meth:`publish_async` + :meth:`wait` + :meth:`poll`."""
        self.wait()
        self.poll(policy)  # a version finished before: account for it first
        self.publish_async(policy, step)
        self.wait()
        return self.poll(policy)
