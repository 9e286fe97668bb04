"""Publish the trainer's policy as a new version in the store (the gateway serves it)."""

from __future__ import annotations

import logging
import time

from cloud.policy_store import PolicyStore
from fleet import metrics
from fleet.weights import Manifest

log = logging.getLogger(__name__)


class Publisher:
    """Every ``every_steps`` optimizer steps (and/or every ``every_s`` seconds), publish."""

    def __init__(self, store: PolicyStore, every_steps: int, every_s: float = 0.0):
        self.store = store
        self.every_steps = every_steps
        self.every_s = every_s
        self._last_step = 0
        self._last_time = time.monotonic()
        self.latest: Manifest | None = None

    def due(self, step: int) -> bool:
        if self.every_steps and step - self._last_step >= self.every_steps:
            return True
        return bool(self.every_s) and time.monotonic() - self._last_time >= self.every_s

    def publish(self, policy, step: int) -> Manifest:
        t0 = time.perf_counter()
        manifest = self.store.publish(policy.tensors(), policy.manifest_config(), policy.trainable_names(),
                                      parent_version=policy.version)
        policy.version = manifest.version
        self._last_step, self._last_time = step, time.monotonic()
        self.latest = manifest
        metrics.TRAINER_PUBLISH.observe(time.perf_counter() - t0)
        metrics.TRAINER_VERSIONS.inc()
        metrics.TRAINER_LATEST_VERSION.set(manifest.version)
        return manifest
