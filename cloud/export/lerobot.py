"""Write selected buffer episodes as a LeRobotDataset v3 (``fleet export --format lerobot``).

LeRobot's own writer (``LeRobotDataset.create`` / ``add_frame`` / ``save_episode`` /
``finalize``) produces the files, so any LeRobot version that reads v3 reads them:
``data/`` parquet, ``meta/info.json``, ``meta/tasks.parquet``, ``meta/episodes/``,
``meta/stats.json``, and images embedded in parquet (or ``videos/`` with ``video=True``).

Columns: ``observation.state`` (the schema's ``state``; other vector features become
``observation.<name>``; an embodiment's split in ``layout.py`` may cut a vector into
``observation.state`` and ``observation.environment_state``, as MetaWorld's is),
``observation.images.<camera>``, ``action`` (what was executed), ``policy_action``, ``is_intervention``, ``policy_version``, ``next.reward``,
``next.success``, ``next.done``, ``wall_time_ns`` (the robot's clock), ``help_score`` (the robot's need for a
human at the step, docs/operators.md; 0 where not recorded). Which robot and
buffer episode each dataset episode came from is in ``meta/fleet_episodes.jsonl``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cloud.export import EpisodeRef, ExportFilter, ExportResult, iter_steps, select_episodes, single_schema
from cloud.export.layout import Part, split_for, write_layout
from fleet.codec import decode_image
from fleet.errors import ConfigError
from fleet.types import Schema, Step

log = logging.getLogger(__name__)

REPO_ID = "fleet/export"
SIDECAR = "meta/fleet_episodes.jsonl"
IMAGE_PREFIX = "observation.images."
MIN_VIDEO_PX = 32
"""Smallest frame side LeRobot's AV1 encoder (SVT-AV1 via PyAV) was seen to handle; 16 px crashes it."""


def obs_key(name: str) -> str:
    """Fleet observation feature name -> LeRobot key (``state`` -> ``observation.state``)."""
    return f"observation.{name}"


def _numeric(dtype: str) -> str:
    return "float32" if dtype in ("bfloat16", "float16") else dtype


def lerobot_features(schema: Schema, video: bool, split: dict[str, tuple[Part, ...]] | None = None
                     ) -> dict[str, dict]:
    """The LeRobot ``features`` dict of a fleet schema (vectors cut as ``split`` says) plus the fleet's extra columns."""
    features: dict[str, dict] = {}
    for spec in schema.observation:
        if spec.is_image:
            features[IMAGE_PREFIX + spec.name] = {"dtype": "video" if video else "image", "shape": spec.shape,
                                                  "names": ["height", "width", "channels"]}
        elif split and spec.name in split:
            for part in split[spec.name]:
                features[part.key] = {"dtype": _numeric(spec.dtype), "shape": (part.stop - part.start,),
                                      "names": list(part.names) if part.names else None}
        else:
            features[obs_key(spec.name)] = {"dtype": _numeric(spec.dtype), "shape": spec.shape or (1,),
                                            "names": None}
    action = {"dtype": "float32", "shape": schema.action.shape, "names": None}
    features["action"] = action
    features["policy_action"] = dict(action)
    for name, dtype in (("is_intervention", "bool"), ("policy_version", "int64"), ("next.reward", "float32"),
                        ("next.success", "bool"), ("next.done", "bool"), ("wall_time_ns", "int64"),
                        ("help_score", "float32")):
        features[name] = {"dtype": dtype, "shape": (1,), "names": None}
    return features


def frame_of(step: Step, schema: Schema, task: str, split: dict[str, tuple[Part, ...]] | None = None) -> dict:
    """One buffer step -> one LeRobot frame (images decoded to (H, W, C) uint8)."""
    frame: dict = {"task": task}
    for spec in schema.observation:
        if spec.is_image:
            frame[IMAGE_PREFIX + spec.name] = decode_image(step.images[spec.name], spec.name)
            continue
        value = np.asarray(step.observation[spec.name], dtype=_numeric(spec.dtype))
        if split and spec.name in split:
            for part in split[spec.name]:
                frame[part.key] = value[part.start:part.stop]
        else:
            frame[obs_key(spec.name)] = value.reshape(spec.shape or (1,))
    frame["action"] = np.asarray(step.action, dtype=np.float32)
    frame["policy_action"] = np.asarray(step.policy_action, dtype=np.float32)
    frame["is_intervention"] = np.array([step.is_intervention])
    frame["policy_version"] = np.array([step.policy_version], dtype=np.int64)
    frame["next.reward"] = np.array([step.reward], dtype=np.float32)
    frame["next.success"] = np.array([step.success])
    frame["next.done"] = np.array([step.done])
    frame["wall_time_ns"] = np.array([round(step.timestamp_s * 1e9)], dtype=np.int64)
    frame["help_score"] = np.array([step.help_score], dtype=np.float32)
    return frame


