"""Capacity planning numbers (docs/deploy.md) and the issue-14 storage targets, each beside a baseline
measured in the same run.

    redis B/step      Redis used_memory growth per stored step (chunk elements, label runs, catalog),
                      beside the raw array bytes of the step (state + action + policy action):
                      target <= 1.5x for the low-dim robot (39-d state, 4-d action)
    blob B/step       object-store bytes per step (3 cameras: one object per chunk and camera)
    GB/robot-hour     Redis and object-store bytes per robot-hour at --hz
    gateway           one `fleet gateway` process (blob store: a local directory, fsync per put) fed by
                      one streaming client; acked steps per second and per gateway CPU-second
                      (= per core): target >= 400 steps/s per core with 3 cameras 224x224 JPEG; the
                      state-only robot is the baseline
    restart           a fresh index over 1M buffered steps (what a restarted trainer builds): seconds
                      until it can sample, target <= 5 s; beside it the time to read every element once
                      (the O(whole buffer) cost a step-by-step index had)

    python bench/capacity.py --quick --json bench/results/capacity.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ingest import cpu_s  # noqa: E402
from bench.report import write_json  # noqa: E402

from cloud.blobstore import open_blob_store  # noqa: E402
from cloud.buffer import SOURCE_ONLINE  # noqa: E402
from cloud.buffer.writer import BufferWriter  # noqa: E402
from cloud.ingest import Ingest  # noqa: E402
from fleet import PROTOCOL_VERSION  # noqa: E402
from fleet.codec import encode_image  # noqa: E402
from fleet.columns import ColumnChunk, Columns, schema_hash  # noqa: E402
from fleet.convert import columns_to_pb  # noqa: E402
from fleet.redis_client import connect, connect_async  # noqa: E402
from fleet.redis_server import free_port, start_redis  # noqa: E402
from fleet.types import FeatureSpec, RobotInfo, Schema  # noqa: E402

CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")
TASK = "fold the towel"
CHUNK = 30  # one second of steps at 30 Hz: the streamer's flush


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
    """Schema and a chunk factory: 'lowdim' (39-d state, 4-d action) or 'cameras' (the same + 3 JPEG cameras)."""
    images = () if kind == "lowdim" else tuple(FeatureSpec(c, "uint8", (height, width, 3), is_image=True)
                                              for c in CAMERAS)
    schema = Schema((FeatureSpec("state", "float32", (39,)), *images), FeatureSpec("action", "float32", (4,)))
    rng = np.random.default_rng(0)
    frames = {} if kind == "lowdim" else {
        c: [encode_image(camera_frame(height, width, t, i, rng), "jpeg", quality=90).data for t in range(CHUNK)]
        for i, c in enumerate(CAMERAS)}

    def columns(first_seq: int, n: int = CHUNK) -> Columns:
        t = np.arange(first_seq, first_seq + n)
        return Columns(first_seq=first_seq, observation={"state": rng.normal(size=(n, 39)).astype(np.float32)},
                       action=rng.uniform(-1, 1, (n, 4)).astype(np.float32),
                       policy_action=rng.uniform(-1, 1, (n, 4)).astype(np.float32), reward=np.zeros(n, np.float32),
                       timestamp_s=1.7e9 + t / 30.0, policy_version=np.ones(n, np.uint64), intervention=t % 5 == 0,
                       success=np.zeros(n, bool), done=np.zeros(n, bool),
                       frames={c: [f[(first_seq + k) % CHUNK] for k in range(n)] for c, f in frames.items()},
                       encodings={c: "jpeg" for c in frames}, help=np.zeros(n, np.float32))

    return schema, columns


def raw_bytes(schema: Schema) -> int:
    """The step's array bytes: low-dim observation, action and policy action."""
    low = sum(int(np.prod(f.shape)) * 4 for f in schema.observation if not f.is_image)
    return low + 2 * int(np.prod(schema.action.shape)) * 4


