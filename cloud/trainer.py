"""The trainer process: sample from Redis, update the policy, publish versions.

It meets the gateway only in Redis (the buffer, the version pointer) and the
policy store directory. Start-up: resume the newest published version if there
is one; otherwise build the policy from the robots' registered schema,
normalise with statistics of the offline data, behaviour-clone on it for
``seed_bc_steps`` and publish version 1, so robots start weak but not random.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import redis as redis_lib

from cloud.algorithms.base import ALGORITHMS
from cloud.buffer import SOURCE_OFFLINE, RobotKeys
from cloud.policy_store import PolicyStore
from cloud.publisher import Publisher
from cloud.sampler import LabeledIndex, Prefetcher, Sampler
from fleet import metrics
from fleet.config import TrainerConfig
from fleet.convert import decode_step
from fleet.policies import FleetPolicy, NormStats, build_policy, set_torch_threads

log = logging.getLogger(__name__)

TRAINER_STATUS_KEY = "fleet:trainer:status"


@dataclass
class TrainerState:
    step: int = 0
    version: int = 0
    samples: int = 0
    last_loss: float = float("nan")


def offline_stats(redis, index: LabeledIndex, max_steps: int = 20000) -> NormStats | None:
    """Mean/std of states and actions over (up to ``max_steps``) offline labeled steps."""
    positions = [p for (task, source), ps in index.positions.items() if source == SOURCE_OFFLINE for p in ps]
    if not positions:
        return None
    positions = positions[:max_steps]
    pipe = redis.pipeline(transaction=False)
    for p in positions:
        pipe.lindex(RobotKeys(p.robot_id).episode(p.episode_id), p.index)
    states, actions = [], []
    for blob in pipe.execute():
        if blob is None:
            continue
        step = decode_step(blob)
        states.append(np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1)
                                      for _, v in sorted(step.observation.items())]))
        actions.append(np.asarray(step.action, dtype=np.float32))
    return NormStats.from_data(np.stack(states), np.stack(actions))


class Trainer:
    def __init__(self, cfg: TrainerConfig, stop: threading.Event | None = None):
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.redis = redis_lib.Redis.from_url(cfg.redis_url, socket_timeout=30)
        self.store = PolicyStore(cfg.policy_dir, self.redis)
        self.publisher = Publisher(self.store, cfg.publish_every_steps, cfg.publish_every_s)
        self.state = TrainerState()
        self.policy: FleetPolicy | None = None
        self.algorithm = None
        self.sampler: Sampler | None = None

    # --- start-up -------------------------------------------------------------------

    def _wait_for_data(self) -> LabeledIndex:
        index = LabeledIndex()
        while not self.stop.is_set():
            index.refresh(self.redis)
            if index.robots and index.count() >= self.cfg.min_labeled_steps:
                return index
            log.info("waiting for data: %d robots registered, %d labeled steps", len(index.robots), index.count())
            self.stop.wait(2.0)
        raise InterruptedError("stopped while waiting for data")

    def _init_policy(self) -> None:
        latest = self.store.latest_version()
        if latest:
            manifest = self.store.manifest(latest)
            self.policy = FleetPolicy.from_manifest(manifest.config, self.store.tensors(latest), version=latest)
            log.info("resuming from published policy v%d", latest)
            self.state.version = latest
            return
        index = self._wait_for_data()
        schema = index.schema()
        stats = offline_stats(self.redis, index)
        self.policy = build_policy(self.cfg.policy, schema, self.cfg.tasks, stats=stats, seed=self.cfg.seed)
        log.info("built a new %s policy for %d tasks (%s)", self.cfg.policy.type, len(self.cfg.tasks),
                 "normalised on offline data" if stats else "no offline data for normalisation")

    def setup(self) -> None:
        set_torch_threads(self.cfg.torch_threads)
        self._init_policy()
        self.algorithm = ALGORITHMS[self.cfg.algorithm](self.policy)
        self.sampler = Sampler(self.redis, tuple(self.policy.tasks), self.policy.config.chunk_size,
                               self.cfg.batch_size, self.cfg.online_fraction, seed=self.cfg.seed)

    # --- main loop ------------------------------------------------------------------

    def _update(self, batch) -> dict[str, float]:
        stats = self.algorithm.update(batch)
        self.state.step += 1
        self.state.samples += len(batch["task_index"])
        self.state.last_loss = stats.get("loss/bc", float("nan"))
        metrics.TRAINER_STEPS.inc()
        metrics.TRAINER_SAMPLES.inc(len(batch["task_index"]))
        for key, value in stats.items():
            if key.startswith("loss/"):
                metrics.TRAINER_LOSS.labels(term=key[5:]).set(value)
        return stats

    def _publish(self) -> None:
        manifest = self.publisher.publish(self.policy, self.state.step)
        self.state.version = manifest.version
        log.info("step %d: published v%d (loss %.4f)", self.state.step, manifest.version, self.state.last_loss)

    def _write_status(self, samples_per_s: float) -> None:
        self.redis.hset(TRAINER_STATUS_KEY, mapping={
            "step": self.state.step, "version": self.state.version, "loss": self.state.last_loss,
            "samples_per_s": samples_per_s, "updated_s": time.time()})

    def seed_bc(self) -> None:
        """Behaviour cloning on offline demonstrations, then publish the first version."""
        if self.state.version or not self.cfg.seed_bc_steps:
            return
        self.sampler.refresh()
        if not self.sampler.index.count(SOURCE_OFFLINE):
            log.warning("no offline data: skipping seed BC")
            return
        prefetch = Prefetcher(self.sampler, only_source=SOURCE_OFFLINE)
        try:
            for _ in range(self.cfg.seed_bc_steps):
                if self.stop.is_set():
                    return
                self._update(prefetch.get())
        finally:
            prefetch.close()
        self._publish()

    def run(self) -> TrainerState:
        """Train until stopped or ``max_steps``; returns the final state."""
        self.setup()
        self.seed_bc()
        if self.stop.is_set():
            return self.state
        if not self.state.version:
            self._publish()  # robots need something to act with
        self.sampler.refresh()
        prefetch = Prefetcher(self.sampler)
        last_refresh = last_status = time.monotonic()
        window_samples, window_start = 0, time.monotonic()
        try:
            while not self.stop.is_set():
                if self.cfg.max_steps and self.state.step >= self.cfg.max_steps:
                    break
                now = time.monotonic()
                if now - last_refresh > self.cfg.refresh_interval_s:
                    self.sampler.refresh()
                    for source in ("online", "offline"):
                        metrics.TRAINER_BUFFER_LABELED.labels(source=source).set(self.sampler.index.count(source))
                    last_refresh = now
                batch = prefetch.get()
                self._update(batch)
                window_samples += len(batch["task_index"])
                if self.publisher.due(self.state.step):
                    self._publish()
                if now - last_status > 1.0:
                    self._write_status(window_samples / max(now - window_start, 1e-6))
                    window_samples, window_start, last_status = 0, now, now
        finally:
            prefetch.close()
        log.info("trainer stopped at step %d (v%d)", self.state.step, self.state.version)
        return self.state
