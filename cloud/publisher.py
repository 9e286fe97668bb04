"""Publish the trainer's policy as a new version in the store (the gateway serves it)."""

from __future__ import annotations

import logging
import time

from cloud.policy_store import PolicyStore
from fleet import metrics
from fleet.weights import Manifest

log = logging.getLogger(__name__)


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

    def due(self, step: int) -> bool:
        if self.every_steps and step - self._last_step >= self.every_steps:
            return True
        return (bool(self.every_s) and step > self._last_step
                and time.monotonic() - self._last_time >= self.every_s)

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the step of the last publication (the clock restarts on resume)."""
        return {"last_step": self._last_step}

    def load_state_dict(self, state: dict) -> None:
        self._last_step = int(state["last_step"])
        self._last_time = time.monotonic()

    def publish(self, policy, step: int) -> Manifest:
        t0 = time.perf_counter()
        manifest = self.store.publish(policy.tensors(), policy.manifest_config(), policy.trainable_names(),
                                      parent_version=policy.version, full_every_versions=self.full_every_versions)
        policy.version = manifest.version
        self._last_step, self._last_time = step, time.monotonic()
        self.latest = manifest
        metrics.TRAINER_PUBLISH.observe(time.perf_counter() - t0)
        metrics.TRAINER_VERSIONS.inc()
        metrics.TRAINER_LATEST_VERSION.set(manifest.version)
        return manifest