def storage_per_step(url: str, blob_dir: Path, schema: Schema, columns, robot_id: str, n_steps: int) -> dict:
    """Bytes per step once the robot is registered and its episode started (fixed costs left out)."""
    sync = connect(url)
    blobs = open_blob_store(str(blob_dir))
    info = RobotInfo(robot_id, "bench", schema, (TASK,), PROTOCOL_VERSION)
    digest = schema_hash(schema)

    async def write(first_seqs) -> None:
        redis = connect_async(url)
        ingest = Ingest(redis, blobs=blobs)
        await ingest.register(info)
        for first in first_seqs:
            await ingest.store(ColumnChunk(robot_id, "e1", TASK, digest, columns(first)), info)
        await redis.aclose()

    asyncio.run(write([1]))
    sync.execute_command("MEMORY", "PURGE")
    before = int(sync.info("memory")["used_memory"])
    blob_before = sum(f.stat().st_size for f in blob_dir.rglob("*") if f.is_file())
    asyncio.run(write(range(1 + CHUNK, n_steps + 1, CHUNK)))
    stored = (n_steps // CHUNK - 1) * CHUNK
    redis_b = (int(sync.info("memory")["used_memory"]) - before) / stored
    blob_b = (sum(f.stat().st_size for f in blob_dir.rglob("*") if f.is_file()) - blob_before) / stored
    sync.close()
    return {"redis_bytes_per_step": redis_b, "blob_bytes_per_step": blob_b}


def gateway_rate(url: str, tmp: Path, schema: Schema, columns, robot_id: str, duration_s: float) -> dict:
    """One `fleet gateway` process; acked steps per second and per gateway CPU-second."""
    import grpc

    from edge.client import FleetClient

    port = free_port()
    with open(tmp / f"gateway-{robot_id}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "gateway", "--listen", f"127.0.0.1:{port}",
                                 "--redis_url", url, "--blob_url", str(tmp / f"blobs-{robot_id}"),
                                 "--policy_dir", str(tmp / "policies")],
                                stdout=log, stderr=subprocess.STDOUT, cwd=str(Path(__file__).resolve().parents[1]))
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=180)
        channel.close()
        client = FleetClient(f"127.0.0.1:{port}")
        client.register(RobotInfo(robot_id, "bench", schema, (TASK,), PROTOCOL_VERSION))
        digest = schema_hash(schema)
        msg = columns_to_pb(ColumnChunk(robot_id, "e1", TASK, digest, columns(1)))
        deadline = time.perf_counter() + duration_s

        def requests():  # pre-built columns (the edge's cost is not the gateway's); seqs advance
            first = 1
            while time.perf_counter() < deadline:
                msg.first_seq = first
                yield msg
                first += CHUNK

        cpu0, t0 = cpu_s(proc.pid), time.perf_counter()
        acked = 0
        for ack in client.stream_experience(requests()):
            acked = ack.acked_seq
        elapsed, cpu = time.perf_counter() - t0, cpu_s(proc.pid) - cpu0
        client.close()
        return {"gateway_steps_per_s": acked / elapsed, "gateway_steps_per_core_s": acked / cpu,
                "gateway_cpu_us_per_step": cpu / acked * 1e6}
    finally:
        proc.terminate()
        proc.wait(30)


