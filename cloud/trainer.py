"""The trainer process: sample from Redis, update the policy, publish versions, checkpoint.

It meets the gateway only in Redis (the buffer, the version pointer) and the
policy store directory. Start-up takes the first of:

1. the newest complete checkpoint in ``checkpoint_dir`` (unless ``fresh``):
   weights, optimizer, step counters, sampler and RNG states, version counter;
2. the newest published version: its weights, with a new optimizer;
3. a new policy built from the robots' registered schema, normalised with
   statistics of the offline data, behaviour-cloned on it for ``seed_bc_steps``
   and published, so robots start weak but not random.

The sampler's index is not checkpointed: it is rebuilt from Redis on start, so
a restarted trainer trains on everything stored, including what robots sent
while it was down. Checkpoints are written every ``checkpoint_every_steps`` /
``checkpoint_every_s`` and when stopped (``stop`` set, e.g. by SIGTERM: the
current optimizer step finishes, then the checkpoint is written and verified).
Neither the periodic checkpoints nor publishing wait on disk: the training
thread takes one snapshot of the weights (and optimizer state) into reused host
buffers and a thread writes it (``cloud.publisher``, ``CheckpointWriter``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from redis.exceptions import RedisError

from cloud import fleet_metrics
from cloud.algorithms.base import algorithm_class
from cloud.buffer import SOURCE_OFFLINE
from cloud.blobstore import open_blob_store
from cloud.buffer.reader import BufferReader
from cloud.distributed import Distributed
from cloud.checkpoints import (Checkpoint, CheckpointDir, CheckpointSchedule, CheckpointWriter, capture_rng,
                               restore_rng, seed_rng)
from cloud.policy_store import PolicyStore
from cloud.rate_limiter import SampleToInsertRatio
from cloud.publisher import Publisher
from cloud.weight_average import WeightAverage
from cloud.episode_cache import UNDECODABLE
from cloud.sampler import LabeledIndex, Prefetcher, Sampler
from fleet import metrics
from cloud.trainer_config import TrainerConfig
from fleet.errors import ConfigError
from fleet.policies import FleetPolicy, NormStats, build_policy, set_torch_threads
from fleet.redis_client import REDIS_UNAVAILABLE, connect, wait_out_outage
from fleet.signing import ManifestSigner

log = logging.getLogger(__name__)

TRAINER_STATUS_KEY = "fleet:trainer:status"

PUBLISH_RETRY_S = (1.0, 60.0)
"""First and largest wait before retrying a publish the policy directory refused (OSError)."""


@dataclass
class TrainerState:
    step: int = 0
    version: int = 0
    samples: int = 0
    last_loss: float = float("nan")


def checkpoint_dir_for(cfg: TrainerConfig) -> Path:
    """``cfg.checkpoint_dir``, or ``<policy_dir>-checkpoints`` (one per policy line, e.g. per embodiment)."""
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir)
    policy_dir = Path(cfg.policy_dir)
    return policy_dir.with_name(f"{policy_dir.name}-checkpoints")


def offline_stats(redis, index: LabeledIndex, max_steps: int = 20000) -> NormStats | None:
    """Mean/std of states and actions over (up to ``max_steps``) offline labeled steps, read one episode's
    columns at a time (the buffer reader owns the layout)."""
    schema = index.schema()
    segments = [seg for (task, source), pool in index.pools.items() if source == SOURCE_OFFLINE
                for seg in pool.segments]
    if schema is None or not segments:
        return None
    reader = BufferReader(redis)
    low = [f.name for f in schema.observation if not f.is_image]
    states, actions, taken = [], [], 0
    episodes: dict[tuple[str, str], tuple[np.ndarray, np.ndarray] | None] = {}
    for seg in segments:
        if taken >= max_steps:
            break
        key = (seg.robot_id, seg.episode_id)
        if key not in episodes:
            try:
                elements = reader.columns(seg.robot_id, seg.episode_id, schema)
            except UNDECODABLE as exc:
                index.quarantine(*key, "corrupt_step", f"a stored chunk cannot be decoded ({exc})")
                elements = []
            episodes[key] = None if not elements else (
                np.concatenate([np.concatenate([np.asarray(e.columns.observation[name], np.float32).reshape(
                    e.columns.n, -1) for name in sorted(low)], axis=1) for e in elements]),
                np.concatenate([np.asarray(e.columns.action, np.float32).reshape(e.columns.n, -1) for e in elements]))
        if episodes[key] is None:
            continue
        obs, act = episodes[key]
        rows = slice(seg.start, min(seg.start + seg.length, len(obs), seg.start + max_steps - taken))
        states.append(obs[rows])
        actions.append(act[rows])
        taken += len(obs[rows])
    if not taken:
        return None
    return NormStats.from_data(np.concatenate(states), np.concatenate(actions))


class Trainer:
    def __init__(self, cfg: TrainerConfig, stop: threading.Event | None = None, fresh: bool = False):
        self.cfg = cfg
        signer = ManifestSigner.from_file(cfg.publish_key_file, "publish_key_file") if cfg.publish_key_file else None
        if signer is None:
            log.warning("publishing unsigned policy versions: robots that pin a publisher key refuse them (set "
                        "--publish_key_file: docs/policy-distribution.md)")
        self.stop = stop or threading.Event()
        self.dist = Distributed.from_env(cfg.distributed_strategy)  # torchrun: DDP/FSDP; otherwise a no-op
        self.dist.start(cfg.policy.device)
        self.stop = self.dist.local_stop(self.stop)  # ranks > 0 stop when rank 0 does
        self.fresh = fresh
        self.redis = connect(cfg.redis_url, socket_timeout=30)  # redis:// or redis+cluster://
        self.store = PolicyStore(cfg.policy_dir, self.redis, embodiment=cfg.embodiment, signer=signer)
        self.publisher = Publisher(self.store, cfg.publish_every_steps, cfg.publish_every_s,
                                   cfg.publish_full_every_versions)
        self.average = WeightAverage(cfg.publish_average_steps) if cfg.publish_average_steps else None
        """What is published instead of the newest weights once online training starts (None: the newest)."""
        self.checkpoints = CheckpointDir(checkpoint_dir_for(cfg), cfg.keep_checkpoints)
        self.checkpoint_writer = CheckpointWriter(self.checkpoints)
        self.schedule = CheckpointSchedule(cfg.checkpoint_every_steps, cfg.checkpoint_every_s)
        self.state = TrainerState()
        self.policy: FleetPolicy | None = None
        self.algorithm = None
        self.sampler: Sampler | None = None
        self.rate_limiter = SampleToInsertRatio.from_config(cfg.rate_limit)
        """Holds the update-to-data ratio in the online phase (None: no limit)."""
        self.resumed_from = ""
        """Where this run started: a checkpoint directory, "published vN" or "new policy"."""
        self.resumed_step = 0
        self._status_due = True
        self._started_s = time.time()
        self._publish_failures = 0
        self._publish_retry_at = 0.0
        metrics.TRAINER_REDIS_UP.set(1)

    # --- start-up -------------------------------------------------------------------

    def _wait_for_data(self) -> LabeledIndex:
        index = LabeledIndex(embodiment=self.cfg.embodiment, known_tasks=tuple(self.cfg.tasks), quiet=True)
        while not self.stop.is_set():
            index.refresh(self.redis)
            if index.robots and index.count() >= self.cfg.min_labeled_steps:
                return index
            log.info("waiting for data: %d robots registered, %d labeled steps", len(index.robots), index.count())
            self.stop.wait(2.0)
        raise InterruptedError("stopped while waiting for data")

    def _init_policy(self) -> None:
        latest = 0 if self.fresh else self.store.latest_version()
        if latest:
            try:
                manifest, tensors = self.store.manifest(latest), self.store.tensors(latest)
            except KeyError:
                raise ConfigError(f"Redis says policy v{latest} is the latest published, but the policy store "
                                  f"{self.cfg.policy_dir} does not hold it: point --policy_dir at the store used "
                                  "with this Redis, or start with a fresh Redis database") from None
            self.policy = FleetPolicy.from_manifest(manifest.config, tensors, version=latest)
            log.info("no checkpoint in %s: resuming the weights of published v%d (new optimizer)",
                     self.checkpoints.root, latest)
            self.state.version = latest
            self.resumed_from = f"published v{latest}"
            return
        index = self._wait_for_data()
        schema = index.schema()
        stats = offline_stats(self.redis, index)
        policy_cfg = algorithm_class(self.cfg.algorithm.type).policy_config(self.cfg.fleet_policy(), self.cfg)
        self.policy = build_policy(policy_cfg, schema, self.cfg.tasks, stats=stats, seed=self.cfg.seed)
        self.resumed_from = "new policy"
        log.info("built a new %s policy for %d tasks (%s)", self.cfg.policy.type, len(self.cfg.tasks),
                 "normalised on offline data" if stats else "no offline data for normalisation")

    def setup(self) -> None:
        set_torch_threads(self.cfg.torch_threads)
        seed_rng(self.cfg.seed + self.dist.rank)  # a checkpoint's RNG states replace these (_restore)
        if self.fresh and self.dist.checkpoints_here:  # one rank moves them; every rank starts fresh
            self.checkpoints.set_aside()
        checkpoint = None if self.fresh else self.checkpoints.latest()
        if checkpoint is not None:
            version = int(checkpoint.state["trainer"]["version"])
            self.policy = FleetPolicy.from_manifest(checkpoint.policy_config, checkpoint.policy_tensors, version)
        else:
            self._init_policy()
        self.dist.wrap(self.policy)  # before the optimizer exists: FSDP replaces the parameters
        self.algorithm = algorithm_class(self.cfg.algorithm.type).from_config(self.policy, self.cfg)
        self.sampler = Sampler(self.redis, tuple(self.policy.tasks), self.policy.config.chunk_size,
                               self.cfg.batch_size, self.cfg.online_fraction, seed=self.cfg.seed + self.dist.rank,
                               spec=self.algorithm.data, config=self.cfg.sampler, embodiment=self.cfg.embodiment,
                               use_images=bool(self.policy.image_features),
                               blobs=open_blob_store(self.cfg.blob_url) if self.cfg.blob_url else None)
        metrics.init_trainer(self.sampler.tasks)
        if checkpoint is not None:
            self._restore(checkpoint)

    # --- checkpoints ----------------------------------------------------------------

    def _checkpoint_state(self) -> dict:
        return {
            "trainer": asdict(self.state),
            "publisher": self.publisher.state_dict(),
            "algorithm": {"name": self.cfg.algorithm.type, "state": self.algorithm.state_dict()},
            "embodiment": self.cfg.embodiment,
            "sampler": self.sampler.state_dict(),
            "rng": capture_rng(),
            "weight_average": self.average.state_dict() if self.average is not None else None,
            # The version counter: later versions must be above every number edges may hold.
            "max_version": max(self.state.version, self._latest_published()),
        }

    def _latest_published(self) -> int:
        try:
            return self.store.latest_version()
        except RedisError as exc:  # a checkpoint on the way out must not depend on Redis
            log.warning("cannot read the latest policy version from Redis (%s); the checkpoint records v%d",
                        exc, self.state.version)
            return self.state.version

    def save_checkpoint(self, wait: bool = True) -> Path | None:
        """Checkpoint now: written and verified before returning; ``wait=False``: snapshotted now and written by
        the checkpoint thread."""
        if not self.dist.checkpoints_here:  # rank 0 holds the same weights and optimizer state
            self.schedule.mark(self.state.step)
            return None
        args = (self.state.step, self.policy.manifest_config(), self.policy.state_tensors(), self._checkpoint_state())
        if not wait:
            self.checkpoint_writer.save_async(*args)
            self.schedule.mark(self.state.step)
            return None
        path = self.checkpoint_writer.save(*args)
        self.schedule.mark(self.state.step)
        return path

    def _restore(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.state
        if state.get("embodiment", "") != self.cfg.embodiment:
            raise ConfigError(f"checkpoint {checkpoint.path} belongs to embodiment {state.get('embodiment', '')!r}, "
                              f"not {self.cfg.embodiment!r}: give each policy line its own --checkpoint_dir")
        if state["algorithm"]["name"] != self.cfg.algorithm.type:
            raise ConfigError(f"checkpoint {checkpoint.path} was trained with algorithm "
                              f"{state['algorithm']['name']!r}, not {self.cfg.algorithm.type!r}; pass --fresh to start over")
        policy_cfg = algorithm_class(self.cfg.algorithm.type).policy_config(self.cfg.fleet_policy(), self.cfg)
        wanted = {"policy_config": asdict(policy_cfg), "tasks": list(self.cfg.tasks)}
        have = {k: checkpoint.policy_config.get(k) for k in wanted}
        for part in (wanted, have):
            (part["policy_config"] or {}).pop("device", None)
        if wanted != have:
            log.warning("checkpoint %s has another policy config or task list than this trainer's options; "
                        "resuming the checkpoint's (pass --fresh to start over with the new ones)", checkpoint.path)
        self.algorithm.load_state_dict(state["algorithm"]["state"])
        self.sampler.load_state_dict(state["sampler"])
        self.publisher.load_state_dict(state["publisher"])
        self.state = TrainerState(**state["trainer"])
        self.store.ensure_above(int(state["max_version"]))
        restore_rng(state["rng"])
        if self.average is not None and state.get("weight_average"):
            self.average.load_state_dict(state["weight_average"], self.policy)
        self.schedule.mark(self.state.step)
        self.checkpoint_writer.last_written = self.state.step
        self.resumed_from, self.resumed_step = str(checkpoint.path), checkpoint.step
        metrics.TRAINER_LAST_CHECKPOINT.set(checkpoint.path.stat().st_mtime)
        log.info("resumed from checkpoint %s: step %d, policy v%d", checkpoint.path, self.state.step,
                 self.state.version)

    def _after_step(self) -> None:
        if self.schedule.due(self.state.step):
            self.save_checkpoint(wait=False)

    # --- outages ---------------------------------------------------------------------

    def _wait_out_outage(self, exc: BaseException, during: str) -> bool:
        """Redis is unreachable (``exc``): pause, retry PING with capped exponential backoff until it
        answers (and has finished loading its AOF). One warning per outage, one info when it is back.
        Returns False if ``stop`` was set meanwhile. Training state (step, optimizer, policy) is untouched."""
        metrics.TRAINER_REDIS_UP.set(0)
        log.warning("Redis is unavailable (%s: %s) during %s: pausing sampling and publishing until it is back",
                    type(exc).__name__, exc, during)
        back, attempts, waited_s = wait_out_outage(self.redis, self.stop, TRAINER_STATUS_KEY)
        if not back:
            return False
        metrics.TRAINER_REDIS_UP.set(1)
        log.info("Redis is back after %.1f s (%d attempts): resuming at step %d", waited_s, attempts, self.state.step)
        return True

    def _new_prefetcher(self, old: Prefetcher | None, **kwargs) -> Prefetcher:
        """A fresh prefetcher (the old one's queue may hold batches or errors from before an outage)."""
        if old is not None:
            old.close()
        return Prefetcher(self.sampler, **kwargs)

    def _publish_or_postpone(self, now: bool = False) -> None:
        """Collect a version the publisher thread finished; start the next one when due (``now``: start it and
        wait for it). If the policy directory refuses (OSError): warn, keep training and retry later."""
        try:
            self._collect_published()
            if time.monotonic() < self._publish_retry_at:
                return
            if now or self.publisher.due(self.state.step):
                self._publish(wait=now)
        except OSError as exc:
            if isinstance(exc, REDIS_UNAVAILABLE):  # not raised as OSError by redis-py, but be explicit
                raise
            self._publish_failures += 1
            wait = min(PUBLISH_RETRY_S[0] * 2 ** (self._publish_failures - 1), PUBLISH_RETRY_S[1])
            self._publish_retry_at = time.monotonic() + wait
            if self._publish_failures == 1:
                log.warning("step %d: cannot write the policy to %s (%s); training continues, retrying the "
                            "publish every <= %.0f s", self.state.step, self.cfg.policy_dir, exc, PUBLISH_RETRY_S[1])
            metrics.TRAINER_PUBLISH_FAILURES.inc()

    def _collect_published(self) -> None:
        """The outcome of the publisher thread's last version, if it finished (raises what its write raised,
        except a Redis outage: that is seen, and waited out, where the trainer reads Redis; the version is
        published again once due)."""
        try:
            manifest = self.publisher.poll(self.policy)
        except REDIS_UNAVAILABLE as exc:
            log.info("step %d: the version being published met a Redis outage (%s); publishing again later",
                     self.state.step, exc)
            return
        if manifest is None:
            return
        self.state.version = manifest.version
        log.info("step %d: published v%d (loss %.4f; the training thread spent %.3fs on it)", self.state.step,
                 manifest.version, self.state.last_loss, self.publisher.snapshot_s)
        if self._publish_failures:
            log.info("step %d: publishing works again after %d failed attempts", self.state.step,
                     self._publish_failures)
        self._publish_failures, self._publish_retry_at = 0, 0.0

    # --- main loop ------------------------------------------------------------------

    def _update(self, batch) -> dict[str, float]:
        t0 = time.perf_counter()
        result = self.algorithm.update(batch)
        stats = result.stats
        self.sampler.observe_losses(batch, result.sample_losses)
        if self.rate_limiter is not None:
            self.rate_limiter.sample(len(batch["task_index"]))
        self.state.step += 1
        self.state.samples += len(batch["task_index"])
        self.state.last_loss = stats.get("loss/bc", float("nan"))
        metrics.record_update(batch, self.sampler.tasks, stats, result.sample_losses, time.perf_counter() - t0)
        return stats

    def _next_batch(self, prefetch: Prefetcher) -> dict[str, np.ndarray] | None:
        """The next batch, or None once ``stop`` is set (so a stop never waits on a slow sample)."""
        batch = None
        while batch is None and not self.stop.is_set():
            try:
                batch = prefetch.get(timeout_s=0.5)
            except queue.Empty:
                continue
        return None if self.dist.stop_agreed(batch is None) else batch  # torchrun: rank 0 decides

    def _publish(self, wait: bool) -> None:
        """Snapshot the weights and hand them to the publisher thread (``wait``: until it is written)."""
        if not wait and self.publisher.busy:
            return  # the previous version is still being written: due again at the next step
        with self.dist.full_policy(self.policy) as policy:  # FSDP: every rank gathers here
            if not self.dist.is_main:  # only rank 0 publishes; the others keep its schedule
                self.publisher.load_state_dict({"last_step": self.state.step})
                self.state.version = self.state.version or 1
                return
            self.publisher.wait()
            self._collect_published()
            tensors = self.average.published(policy) if self.average is not None and self.average.active else None
            self.publisher.publish_async(policy, self.state.step, tensors)
        if wait:
            self.publisher.wait()
            self._collect_published()

    def _write_status(self, samples_per_s: float) -> None:
        if not self.dist.is_main:
            return
        self.redis.hset(TRAINER_STATUS_KEY, mapping={
            "step": self.state.step, "version": self.state.version, "loss": self.state.last_loss,
            "samples_per_s": samples_per_s, "updated_s": time.time(), "pid": os.getpid(),
            "resumed_from": self.resumed_from, "resumed_step": self.resumed_step, "started_s": self._started_s,
            "checkpoint_step": self.schedule.last_step,
            "labeled_steps": self.sampler.index.count()})

    def seed_bc(self) -> None:
        """Behaviour cloning on offline demonstrations up to step ``seed_bc_steps``, then publish."""
        if self.state.version or not self.cfg.seed_bc_steps:
            return
        while True:
            try:
                self.sampler.refresh()
                break
            except REDIS_UNAVAILABLE as exc:
                if not self._wait_out_outage(exc, "seed BC start"):
                    return
        if not self.sampler.index.count(SOURCE_OFFLINE):
            log.warning("no offline data: skipping seed BC")
            return
        prefetch = Prefetcher(self.sampler, only_source=SOURCE_OFFLINE)
        try:
            while self.state.step < self.cfg.seed_bc_steps:
                try:
                    batch = self._next_batch(prefetch)
                    if batch is None:
                        return
                    self._update(batch)
                    if self._status_due:
                        self._write_status(0.0)
                        self._status_due = False
                except REDIS_UNAVAILABLE as exc:
                    if not self._wait_out_outage(exc, "seed BC"):
                        return
                    prefetch = self._new_prefetcher(prefetch, only_source=SOURCE_OFFLINE)
                    continue
                self._after_step()
        finally:
            prefetch.close()
        self._publish_until_done("the seed BC publish")

    def _publish_until_done(self, what: str) -> None:
        """Publish now (robots need a policy), waiting out Redis outages; an unwritable directory postpones it."""
        while not self.stop.is_set():
            try:
                self._publish_or_postpone(now=True)
                return
            except REDIS_UNAVAILABLE as exc:
                if not self._wait_out_outage(exc, what):
                    return

    def _finish_publishing(self) -> None:
        """On the way out: let the version being written finish, so the checkpoint records it."""
        if not self.publisher.wait(timeout_s=60.0):
            log.warning("the version being published is not written after 60 s; stopping without it")
            return
        try:
            self._collect_published()
        except (OSError, *REDIS_UNAVAILABLE) as exc:
            log.warning("the last version could not be published (%s); the next start publishes again", exc)

    def _inserted_steps(self) -> int:
        """Refresh the sampler's index; the online steps stored so far (the rate limiter's inserts)."""
        self.sampler.refresh()
        return self.sampler.index.online_steps

    def _train(self) -> None:
        while True:
            try:
                self.sampler.refresh()
                if self.rate_limiter is not None:
                    self.rate_limiter.set_inserted(self.sampler.index.online_steps)
                break
            except REDIS_UNAVAILABLE as exc:
                if not self._wait_out_outage(exc, "training start"):
                    return
        if self.average is not None and not self.average.active:  # not restored: from the weights as they are
            self.average.start(self.policy)
        depth = self.cfg.sampler.prefetch_depth
        prefetch = Prefetcher(self.sampler, depth)
        last_refresh = last_status = time.monotonic()
        window_samples, window_start = 0, time.monotonic()
        try:
            while not self.stop.is_set():
                if self.cfg.max_steps and self.state.step >= self.cfg.max_steps:
                    break
                try:
                    now = time.monotonic()
                    if now - last_refresh > self.cfg.refresh_interval_s:
                        self.sampler.refresh()
                        metrics.record_sampler({key: len(pool) for key, pool in self.sampler.index.pools.items()},
                                               {task: self.sampler.online_share(task) for task in self.sampler.tasks})
                        last_refresh = now
                    if self.rate_limiter is not None and not self.rate_limiter.wait(
                            self.cfg.batch_size, self._inserted_steps, self.stop, self.cfg.refresh_interval_s):
                        break
                    batch = self._next_batch(prefetch)
                    if batch is None:
                        break
                    self._update(batch)
                    if self.average is not None:
                        self.average.update()
                    window_samples += len(batch["task_index"])
                    self._publish_or_postpone()
                    if self._status_due or now - last_status > 1.0:
                        self._write_status(window_samples / max(now - window_start, 1e-6))
                        window_samples, window_start, last_status = 0, now, now
                        self._status_due = False
                except REDIS_UNAVAILABLE as exc:
                    if not self._wait_out_outage(exc, f"training (step {self.state.step})"):
                        break
                    prefetch = self._new_prefetcher(prefetch, depth=depth)
                    last_refresh = 0.0  # refresh the index first thing
                    self._status_due = True
                    window_samples, window_start = 0, time.monotonic()
                    continue
                self._after_step()
        finally:
            prefetch.close()

    def run(self) -> TrainerState:
        """Train until stopped or ``max_steps``, then checkpoint; returns the final state.

        A crash (an exception) writes no checkpoint: the next start resumes from the last one."""
        if self.dist.is_main:  # the fleet-level series (cloud/fleet_metrics.py) on this process's /metrics
            fleet_metrics.install(self.cfg.redis_url)
        while self.sampler is None and not self.stop.is_set():
            try:
                self.setup()
            except REDIS_UNAVAILABLE as exc:  # setup only reads: it is simply done again
                self.policy = None
                self._wait_out_outage(exc, "start-up")
        if self.sampler is None:
            log.info("trainer stopped during start-up")
            self.dist.close()
            fleet_metrics.uninstall()
            return self.state
        self.seed_bc()
        if not self.stop.is_set():
            if not self.state.version:
                self._publish_until_done("the first publish")  # robots need something to act with
            self._train()
        self._finish_publishing()
        self.checkpoint_writer.wait()  # a checkpoint being written in the background completes first
        if self.state.step > self.checkpoint_writer.last_written:
            self.save_checkpoint()  # written and verified before the process ends (SIGTERM, max_steps)
        try:
            self._write_status(0.0)
        except RedisError as exc:
            log.warning("cannot write the final trainer status to Redis: %s", exc)
        log.info("trainer stopped at step %d (v%d)", self.state.step, self.state.version)
        self.dist.close()
        fleet_metrics.uninstall()
        return self.state
