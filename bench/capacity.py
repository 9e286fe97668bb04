"""Capacity planning numbers (docs/deploy.md): bytes per step, Redis memory per robot-hour, gateway
throughput, for a typical robot (SOP-like: two 7-DoF arms, 3 RGB cameras, 30 Hz, JPEG q90) against
a state-only robot measured in the same run (the baseline; ratios in the table).

    bytes/step       one fleet.v1.Step as stored in Redis (protobuf, JPEG frames inside)
    redis B/step     Redis used_memory growth per stored step (list element + labeled index overhead)
    GB/robot-hour    redis B/step * hz * 3600
    gateway steps/s  one real gateway (grpc.aio on loopback, validation incl. JPEG decode, atomic Lua
                     write to a real redis-server), one streaming client, acked steps per second
    robots/gateway   gateway steps/s / hz (CPU-bound here: client, gateway and Redis share the machine)

Camera frames are synthetic (smooth background, moving shapes, sensor noise): JPEG size depends on
content, so treat bytes/step as an estimate and measure your own cameras with --height/--width.

    python bench/capacity.py --quick --json bench/results/capacity.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_json  # noqa: E402

from cloud.ingest import Ingest  # noqa: E402
from fleet import PROTOCOL_VERSION  # noqa: E402
from fleet.codec import encode_image  # noqa: E402
from fleet.config import GatewayConfig  # noqa: E402
from fleet.convert import chunk_to_pb, encode_step  # noqa: E402
from fleet.redis_client import connect, connect_async  # noqa: E402
from fleet.redis_server import start_redis  # noqa: E402
from fleet.types import Chunk, FeatureSpec, RobotInfo, Schema, Step  # noqa: E402

CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")
TASK = "fold the towel"


def camera_frame(height: int, width: int, t: int, cam: int, rng: np.random.Generator) -> np.ndarray:
    """A synthetic camera frame: gradient background, moving rectangles, sensor noise (sigma 4)."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * 255 // width), (y * 255 // height), np.full_like(x, 60 + 40 * cam)], axis=-1)
    for k in range(4):
        cy = int((0.2 + 0.2 * k) * height + 10 * np.sin((t + 7 * k) / 15))
        cx = int((0.15 + 0.2 * k) * width + 12 * np.cos((t + 3 * k) / 20))
        img[max(cy - height // 10, 0):cy + height // 10, max(cx - width // 12, 0):cx + width // 12] = \
            (50 * k + 30, 200 - 40 * k, 90 + 30 * k)
    img = img + rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def robot(kind: str, height: int, width: int) -> tuple[Schema, callable]:
    """Schema and a step factory: 'cameras' (3 JPEG cameras) or 'state' (the baseline)."""
    images = () if kind == "state" else tuple(FeatureSpec(c, "uint8", (height, width, 3), is_image=True)
                                             for c in CAMERAS)
    schema = Schema((FeatureSpec("state", "float32", (14,)), *images), FeatureSpec("action", "float32", (14,)))
    rng = np.random.default_rng(0)
    frames = {} if kind == "state" else {
        (c, t): encode_image(camera_frame(height, width, t, i, rng), "jpeg", quality=90)
        for i, c in enumerate(CAMERAS) for t in range(30)}

    def step(seq: int) -> Step:
        return Step(seq=seq, index=seq - 1, observation={"state": rng.normal(size=14).astype(np.float32)},
                    policy_action=rng.normal(size=14).astype(np.float32), action=rng.normal(size=14).astype(np.float32),
                    is_intervention=seq % 5 == 0, reward=0.0, success=False, done=False, policy_version=1,
                    timestamp_s=time.time(), images={c: frames[(c, seq % 30)] for c in CAMERAS if frames})

    return schema, step


def redis_bytes_per_step(url: str, schema: Schema, make_step, robot_id: str, n_steps: int) -> float:
    sync = connect(url)
    sync.execute_command("MEMORY", "PURGE")
    before = int(sync.info("memory")["used_memory"])

    async def write() -> None:
        redis = connect_async(url)
        ingest = Ingest(redis)
        await ingest.register(RobotInfo(robot_id, "bench", schema, (TASK,), PROTOCOL_VERSION))
        for first in range(1, n_steps + 1, 30):
            steps = [make_step(s) for s in range(first, min(first + 30, n_steps + 1))]
            await ingest.write(Chunk(robot_id, "e1", TASK, steps))
        await redis.aclose()

    asyncio.run(write())
    return (int(sync.info("memory")["used_memory"]) - before) / n_steps


def gateway_steps_per_s(url: str, policy_dir: str, schema: Schema, make_step, robot_id: str,
                        duration_s: float) -> float:
    from cloud.gateway.server import start_gateway
    from edge.client import FleetClient

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gw = asyncio.run_coroutine_threadsafe(start_gateway(GatewayConfig(
        listen="127.0.0.1:0", redis_url=url, policy_dir=policy_dir)), loop).result(30)
    client = FleetClient(f"127.0.0.1:{gw.port}")
    try:
        client.register(RobotInfo(robot_id, "bench", schema, (TASK,), PROTOCOL_VERSION))
        t0 = time.perf_counter()
        acked = 0
        deadline = t0 + duration_s

        def requests():  # built as sent: the client's encoding shares the CPU, as on one host
            first = 1
            while time.perf_counter() < deadline:
                yield chunk_to_pb(Chunk(robot_id, "e1", TASK, [make_step(s) for s in range(first, first + 30)]),
                                  schema)
                first += 30

        for ack in client.stream_experience(requests()):
            acked = ack.acked_seq
        return acked / (time.perf_counter() - t0)
    finally:
        client.close()
        asyncio.run_coroutine_threadsafe(gw.stop(0.5), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def validate_ms_per_step(schema: Schema, make_step, n: int = 30) -> float:
    """CPU time of the gateway's per-step validation (JPEG frames are fully decoded), one core."""
    from cloud.ingest import validate_step

    steps = [make_step(s) for s in range(1, n + 1)]
    t0 = time.process_time()
    for step in steps:
        validate_step(step, schema, "bench")
    return (time.process_time() - t0) / n * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, 3 s per throughput measurement")
    parser.add_argument("--hz", type=float, default=30.0, help="control rate of the robot, steps per second")
    parser.add_argument("--height", type=int, default=480, help="camera height, pixels")
    parser.add_argument("--width", type=int, default=640, help="camera width, pixels")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    n_steps, duration_s = (300, 3.0) if args.quick else (1800, 10.0)
    results: dict = {"hz": args.hz, "load_average_1m": os.getloadavg()[0], "camera": f"{args.height}x{args.width} JPEG q90 x{len(CAMERAS)}",
                     "cpu_count": os.cpu_count(), "robots": {}}
    with tempfile.TemporaryDirectory() as tmp:
        redis = start_redis(Path(tmp) / "redis")
        try:
            for kind in ("state", "cameras"):
                schema, make_step = robot(kind, args.height, args.width)
                step_bytes = len(encode_step(make_step(1), schema))
                per_step = redis_bytes_per_step(redis.url, schema, make_step, f"mem-{kind}", n_steps)
                steps_s = gateway_steps_per_s(redis.url, str(Path(tmp) / "policies"), schema, make_step,
                                              f"gw-{kind}", duration_s)
                validate_ms = validate_ms_per_step(schema, make_step)
                results["robots"][kind] = {
                    "validate_cpu_ms_per_step": round(validate_ms, 3),
                    "robots_per_core_validation_bound": round(1e3 / (validate_ms * args.hz), 1),
                    "bytes_per_step": step_bytes, "redis_bytes_per_step": round(per_step, 1),
                    "mb_per_s_per_robot": round(step_bytes * args.hz / 1e6, 3),
                    "gb_per_robot_hour": round(per_step * args.hz * 3600 / 1e9, 3),
                    "gateway_steps_per_s": round(steps_s, 1),
                    "gateway_mb_per_s": round(steps_s * step_bytes / 1e6, 2),
                    "robots_per_gateway": round(steps_s / args.hz, 1)}
        finally:
            redis.kill()
    base, cam = results["robots"]["state"], results["robots"]["cameras"]
    results["ratio_cameras_vs_state"] = {k: round(cam[k] / base[k], 3) for k in base if base[k]}
    print(f"{'robot':10} {'B/step':>9} {'redis B/step':>13} {'MB/s/robot':>11} {'GB/robot-h':>11} "
          f"{'gw steps/s':>11} {'gw MB/s':>8} {'robots/gw':>10}")
    for kind, r in results["robots"].items():
        print(f"{kind:10} {r['bytes_per_step']:>9} {r['redis_bytes_per_step']:>13} {r['mb_per_s_per_robot']:>11} "
              f"{r['gb_per_robot_hour']:>11} {r['gateway_steps_per_s']:>11} {r['gateway_mb_per_s']:>8} "
              f"{r['robots_per_gateway']:>10}")
    print("validation CPU ms/step:", {k: r["validate_cpu_ms_per_step"] for k, r in results["robots"].items()},
          "-> robots per core (validation alone):",
          {k: r["robots_per_core_validation_bound"] for k, r in results["robots"].items()})
    print("cameras / state:", results["ratio_cameras_vs_state"])
    print(f"{os.cpu_count()} CPUs, load average {results['load_average_1m']:.1f} at the start (shared machines: "
          "throughput is a lower bound)")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