def restart_index(url: str, n_steps: int) -> dict:
    """Write ``n_steps`` operator-labelled low-dim steps (1000-step episodes), then time a fresh index."""
    from cloud.sampler import Sampler

    schema, columns = robot("lowdim", 0, 0)

    async def fill() -> None:
        redis = connect_async(url)
        ingest = Ingest(redis)
        writer = BufferWriter(redis)
        await ingest.register(RobotInfo("restart", "bench", schema, (TASK,), PROTOCOL_VERSION))
        seq = 1
        for e in range(n_steps // 1000):
            for k in range(4):  # 4 chunks of 250 steps per episode
                cols = columns(seq, 250)
                cols.intervention[:] = True
                await writer.write("restart", f"ep{e}", TASK, cols, schema, source=SOURCE_ONLINE,
                                   labels=cols.intervention, gap_declared=False, evaluation=False,
                                   episode_end=None, now_s=time.time())
                seq += 250
        await redis.aclose()

    asyncio.run(fill())
    client = connect(url)
    t0 = time.perf_counter()
    sampler = Sampler(client, (TASK,), horizon=10, batch_size=64, online_fraction=1.0)
    indexed = sampler.refresh()
    sampler.sample()
    ready_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # the baseline: every element read once (what rebuilding from the data costs)
    total = 0
    for e in range(n_steps // 1000):
        total += sum(len(x) for x in client.lrange(f"fleet:{{r:restart}}:ep:ep{e}", 0, -1))
    read_all_s = time.perf_counter() - t0
    client.close()
    return {"restart_steps": indexed, "index_ready_s": ready_s, "read_all_elements_s": read_all_s,
            "buffer_mb": total / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, 3 s per throughput measurement")
    parser.add_argument("--hz", type=float, default=30.0, help="control rate of the robot, steps per second")
    parser.add_argument("--height", type=int, default=224, help="camera height, pixels")
    parser.add_argument("--width", type=int, default=224, help="camera width, pixels")
    parser.add_argument("--restart-steps", type=int, default=1_000_000, help="steps buffered for the restart test")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    n_steps, duration_s = (1500, 3.0) if args.quick else (6000, 10.0)
    results: dict = {"hz": args.hz, "load_average_1m": os.getloadavg()[0], "cpu_count": os.cpu_count(),
                     "camera": f"{args.height}x{args.width} JPEG q90 x{len(CAMERAS)}", "robots": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        redis = start_redis(tmp / "redis")
        try:
            for kind in ("lowdim", "cameras"):
                schema, columns = robot(kind, args.height, args.width)
                r = storage_per_step(redis.url, tmp / f"store-{kind}", schema, columns, f"mem-{kind}",
                                     n_steps * (10 if kind == "lowdim" else 1))
                r.update(gateway_rate(redis.url, tmp, schema, columns, f"gw-{kind}", duration_s))
                r["raw_array_bytes_per_step"] = raw_bytes(schema)
                r["redis_vs_raw"] = r["redis_bytes_per_step"] / r["raw_array_bytes_per_step"]
                r["redis_gb_per_robot_hour"] = r["redis_bytes_per_step"] * args.hz * 3600 / 1e9
                r["blob_gb_per_robot_hour"] = r["blob_bytes_per_step"] * args.hz * 3600 / 1e9
                r["robots_per_gateway_core"] = r["gateway_steps_per_core_s"] / args.hz
                results["robots"][kind] = r
            connect(redis.url).flushall()
            results["restart"] = restart_index(redis.url, args.restart_steps)
        finally:
            redis.kill()
    print(f"{'robot':8} {'raw B/step':>10} {'Redis B/step':>12} {'x raw':>6} {'blob B/step':>11} "
          f"{'Redis GB/robot-h':>16} {'blob GB/robot-h':>15} {'gw steps/s':>10} {'per core':>9} {'robots/core':>11}")
    for kind, r in results["robots"].items():
        print(f"{kind:8} {r['raw_array_bytes_per_step']:10d} {r['redis_bytes_per_step']:12.0f} "
              f"{r['redis_vs_raw']:6.2f} {r['blob_bytes_per_step']:11.0f} {r['redis_gb_per_robot_hour']:16.3f} "
              f"{r['blob_gb_per_robot_hour']:15.2f} {r['gateway_steps_per_s']:10.0f} "
              f"{r['gateway_steps_per_core_s']:9.0f} {r['robots_per_gateway_core']:11.1f}")
    rs = results["restart"]
    print(f"restart: {rs['restart_steps']} steps buffered ({rs['buffer_mb']:.0f} MB of elements): index ready and "
          f"first batch in {rs['index_ready_s']:.2f} s (target <= 5 s); reading every element once takes "
          f"{rs['read_all_elements_s']:.2f} s")
    print("targets (issue 14): Redis <= 1.5x raw array bytes per low-dim step (main: 990 B for 217 B on the wire); "
          "gateway >= 400 steps/s per core with 3 cameras 224x224 JPEG (main: 104)")
    print(f"{os.cpu_count()} CPUs, load average {results['load_average_1m']:.1f} at the start (shared machine)")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
