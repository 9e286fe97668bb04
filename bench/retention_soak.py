"""Soak: robots keep streaming camera episodes through a real gateway; Redis memory and the buffer stay
flat under retention, beside the same run without retention.

    with       `fleet gateway` (own process) with --retention.redis_max_bytes (Redis used_memory budget)
               and --retention.max_bytes (Redis + blob bytes), passes every second, frames in a local
               blob store
    without    the same workload against a fresh Redis and a gateway without budgets (the baseline:
               what happens today, growth until maxmemory)

Each run: ``--robots`` robots (threads, one gRPC stream each) send back-to-back episodes of
``--episode-steps`` steps (39-dim state, one 96x96 JPEG camera) at ``--hz`` steps/s each for ``--seconds``; Redis ``used_memory``,
the catalog's bytes and the blob store's bytes are sampled every 0.5 s. Prints a table, writes JSON and a
PNG (``--plot``).

    python bench/retention_soak.py --quick --json bench/results/retention_soak.json --plot docs/retention_soak.png
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_json  # noqa: E402
from cloud.blobstore import open_blob_store  # noqa: E402
from cloud.buffer.reader import BufferReader  # noqa: E402
from edge.client import FleetClient  # noqa: E402
from fleet import PROTOCOL_VERSION  # noqa: E402
from fleet.codec import encode_image  # noqa: E402
from fleet.convert import chunk_to_pb  # noqa: E402
from fleet.redis_server import free_port, start_redis  # noqa: E402
from fleet.types import Chunk, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step  # noqa: E402

TASK = "reach the goal"
SCHEMA = Schema((FeatureSpec("state", "float32", (39,)), FeatureSpec("cam", "uint8", (96, 96, 3), is_image=True)),
                FeatureSpec("action", "float32", (4,)))
CHUNK_STEPS = 25
ROOT = Path(__file__).resolve().parents[1]


def frames(n: int) -> list:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:96]
    out = []
    for t in range(n):
        img = np.stack([(x + t) % 256, (y * 2) % 256, np.full_like(x, 128)], -1).astype(np.uint8)
        img = np.clip(img + rng.integers(0, 8, img.shape), 0, 255).astype(np.uint8)
        out.append(encode_image(img, "jpeg"))
    return out


def episode_chunks(robot: str, eid: str, first_seq: int, steps: int, intervention: bool, imgs: list,
                   rng: np.random.Generator) -> list[Chunk]:
    out = []
    for start in range(0, steps, CHUNK_STEPS):
        n = min(CHUNK_STEPS, steps - start)
        rows = [Step(seq=first_seq + start + i, index=start + i,
                     observation={"state": rng.standard_normal(39).astype(np.float32)},  # compresses like real data
                     policy_action=np.zeros(4, np.float32), action=rng.standard_normal(4).astype(np.float32),
                     is_intervention=intervention, reward=0.0, success=False, done=start + i == steps - 1,
                     policy_version=1, timestamp_s=time.time(), images={"cam": imgs[(start + i) % len(imgs)]})
                for i in range(n)]
        end = None
        if start + n == steps:
            end = EpisodeSummary(success=False, num_steps=steps, intervention_steps=steps if intervention else 0,
                                 interventions=int(intervention), evaluation=False, policy_version=1)
        out.append(Chunk(robot, eid, TASK, rows, episode_end=end))
    return out


def robot_loop(target: str, robot: str, steps: int, hz: float, stop: threading.Event, counts: dict, imgs: list) -> None:
    client = FleetClient(target, rpc_timeout_s=30.0)
    client.register(RobotInfo(robot, "soak-arm", SCHEMA, (TASK,), PROTOCOL_VERSION, control_hz=30.0))
    seq, n = 0, 0
    rng = np.random.default_rng(abs(hash(robot)) % 2**32)

    def requests():
        nonlocal seq, n
        due = time.monotonic()
        while not stop.is_set():
            # every 5th episode has operator steps (the intervention tier, kept longest)
            for c in episode_chunks(robot, f"{robot}-{n}", seq + 1, steps, n % 5 == 0, imgs, rng):
                due += len(c.steps) / hz
                time.sleep(max(0.0, due - time.monotonic()))  # the robot's control rate
                yield chunk_to_pb(c, SCHEMA)
            seq += steps
            n += 1

    try:
        for ack in client.stream_experience(requests()):
            counts[robot] = ack.acked_seq
    finally:
        client.close()


def start_gateway(redis_url: str, tmp: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    import grpc

    port = free_port()
    log = open(tmp / "gateway.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "gateway", "--listen", f"127.0.0.1:{port}",
                             "--redis_url", redis_url, "--policy_dir", str(tmp / "policies"),
                             "--blob_url", str(tmp / "blobs"), *extra],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    log.close()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=180)
    channel.close()
    return proc, f"127.0.0.1:{port}"


def run(tmp: Path, args, retention: bool, imgs: list) -> dict:
    import redis

    redis_proc = start_redis(tmp / "redis")
    client = redis.Redis.from_url(redis_proc.url)
    empty = int(client.info("memory")["used_memory"])
    redis_budget = empty + args.redis_budget_mb * 1_000_000
    extra = ["--retention.redis_max_bytes", str(redis_budget), "--retention.max_bytes",
             str(args.buffer_budget_mb * 1_000_000), "--retention.interval_s", "1"] if retention else []
    gw, target = start_gateway(redis_proc.url, tmp, extra)
    reader = BufferReader(client, open_blob_store(str(tmp / "blobs")))
    stop, counts = threading.Event(), {}
    robots = [threading.Thread(target=robot_loop, args=(target, f"r{i}", args.episode_steps, args.hz, stop, counts, imgs),
                               daemon=True) for i in range(args.robots)]
    samples = []
    started = time.monotonic()
    for t in robots:
        t.start()
    try:
        while time.monotonic() - started < args.seconds:
            eps = reader.episodes()
            samples.append({"t_s": time.monotonic() - started, "used_memory": int(client.info("memory")["used_memory"]),
                            "redis_bytes": sum(e.redis_bytes for e in eps), "blob_bytes": sum(e.blob_bytes for e in eps),
                            "episodes": len(eps), "acked_steps": sum(counts.values())})
            time.sleep(0.5)  # sampling interval of the soak, not a wait for an event
    finally:
        stop.set()
        for t in robots:
            t.join(30)
        gw.terminate()
        gw.wait(30)
        redis_proc.kill()
    half = [s for s in samples if s["t_s"] >= args.seconds / 2]
    slope = np.polyfit([s["t_s"] for s in half], [s["used_memory"] for s in half], 1)[0] if len(half) > 2 else 0.0
    return {"retention": retention, "empty_used_memory": empty, "redis_budget": redis_budget if retention else 0,
            "buffer_budget": args.buffer_budget_mb * 1_000_000 if retention else 0,
            "acked_steps": samples[-1]["acked_steps"], "steps_per_s": samples[-1]["acked_steps"] / samples[-1]["t_s"],
            "max_used_memory": max(s["used_memory"] for s in samples), "final_used_memory": samples[-1]["used_memory"],
            "used_memory_slope_second_half_bytes_per_s": float(slope), "samples": samples}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results["runs"].items():
        ts = [s["t_s"] for s in r["samples"]]
        ax1.plot(ts, [s["used_memory"] / 1e6 for s in r["samples"]], label=name)
        ax2.plot(ts, [(s["redis_bytes"] + s["blob_bytes"]) / 1e6 for s in r["samples"]], label=name)
    with_ = results["runs"]["with retention"]
    ax1.axhline(with_["redis_budget"] / 1e6, ls="--", c="gray", label="redis_max_bytes")
    ax2.axhline(with_["buffer_budget"] / 1e6, ls="--", c="gray", label="max_bytes")
    ax1.set(xlabel="s", ylabel="MB", title="Redis used_memory")
    ax2.set(xlabel="s", ylabel="MB", title="buffer: Redis + blob bytes (catalog)")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--robots", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--episode-steps", type=int, default=100)
    parser.add_argument("--hz", type=float, default=150.0, help="steps per second per robot (5x a 30 Hz arm)")
    parser.add_argument("--redis-budget-mb", type=int, default=2, help="Redis used_memory budget above empty")
    parser.add_argument("--buffer-budget-mb", type=int, default=10, help="Redis + blob bytes budget")
    parser.add_argument("--quick", action="store_true", help="40 s per run")
    parser.add_argument("--json", default="")
    parser.add_argument("--plot", default="")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 40.0
    imgs = frames(30)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "args": vars(args), "runs": {}}
    for name, retention in (("without retention", False), ("with retention", True)):
        with tempfile.TemporaryDirectory(prefix="fleet-soak-") as tmp:
            results["runs"][name] = run(Path(tmp), args, retention, imgs)
    print(f"{args.robots} robots streaming {args.seconds:.0f} s each run; machine loaded (2 cores shared): "
          "compare within this run")
    print(f"{'run':<20}{'steps/s':>9}{'used_memory max':>17}{'final':>10}{'slope 2nd half':>16}{'budget':>10}")
    for name, r in results["runs"].items():
        print(f"{name:<20}{r['steps_per_s']:>9.0f}{r['max_used_memory'] / 1e6:>15.2f}MB"
              f"{r['final_used_memory'] / 1e6:>8.2f}MB{r['used_memory_slope_second_half_bytes_per_s'] / 1e3:>12.1f}KB/s"
              f"{(r['redis_budget'] / 1e6 if r['redis_budget'] else float('nan')):>8.2f}MB")
    write_json(args.json, results)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
