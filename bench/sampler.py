"""Sampler throughput: batches from the Redis buffer vs an in-memory ring buffer of the same data.

Both sides deliver the same batch layout (windows of H steps, per-task balance, obs/action/pad/flags)
through the same prefetching loader (a background thread keeping batches ready), and the consumer
counts samples per second over a fixed time. Measured in the same run, on the same data:

    redis         the trainer's Sampler: index mirrored from Redis, decoded-episode RAM cache (default)
    redis-cold    the same with the cache off: every window is LRANGEd and decoded from Redis
    ram           a numpy ring buffer holding the decoded steps (vectorised window gather)

for low-dimensional steps (39-d state, 4-d action) and for steps with a 224x224 RGB camera (JPEG
frames inline in Redis, decoded arrays in the ring). Targets (issue 14): redis >= 0.8x ram low-dim,
>= 0.5x ram 224x224 JPEG.

    python bench/sampler.py --quick --json runs/bench/sampler.json
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_json  # noqa: E402

from cloud.buffer import SOURCE_OFFLINE  # noqa: E402
from cloud.ingest import Ingest  # noqa: E402
from cloud.sampler import Prefetcher, Sampler, SamplerConfig  # noqa: E402
from fleet import PROTOCOL_VERSION  # noqa: E402
from fleet.codec import encode_image  # noqa: E402
from fleet.redis_client import connect, connect_async  # noqa: E402
from fleet.redis_server import start_redis  # noqa: E402
from fleet.types import Chunk, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step  # noqa: E402

TASKS = ("task a", "task b", "task c")
HORIZON, BATCH = 10, 64


def make_episodes(n_episodes: int, length: int, image: bool, seed: int = 0):
    """Synthetic demos: (task, steps, summary); a 64x64 camera frame per step when ``image``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:224, 0:224]
    base = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    episodes = []
    for e in range(n_episodes):
        steps = []
        for t in range(length):
            images = {"cam": encode_image(np.roll(base, t, axis=1), "jpeg")} if image else {}
            steps.append(Step(seq=0, index=t, observation={"state": rng.normal(size=39).astype(np.float32)},
                              policy_action=np.zeros(4, np.float32), action=rng.normal(size=4).astype(np.float32),
                              is_intervention=False, reward=-1.0, success=t == length - 1, done=t == length - 1,
                              policy_version=0, timestamp_s=0.0, images=images))
        episodes.append((TASKS[e % len(TASKS)], steps, EpisodeSummary(True, length, 0, 0, False, 0)))
    return episodes


async def write(url: str, robot_id: str, schema: Schema, episodes) -> None:
    redis = connect_async(url)
    try:
        ingest = Ingest(redis, source=SOURCE_OFFLINE)
        seq = await ingest.register(RobotInfo(robot_id, "bench", schema, TASKS, PROTOCOL_VERSION))
        for i, (task, steps, summary) in enumerate(episodes):
            for s in steps:
                seq += 1
                s.seq = seq
            await ingest.write(Chunk(robot_id, f"{robot_id}-{i}", task, steps, episode_end=summary))
    finally:
        await redis.aclose()


class RingBuffer:
    """The in-memory baseline: decoded steps in preallocated arrays, sampled with vectorised gathers."""

    def __init__(self, episodes, capacity: int, seed: int = 0):
        first = episodes[0][1][0]
        self.obs = {"state": np.zeros((capacity, 39), np.float32)}
        if first.images:
            from fleet.codec import decode_image

            self.obs["cam"] = np.zeros((capacity, 224, 224, 3), np.uint8)
        self.action = np.zeros((capacity, 4), np.float32)
        self.episode_end = np.zeros(capacity, np.int64)
        self.task = np.zeros(capacity, np.int64)
        i = 0
        for task, steps, _ in episodes:
            start = i
            for s in steps:
                self.obs["state"][i] = s.observation["state"]
                if "cam" in self.obs:
                    self.obs["cam"][i] = decode_image(s.images["cam"])
                self.action[i] = s.action
                self.task[i] = TASKS.index(task)
                i += 1
            self.episode_end[start:i] = i
        self.size = i
        self.by_task = [np.flatnonzero(self.task[:i] == k) for k in range(len(TASKS))]
        self.rng = np.random.default_rng(seed)

    def sample(self, only_source=None) -> dict[str, np.ndarray]:
        task = self.rng.integers(len(TASKS), size=BATCH)
        idx = np.array([pool[self.rng.integers(len(pool))] for pool in (self.by_task[k] for k in task)])
        window = idx[:, None] + np.arange(HORIZON)[None]
        pad = window >= self.episode_end[idx][:, None]
        window = np.minimum(window, self.size - 1)
        action = np.where(pad[..., None], 0.0, self.action[window]).astype(np.float32)
        batch = {f"obs/{k}": v[idx] for k, v in self.obs.items()}
        batch.update(action=action, action_is_pad=pad, task_index=task, is_online=np.zeros(BATCH, bool))
        return batch


