"""What observability costs: the control loop's per-tick metrics and a scrape of the trainer's fleet series.

    tick     EdgeSeries.step + inference observe (what ControlLoop does every tick), against the same
             loop without metrics (baseline); also as a share of a 20 Hz tick (50 ms)
    scrape   FleetCollector.collect + exposition for R robots x E finished episodes in a private
             redis-server (AOF on; data written through the real Ingest and its Lua script), against
             the raw pipelined Redis reads the collector makes (baseline: no parsing, no metrics)

    python bench/observability.py --quick --json bench/results/observability.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.buffer import ROBOTS_KEY, RobotKeys  # noqa: E402
from cloud.fleet_metrics import FleetCollector  # noqa: E402
from fleet import PROTOCOL_VERSION, metrics  # noqa: E402
from fleet.redis_server import start_redis  # noqa: E402
from fleet.types import Chunk, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step  # noqa: E402

SCHEMA = Schema((FeatureSpec("state", "float32", (39,)),), FeatureSpec("action", "float32", (4,)))
TASKS = ("reach the goal", "press the button from the top", "close the drawer")


def bench_tick(n: int) -> dict:
    series = metrics.EdgeSeries("bench-robot", TASKS)
    rng = np.random.default_rng(0)
    jitter = rng.uniform(0, 0.002, n).tolist()
    flags = (rng.random(n) < 0.3).tolist()

    def run(with_metrics: bool) -> float:
        acc = 0.0
        t0 = time.perf_counter()
        for i in range(n):
            t_inf = time.perf_counter()
            acc += jitter[i]
            if with_metrics:
                series.inference(time.perf_counter() - t_inf)
                series.step(TASKS[i % 3], flags[i], False, jitter[i])
        return (time.perf_counter() - t0) / n

    base = min(run(False) for _ in range(3))
    instrumented = min(run(True) for _ in range(3))
    cost = instrumented - base
    return {"baseline_us_per_tick": base * 1e6, "instrumented_us_per_tick": instrumented * 1e6,
            "metrics_us_per_tick": cost * 1e6, "ratio": instrumented / base, "share_of_20hz_tick": cost / 0.05}


async def fill(url: str, robots: int, episodes: int, steps: int) -> None:
    import redis.asyncio as aioredis

    from cloud.ingest import Ingest

    redis = aioredis.Redis.from_url(url)
    try:
        ingest = Ingest(redis)
        for r in range(robots):
            rid = f"bench-{r:04d}"
            await ingest.register(RobotInfo(rid, "bench-arm", SCHEMA, TASKS, PROTOCOL_VERSION))
            seq = 0
            for e in range(episodes):
                part = []
                for i in range(steps):
                    seq += 1
                    part.append(Step(seq=seq, index=i, observation={"state": np.zeros(39, np.float32)},
                                     policy_action=np.zeros(4, np.float32), action=np.zeros(4, np.float32),
                                     is_intervention=i < steps // 3 and e % 2 == 0, reward=0.0,
                                     success=i == steps - 1 and e % 3 == 0, done=i == steps - 1, policy_version=1,
                                     timestamp_s=time.time()))
                end = EpisodeSummary(e % 3 == 0, steps, steps // 3 if e % 2 == 0 else 0, int(e % 2 == 0),
                                     e % 4 == 0, 1)
                chunk = Chunk(rid, f"{rid}-{uuid.uuid4().hex[:8]}", TASKS[e % 3], part, episode_end=end,
                              evaluation=e % 4 == 0)
                await ingest.write(chunk)
            await redis.hset(RobotKeys(rid).status, mapping={"last_seen_s": time.time(), "policy_version": 1,
                                                             "spool_steps": 0, "spool_bytes": 0, "task": TASKS[0]})
    finally:
        await redis.aclose()


def raw_reads(client) -> None:
    ids = [k.decode() for k in client.hkeys(ROBOTS_KEY)]
    pipe = client.pipeline(transaction=False)
    for rid in ids:
        keys = RobotKeys(rid)
        pipe.hgetall(keys.status)
        pipe.hgetall(keys.stats)
        pipe.get(keys.seq)
        pipe.xrange(keys.events, min=f"{int((time.time() - 600) * 1000)}-0", max="+")
        pipe.hvals(keys.catalog)
    pipe.info("memory")
    pipe.execute()


def bench_scrape(robots: int, episodes: int, steps: int, repeats: int) -> dict:
    import redis
    from prometheus_client import CollectorRegistry, generate_latest

    with tempfile.TemporaryDirectory() as tmp:
        proc = start_redis(Path(tmp) / "redis")
        try:
            t0 = time.perf_counter()
            asyncio.run(fill(proc.url, robots, episodes, steps))
            fill_s = time.perf_counter() - t0
            client = redis.Redis.from_url(proc.url)
            registry = CollectorRegistry()
            FleetCollector(client, min_interval_s=0, buffer_interval_s=0).register(registry)
            scrape, base, size = [], [], 0
            for _ in range(repeats):
                t0 = time.perf_counter()
                size = len(generate_latest(registry))
                scrape.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                raw_reads(client)
                base.append(time.perf_counter() - t0)
            client.close()
        finally:
            proc.stop()
    med, bmed = statistics.median(scrape), statistics.median(base)
    return {"robots": robots, "episodes_per_robot": episodes, "steps_per_episode": steps, "fill_s": fill_s,
            "scrape_ms_median": med * 1e3, "raw_reads_ms_median": bmed * 1e3, "ratio": med / bmed,
            "exposition_bytes": size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute on 2 cores)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    ticks = 50_000 if args.quick else 300_000
    sizes = [(10, 20), (50, 40)] if args.quick else [(10, 50), (100, 100), (300, 100)]
    tick = bench_tick(ticks)
    print(f"tick: {tick['metrics_us_per_tick']:.2f} us of metrics per tick "
          f"({tick['instrumented_us_per_tick']:.2f} vs {tick['baseline_us_per_tick']:.2f} us baseline, "
          f"x{tick['ratio']:.1f}); {100 * tick['share_of_20hz_tick']:.4f}% of a 20 Hz tick")
    rows = [bench_scrape(r, e, 10, 5) for r, e in sizes]
    print(f"{'robots':>7} {'episodes':>9} {'scrape ms':>10} {'raw reads ms':>13} {'ratio':>6} {'bytes':>8}")
    for row in rows:
        print(f"{row['robots']:>7} {row['robots'] * row['episodes_per_robot']:>9} {row['scrape_ms_median']:>10.1f} "
              f"{row['raw_reads_ms_median']:>13.1f} {row['ratio']:>6.2f} {row['exposition_bytes']:>8}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                               "tick": tick, "scrape": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
