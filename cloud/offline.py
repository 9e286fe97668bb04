"""Seed the buffer's offline part: episodes given by the caller (scripted demonstrations come from
``edge/sim/demos.py``), or a LeRobotDataset on disk.

Offline data goes through the same validated, exactly-once write as robot
data, under a robot id of its own registered with ``source=offline``; the
sampler treats every offline step as a label.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import numpy as np

from cloud.buffer import SOURCE_OFFLINE
from cloud.ingest import Ingest
from fleet import PROTOCOL_VERSION
from fleet.names import to_id
from fleet.redis_client import connect_async
from fleet.types import Chunk, EpisodeSummary, RobotInfo, Step

log = logging.getLogger(__name__)


async def write_episodes(redis_url: str, robot_id: str, episodes, schema, tasks, embodiment: str = "metaworld-sawyer",
                 control_hz: float = 0.0) -> int:
    """Write ``(task, steps, summary)`` episodes under the offline robot ``robot_id``; returns steps stored."""
    redis = connect_async(redis_url)
    try:
        ingest = Ingest(redis, source=SOURCE_OFFLINE)
        seq = await ingest.register(RobotInfo(robot_id=robot_id, embodiment=embodiment, schema=schema,
                                              tasks=tuple(tasks), protocol_version=PROTOCOL_VERSION,
                                              control_hz=control_hz))
        written = 0
        for task, steps, summary in episodes:
            episode_id = f"{robot_id}-{uuid.uuid4().hex[:12]}"
            for start in range(0, len(steps), 256):
                part = steps[start:start + 256]
                for s in part:
                    seq += 1
                    s.seq = seq
                chunk = Chunk(robot_id=robot_id, episode_id=episode_id, task=task, steps=part,
                              episode_end=summary if part[-1].done else None)
                result = await ingest.write(chunk)
                written += result.stored_steps
        return written
    finally:
        await redis.aclose()


def _feature_name(key: str) -> str:
    """LeRobot key -> fleet feature name: observation.state -> state, observation.images.top -> top."""
    return key.removeprefix("observation.").removeprefix("images.")


def lerobot_dataset_episodes(root: str, repo_id: str = "", success: bool = True):
    """Read a LeRobotDataset from a local directory (no hub): (schema, tasks, episodes, fps) for the buffer.

    ``observation.*`` features become observation features named without the prefix (images stay images,
    PNG-encoded), ``action`` the action. Episodes count as successful (demonstrations) unless the dataset
    has ``next.success``; rewards come from ``next.reward`` when present."""
    from pathlib import Path

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from fleet.codec import encode_image
    from fleet.errors import ConfigError
    from fleet.types import FeatureSpec, Schema

    path = Path(root).expanduser()
    if not (path / "meta" / "info.json").is_file():
        raise ConfigError(f"{root!r} is not a LeRobotDataset directory (no meta/info.json); the hub is not used")
    dataset = LeRobotDataset(repo_id or f"local/{path.name}", root=path)
    feats = dataset.meta.features
    if "action" not in feats:
        raise ConfigError(f"LeRobotDataset {root!r} has no 'action' feature")
    obs_keys = [k for k in feats if k.startswith("observation.")]
    images = {k for k in obs_keys if feats[k]["dtype"] in ("image", "video")}
    specs = tuple(FeatureSpec(_feature_name(k), "uint8" if k in images else "float32",
                              tuple(feats[k]["shape"]), is_image=k in images) for k in obs_keys)
    schema = Schema(specs, FeatureSpec("action", "float32", tuple(feats["action"]["shape"])))
    episodes, current, current_task = [], [], ""

    def close() -> None:
        if current:
            current[-1].done = True
            ok = bool(current[-1].success) if "next.success" in feats else success
            current[-1].success = ok
            episodes.append((current_task, list(current), EpisodeSummary(
                success=ok, num_steps=len(current), intervention_steps=0, interventions=0, evaluation=False,
                policy_version=0)))
            current.clear()

    episode_index = -1
    for i in range(len(dataset)):
        frame = dataset[i]
        if current and int(frame["episode_index"]) != episode_index:
            close()
        episode_index, current_task = int(frame["episode_index"]), str(frame["task"])
        obs, imgs = {}, {}
        for key in obs_keys:
            value = frame[key].numpy()
            if key in images:  # (C, H, W) floats in [0, 1] -> (H, W, C) uint8
                imgs[_feature_name(key)] = encode_image(np.clip(np.moveaxis(value, 0, -1) * 255 + 0.5, 0, 255)
                                                        .astype(np.uint8))
            else:
                obs[_feature_name(key)] = value.astype(np.float32)
        action = frame["action"].numpy().astype(np.float32)
        current.append(Step(seq=0, index=len(current), observation=obs, policy_action=action, action=action,
                            is_intervention=False, reward=float(frame["next.reward"]) if "next.reward" in frame
                            else -1.0, success=bool(frame.get("next.success", False)), done=False,
                            policy_version=0, timestamp_s=float(frame["timestamp"]), images=imgs))
    close()
    tasks = tuple(dict.fromkeys(task for task, _, _ in episodes))
    return schema, tasks, episodes, float(dataset.fps)


def seed_lerobot_dataset(redis_url: str, root: str, robot_id: str = "demos-lerobot", repo_id: str = "",
                         success: bool = True) -> dict:
    """Write a local LeRobotDataset into the buffer as offline data; returns counts."""
    schema, tasks, episodes, fps = lerobot_dataset_episodes(root, repo_id, success)
    written = asyncio.run(write_episodes(redis_url, robot_id, episodes, schema, tasks, embodiment=to_id(f"lerobot:{Path(root).name}"),
                                 control_hz=fps))
    log.info("seeded %d episodes (%d steps, tasks %s) from the LeRobotDataset at %s", len(episodes), written,
             list(tasks), root)
    return {"episodes": len(episodes), "steps": written, "tasks": list(tasks)}