def throughput(sampler, seconds: float, warmup_batches: int = 3) -> float:
    """Samples per second the consumer gets from a prefetching loader over ``sampler``."""
    loader = Prefetcher(sampler, depth=4)
    try:
        for _ in range(warmup_batches):
            loader.get(timeout_s=120)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += len(loader.get(timeout_s=120)["task_index"])
        return n / (time.perf_counter() - t0)
    finally:
        loader.close()


def measure(url: str, robot_id: str, episodes, seconds: float) -> dict[str, float]:
    client = connect(url)
    try:
        rates = {}
        for name, cache_bytes in (("redis", 1 << 30), ("redis_cold", 0)):
            sampler = Sampler(client, TASKS, HORIZON, BATCH, online_fraction=0.5, seed=0,
                              config=SamplerConfig(cache_bytes=cache_bytes))
            sampler.refresh()
            rates[name] = throughput(sampler, seconds)
        rates["ram"] = throughput(RingBuffer(episodes, sum(len(s) for _, s, _ in episodes)), seconds)
        return rates
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small data, 2 s per measurement")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    episodes, length, seconds = (60, 100, 2.0) if args.quick else (300, 150, 10.0)
    results: dict = {"batch_size": BATCH, "horizon": HORIZON, "episodes": episodes, "episode_steps": length,
                     "seconds_per_measurement": seconds}
    with tempfile.TemporaryDirectory() as tmp:
        redis = start_redis(Path(tmp) / "redis")
        try:
            for kind, image in (("lowdim", False), ("image", True)):
                schema = Schema((FeatureSpec("state", "float32", (39,)),)
                                + ((FeatureSpec("cam", "uint8", (224, 224, 3), is_image=True),) if image else ()),
                                FeatureSpec("action", "float32", (4,)))
                data = make_episodes(episodes // (3 if image else 1), length, image)
                client = connect(redis.url)
                client.flushall()  # one kind of data at a time
                client.close()
                asyncio.run(write(redis.url, f"bench-{kind}", schema, data))
                rates = measure(redis.url, f"bench-{kind}", data, seconds)
                for name, value in rates.items():
                    results[f"{kind}_{name}_samples_per_s"] = value
                results[f"{kind}_ratio"] = rates["redis"] / rates["ram"]
                results[f"{kind}_cold_ratio"] = rates["redis_cold"] / rates["ram"]
        finally:
            redis.kill()
    results.update(redis_samples_per_s=results["lowdim_redis_samples_per_s"],
                   ram_samples_per_s=results["lowdim_ram_samples_per_s"], ratio=results["lowdim_ratio"],
                   target_ratio=0.8, target_image_ratio=0.5)
    print(f"{'data':8} {'redis (cache)':>14} {'redis (cold)':>13} {'ram ring':>10} {'ratio':>7} {'cold ratio':>11}")
    for kind in ("lowdim", "image"):
        r = {k[len(kind) + 1:]: v for k, v in results.items() if k.startswith(kind + "_")}
        print(f"{kind:8} {r['redis_samples_per_s']:14.0f} {r['redis_cold_samples_per_s']:13.0f}"
              f" {r['ram_samples_per_s']:10.0f} {r['ratio']:7.2f} {r['cold_ratio']:11.2f}")
    print("samples/s through the prefetching loader; ratio = redis / ram (targets: >= 0.8 low-dim, >= 0.5 "
          "224x224 JPEG; main measured 0.33-0.58x low-dim, 0.20x 64x64 PNG)")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
