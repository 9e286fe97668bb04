"""Export throughput and ROS 2 conversion cost, beside limits measured in the same run.

    read        the limit: read + decode every selected step from Redis (what any export must do)
    rosbag2     fleet export --format rosbag2 (MCAP; images passed through as stored)
    lerobot     fleet export --format lerobot (images decoded, written by LeRobot as PNG in parquet),
                beside LeRobot's own writer fed the same frames from memory (its limit)
    ros2 sync   per synchronised observation on the edge: a sensor_msgs/JointState + one 480x640
                CompressedImage (JPEG) through Ros2Bridge (approximate-time match, joint reorder,
                JPEG decode), beside a bare Pillow decode of the same JPEG (the limit)

Steps: 39 float32 state, 4 float32 action, one 96x128 JPEG camera frame.

    python bench/export.py --quick --json bench/results/export.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_json  # noqa: E402

from cloud.export import ExportFilter, iter_steps, select_episodes  # noqa: E402
from cloud.ingest import Ingest  # noqa: E402
from fleet import PROTOCOL_VERSION  # noqa: E402
from fleet.codec import encode_image  # noqa: E402
from fleet.redis_server import start_redis  # noqa: E402
from fleet.types import Chunk, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step  # noqa: E402

SCHEMA = Schema((FeatureSpec("state", "float32", (39,)), FeatureSpec("cam", "uint8", (96, 128, 3), is_image=True)),
                FeatureSpec("action", "float32", (4,)))


def frame(t: int) -> np.ndarray:
    y, x = np.mgrid[0:96, 0:128]
    return np.stack([(x * 2 + t) % 256, (y * 2) % 256, np.full_like(x, 90)], axis=-1).astype(np.uint8)


async def fill(url: str, episodes: int, steps: int) -> None:
    import redis.asyncio as aioredis

    redis = aioredis.Redis.from_url(url)
    ingest = Ingest(redis)
    seq = await ingest.register(RobotInfo("bench-arm", "bench", SCHEMA, ("task",), PROTOCOL_VERSION))
    rng = np.random.default_rng(0)
    assert steps <= 1024, "one chunk per episode"
    for e in range(episodes):
        chunk = []
        for t in range(steps):
            seq += 1
            a = rng.normal(size=4).astype(np.float32)
            image = {"cam": encode_image(frame(t), "jpeg")}
            chunk.append(Step(seq, t, {"state": rng.normal(size=39).astype(np.float32)}, a, a, t % 5 == 0, 0.0,
                              False, t == steps - 1, 1, 1.7e9 + e * 100 + t / 20, image))
        end = EpisodeSummary(False, steps, 0, 0, False, 1)
        await ingest.write(Chunk("bench-arm", f"ep{e}-{uuid.uuid4().hex[:6]}", "task", chunk, episode_end=end))
    await redis.aclose()


def lerobot_writer_alone(root: Path, episodes: list[list[dict]]) -> None:
    """LeRobot's own writer fed frames already in memory: the limit of a LeRobotDataset export."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from cloud.export.lerobot import lerobot_features

    dataset = LeRobotDataset.create("bench/alone", fps=20, features=lerobot_features(SCHEMA, False), root=root,
                                    use_videos=False)
    for frames in episodes:
        for f in frames:
            dataset.add_frame(dict(f))
        dataset.save_episode()
    dataset.finalize()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_ros(n: int) -> dict:
    from PIL import Image

    from fleet import ros2_convert as convert
    from edge.robots.ros2.config import load_config
    from edge.robots.ros2.robot import Ros2Bridge

    types = convert.RosbagsTypes()
    store = types.typestore
    names = [f"j{i}" for i in range(7)]
    cfg = load_config({"joint_names": names, "cameras": {"front": {"topic": "/c", "height": 480, "width": 640,
                                                                   "compressed": True}}})
    bridge = Ros2Bridge(cfg)
    big = np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    msgs = []
    for k in range(n):
        ns = 10**9 + k * 33_000_000
        js = convert.joint_state_msg(types, names[::-1], np.arange(7.0), ns)
        cam = convert.compressed_image_msg(types, jpeg, "jpeg", ns + 2_000_000)
        msgs.append((store.deserialize_cdr(store.serialize_cdr(js, convert.JOINT_STATE), convert.JOINT_STATE),
                     store.deserialize_cdr(store.serialize_cdr(cam, convert.COMPRESSED_IMAGE),
                                           convert.COMPRESSED_IMAGE)))
    t_bridge = timed(lambda: [(bridge.on_joint_state(js), bridge.on_image("front", cam)) for js, cam in msgs])
    assert bridge.wait_observation(0, 1.0) is not None and bridge.bad_messages == 0
    t_decode = timed(lambda: [np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) for _ in range(n)])
    return {"ros2_obs_ms": 1e3 * t_bridge / n, "jpeg_decode_ms": 1e3 * t_decode / n,
            "ros2_ratio_to_decode": t_decode / t_bridge}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 episodes x 100 steps (else 40 x 200)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    episodes, steps = (8, 100) if args.quick else (40, 200)
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_redis(Path(tmp) / "redis")
        try:
            import redis

            asyncio.run(fill(proc.url, episodes, steps))
            client = redis.Redis.from_url(proc.url)
            refs = select_episodes(client, ExportFilter())
            total = sum(r.length for r in refs)
            t_read = timed(lambda: [s for r in refs for s in iter_steps(client, r)])
            from rosbags.rosbag2 import Writer  # noqa: F401  (imports outside the timing)
            from rosbags.typesys import Stores, get_typestore

            from cloud.export.rosbag2 import export_rosbag2

            get_typestore(Stores.ROS2_JAZZY)

            t_bag = timed(lambda: export_rosbag2(client, Path(tmp) / "bag", ExportFilter()))
            bag_mb = sum(f.stat().st_size for f in (Path(tmp) / "bag").rglob("*") if f.is_file()) / 1e6
            from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: F401  (import outside timing)

            from cloud.export.lerobot import export_lerobot, frame_of

            t_lr = timed(lambda: export_lerobot(client, Path(tmp) / "ds", ExportFilter()))
            frames = [[frame_of(s, SCHEMA, r.task) for s in iter_steps(client, r)] for r in refs]
            t_writer = timed(lambda: lerobot_writer_alone(Path(tmp) / "ds2", frames))
        finally:
            proc.kill()
    result = {"steps": total, "read_steps_per_s": total / t_read, "rosbag2_steps_per_s": total / t_bag,
              "rosbag2_mb": bag_mb, "lerobot_steps_per_s": total / t_lr,
              "lerobot_writer_alone_steps_per_s": total / t_writer, "lerobot_ratio_to_writer": t_writer / t_lr,
              "rosbag2_ratio_to_read": t_read / t_bag, "lerobot_ratio_to_read": t_read / t_lr,
              **bench_ros(30 if args.quick else 200),
              "hardware": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}"}
    print(f"{'path':<22}{'steps/s':>10}{'x read':>9}")
    print(f"{'read (limit)':<22}{result['read_steps_per_s']:>10.0f}{1.0:>9.2f}")
    print(f"{'export rosbag2':<22}{result['rosbag2_steps_per_s']:>10.0f}{result['rosbag2_ratio_to_read']:>9.2f}")
    print(f"{'export lerobot':<22}{result['lerobot_steps_per_s']:>10.0f}{result['lerobot_ratio_to_read']:>9.2f}"
          f"   ({result['lerobot_ratio_to_writer']:.2f}x LeRobot's writer alone: "
          f"{result['lerobot_writer_alone_steps_per_s']:.0f} steps/s)")
    print(f"ros2 synced observation (JointState + 480x640 JPEG): {result['ros2_obs_ms']:.2f} ms; "
          f"bare JPEG decode {result['jpeg_decode_ms']:.2f} ms (ratio {result['ros2_ratio_to_decode']:.2f})")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