def estimate_fps(redis, refs: list[EpisodeRef], max_steps: int = 500, blobs=None) -> int:
    """A guess at the control rate from the median step interval of the first episodes (only for robots that
    registered no rate: demos seeded at simulation speed would read as thousands of fps)."""
    stamps = []
    for ref in refs[:5]:
        ts = [s.timestamp_s for _, s in zip(range(max_steps), iter_steps(redis, ref, blobs))]
        stamps.extend(np.diff(ts).tolist())
    positive = [d for d in stamps if d > 0]
    return max(1, round(1.0 / float(np.median(positive)))) if positive else 10


def export_fps(redis, refs: list[EpisodeRef], blobs=None) -> int:
    """The dataset's fps: the control rate the robots registered. Robots that registered none get a
    timestamp estimate (logged). A LeRobotDataset has one fps, so episodes of several rates are refused."""
    robots_at: dict[float, set[str]] = {}
    for ref in refs:
        if ref.control_hz:
            robots_at.setdefault(ref.control_hz, set()).add(ref.robot_id)
    unknown = [ref for ref in refs if not ref.control_hz]
    if unknown:
        guessed = estimate_fps(redis, unknown, blobs=blobs)
        robots = sorted({ref.robot_id for ref in unknown})
        log.warning("robot(s) %s registered no control rate; using %d fps estimated from their step timestamps "
                    "(pass --fps to set it)", robots, guessed)
        robots_at.setdefault(float(guessed), set()).update(robots)
    if len(robots_at) > 1:
        rates = "; ".join(f"{hz:g} Hz: {', '.join(sorted(ids))}" for hz, ids in sorted(robots_at.items()))
        raise ConfigError(f"the selected episodes were recorded at {len(robots_at)} control rates ({rates}); a "
                          "LeRobotDataset has one fps: export one rate at a time with --robot or --embodiment")
    (hz,) = robots_at
    if abs(hz - round(hz)) > 1e-6:
        raise ConfigError(f"the robots' control rate ({hz:g} Hz) is not a whole number and a LeRobotDataset's fps "
                          "is; pass --fps to choose one")
    return int(round(hz))


def export_lerobot(redis, out_dir: str | Path, flt: ExportFilter, fps: int | None = None, video: bool = False,
                   repo_id: str = REPO_ID, blobs=None) -> ExportResult:
    """Write the episodes passing ``flt`` to a new LeRobotDataset v3 at ``out_dir``; camera frames stored in the
    blob store come from ``blobs`` (a ``cloud.blobstore.BlobStore``).

    ``fps`` defaults to the control rate the robots registered (:func:`export_fps`); given, it overrides it."""
    out = Path(out_dir)
    if out.exists():
        raise ConfigError(f"output directory {out} exists; LeRobot writes a new dataset only")
    refs = select_episodes(redis, flt)
    schema = single_schema(refs)
    fps = fps or export_fps(redis, refs, blobs)
    if fps < 1:
        raise ConfigError(f"fps ({fps}) must be >= 1")
    small = [f"{s.name} {s.shape}" for s in schema.observation if s.is_image and min(s.shape[:2]) < MIN_VIDEO_PX]
    if video and small:
        raise ConfigError(f"video export needs frames of at least {MIN_VIDEO_PX} px a side (the AV1 encoder "
                          f"crashes on smaller ones); cameras {small} are smaller: export them as images")
    embodiments = sorted({r.embodiment for r in refs if r.embodiment})
    split = split_for({r.embodiment for r in refs}, schema.observation)
    features = lerobot_features(schema, video, split)
    clash = [p.key for parts in split.values() for p in parts
             if any(obs_key(s.name) == p.key for s in schema.observation if s.name not in split)]
    if clash:
        raise ConfigError(f"the schema has features that are also parts of its split state: {clash}")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # seconds to import: only once needed

    dataset = LeRobotDataset.create(repo_id, fps=fps, features=features, root=out,
                                    robot_type=",".join(embodiments) or None, use_videos=video)
    steps = 0
    sidecar = []
    try:
        for index, ref in enumerate(refs):
            for step in iter_steps(redis, ref, blobs):
                dataset.add_frame(frame_of(step, schema, ref.task, split))
                steps += 1
            dataset.save_episode()
            sidecar.append({"episode_index": index, "robot_id": ref.robot_id, "episode_id": ref.episode_id,
                            "embodiment": ref.embodiment, "source": ref.source, "evaluation": ref.evaluation,
                            "success": ref.success, "policy_version": ref.version, "start_s": ref.start_s})
    finally:
        dataset.finalize()
    (out / SIDECAR).write_text("".join(json.dumps(row) + "\n" for row in sidecar))
    write_layout(out, split)
    log.info("exported %d episodes (%d steps) at %d fps to %s", len(refs), steps, fps, out)
    return ExportResult(path=str(out), episodes=len(refs), steps=steps)
