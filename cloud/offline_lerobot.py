"""Seed the buffer's offline part from a LeRobotDataset on local disk (no hub).

The dataset is read with LeRobot's own ``LeRobotDataset`` (v3; videos decoded with PyAV)
and written through the same validated, exactly-once ingest as robot data, under a robot
id of its own registered with ``source=offline``; the sampler treats every offline step
as a label.

Mapping (the inverse of ``cloud/export/lerobot.py``, and what ``lerobot-record`` writes):
``observation.state`` -> ``state``, other numeric ``observation.<x>`` -> ``<x>``,
``observation.images.<cam>`` -> image ``<cam>`` (PNG, lossless), ``action`` -> action;
optional ``is_intervention`` / ``complementary_info.is_intervention``, ``policy_action``,
``policy_version``, ``next.reward``, ``next.success``, ``next.done``, ``wall_time_ns``.
A vector the export split (``meta/fleet_features.json``, ``cloud/export/layout.py``: MetaWorld's
``observation.state`` + ``observation.environment_state``) is joined back into its one feature.
The embodiment defaults to ``lerobot-<robot_type>``, the name the LeRobot edge backend
gives a live robot of that type, so a dataset recorded on an SO-101 trains the SO-101 line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cloud.buffer import SOURCE_OFFLINE
from cloud.export.layout import Part, read_layout
from cloud.ingest import MAX_STEPS_PER_CHUNK, Ingest
from fleet import PROTOCOL_VERSION
from fleet.codec import encode_image
from fleet.errors import ConfigError
from fleet.types import Chunk, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step

log = logging.getLogger(__name__)

IMAGE_PREFIX = "observation.images."
CHUNK_STEPS = min(256, MAX_STEPS_PER_CHUNK)
_INTERVENTION_KEYS = ("is_intervention", "complementary_info.is_intervention")


def _image_shape(spec: dict) -> tuple[int, int, int]:
    shape, names = tuple(spec["shape"]), list(spec.get("names") or [])
    if names[:1] == ["channels"] or (len(shape) == 3 and shape[0] in (1, 3) and shape[2] not in (1, 3)):
        return shape[1], shape[2], shape[0]  # (C, H, W) -> (H, W, C)
    return shape  # type: ignore[return-value]


def schema_of(features: dict[str, dict], split: dict[str, tuple[Part, ...]] | None = None
              ) -> tuple[Schema, dict[str, str]]:
    """The fleet schema of a LeRobot ``features`` dict (``split`` parts joined), and fleet name -> LeRobot key."""
    split = split or {}
    specs, keys = [], {}
    joined = {p.key for parts in split.values() for p in parts}
    for name, parts in split.items():
        specs.append(FeatureSpec(name, "float32", (parts[-1].stop,)))
        keys[name] = parts[0].key
    for key, spec in features.items():
        if key in joined:
            continue
        if key.startswith(IMAGE_PREFIX) or spec["dtype"] in ("image", "video"):
            name = key.removeprefix(IMAGE_PREFIX)
            specs.append(FeatureSpec(name, "uint8", _image_shape(spec), is_image=True))
        elif key.startswith("observation."):
            name = key.removeprefix("observation.").replace(".", "_")
            specs.append(FeatureSpec(name, "float32", tuple(spec["shape"])))
        else:
            continue
        if name in keys:
            raise ConfigError(f"the dataset's {key!r} and {keys[name]!r} both map to fleet feature {name!r}")
        keys[name] = key
    if "action" not in features or len(features["action"]["shape"]) != 1:
        raise ConfigError(f"the dataset has no 1-D 'action' feature (features: {sorted(features)})")
    if not any(not s.is_image for s in specs):
        raise ConfigError(f"the dataset has no numeric observation.* feature (features: {sorted(features)})")
    specs.sort(key=lambda s: (s.is_image, s.name != "state", s.name))
    return Schema(tuple(specs), FeatureSpec("action", "float32", tuple(features["action"]["shape"]))), keys


def _scalar(frame: dict, key: str, default: Any) -> Any:
    value = frame.get(key)
    return default if value is None else np.asarray(value).reshape(-1)[0].item()


def _step(frame: dict, schema: Schema, keys: dict[str, str], index: int, last: bool,
          split: dict[str, tuple[Part, ...]] | None = None) -> Step:
    observation, images = {}, {}
    for spec in schema.observation:
        if split and spec.name in split:
            value = np.concatenate([frame[p.key].numpy().reshape(-1) for p in split[spec.name]])
        else:
            value = frame[keys[spec.name]].numpy()
        if spec.is_image:  # float (C, H, W) in [0, 1] -> uint8 (H, W, C), exact for 8-bit sources
            pixels = np.clip(np.rint(value * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
            images[spec.name] = encode_image(pixels, "png")
        else:
            observation[spec.name] = value.astype(np.float32).reshape(spec.shape)
    action = frame["action"].numpy().astype(np.float32)
    policy_action = frame["policy_action"].numpy().astype(np.float32) if "policy_action" in frame else action
    intervention = any(bool(_scalar(frame, k, False)) for k in _INTERVENTION_KEYS)
    wall_ns = _scalar(frame, "wall_time_ns", None)
    return Step(seq=0, index=index, observation=observation, images=images, policy_action=policy_action,
                action=action, is_intervention=intervention, reward=float(_scalar(frame, "next.reward", 0.0)),
                success=bool(_scalar(frame, "next.success", False)), done=last,
                policy_version=int(_scalar(frame, "policy_version", 0)),
                timestamp_s=wall_ns / 1e9 if wall_ns is not None else float(_scalar(frame, "timestamp", 0.0)))


def _episodes(dataset, max_episodes: int) -> Iterator[tuple[str, list[dict]]]:
    """(task, frames) per episode, in order."""
    frames: list[dict] = []
    current = None
    done = 0
    for i in range(len(dataset)):
        frame = dataset[i]
        episode = int(frame["episode_index"])
        if current is not None and episode != current:
            yield frames[0]["task"], frames
            done += 1
            frames = []
            if max_episodes and done >= max_episodes:
                return
        current = episode
        frames.append(frame)
    if frames:
        yield frames[0]["task"], frames


def _default_embodiment(root: Path, robot_type: str | None) -> str:
    sidecar = root / "meta" / "fleet_episodes.jsonl"  # written by `fleet export --format lerobot`
    if sidecar.exists():
        for line in sidecar.read_text().splitlines():
            embodiment = json.loads(line).get("embodiment")
            if embodiment:
                return embodiment
    return f"lerobot-{robot_type}" if robot_type else "lerobot-dataset"


async def _write(redis_url: str, info: RobotInfo, episodes) -> tuple[int, int]:
    from fleet.redis_client import connect_async

    redis = connect_async(redis_url)
    try:
        ingest = Ingest(redis, source=SOURCE_OFFLINE)
        seq = await ingest.register(info)
        n_episodes = n_steps = 0
        for task, steps in episodes:
            episode_id = f"{info.robot_id}-{uuid.uuid4().hex[:12]}"
            summary = EpisodeSummary(success=steps[-1].success, num_steps=len(steps),
                                     intervention_steps=sum(s.is_intervention for s in steps), interventions=0,
                                     evaluation=False, policy_version=steps[-1].policy_version)
            for start in range(0, len(steps), CHUNK_STEPS):
                part = steps[start:start + CHUNK_STEPS]
                for s in part:
                    seq += 1
                    s.seq = seq
                chunk = Chunk(robot_id=info.robot_id, episode_id=episode_id, task=task, steps=part,
                              episode_end=summary if part[-1].done else None)
                result = await ingest.write(chunk)
                n_steps += result.stored_steps
            n_episodes += 1
        return n_episodes, n_steps
    finally:
        await redis.aclose()


def import_lerobot_dataset(redis_url: str, root: str | Path, robot_id: str = "", embodiment: str = "",
                           repo_id: str = "", max_episodes: int = 0) -> dict:
    """Write a local LeRobotDataset's episodes into the buffer as offline data; returns counts and ids."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    if not (root / "meta" / "info.json").exists():
        raise ConfigError(f"{root} is not a LeRobotDataset (no meta/info.json)")
    dataset = LeRobotDataset(repo_id or f"local/{root.name}", root=root, video_backend="pyav")
    split = read_layout(root, dataset.meta.features)
    schema, keys = schema_of(dataset.meta.features, split)
    robot_id = robot_id or "offline-" + re.sub(r"[^A-Za-z0-9_.-]", "_", root.name)
    embodiment = embodiment or _default_embodiment(root, dataset.meta.robot_type)
    tasks = tuple(str(t) for t in dataset.meta.tasks.index)
    info = RobotInfo(robot_id=robot_id, embodiment=embodiment, schema=schema, tasks=tasks,
                     protocol_version=PROTOCOL_VERSION, software_version="lerobot-dataset",
                     control_hz=float(dataset.fps))
    episodes = ((task, [_step(f, schema, keys, i, i == len(frames) - 1, split) for i, f in enumerate(frames)])
                for task, frames in _episodes(dataset, max_episodes))
    n_episodes, n_steps = asyncio.run(_write(redis_url, info, episodes))
    log.info("imported %d episodes (%d steps) of %s as offline robot %s (%s)", n_episodes, n_steps, root,
             robot_id, embodiment)
    return {"robot_id": robot_id, "embodiment": embodiment, "episodes": n_episodes, "steps": n_steps,
            "tasks": list(tasks)}
