"""Write selected buffer episodes as an MCAP rosbag2 (``fleet export --format rosbag2``).

Standard message types only, so Foxglove, ``ros2 bag`` and ``rosbags`` open it. Per robot
``R`` (its id made a valid ROS name), stamped with the robot's clock (``timestamp_s``):

==========================================  ==========================  ==============================
topic                                       type                        holds
==========================================  ==========================  ==============================
/fleet/R/observation/<feature>              std_msgs/Float32MultiArray  a vector observation (``state``)
/fleet/R/observation/images/<camera>        sensor_msgs/CompressedImage the frame as stored (JPEG/PNG)
/fleet/R/action                             std_msgs/Float32MultiArray  the executed action
/fleet/R/policy_action                      std_msgs/Float32MultiArray  what the policy proposed
/fleet/R/is_intervention                    std_msgs/Bool               the operator drove this step
/fleet/R/reward                             std_msgs/Float32            reward of the step
/fleet/R/policy_version                     std_msgs/Int64              policy version that acted
/fleet/R/help_score                         std_msgs/Float32            the robot's need for a human (0..1)
/fleet/R/episode                            std_msgs/String             JSON events: start / end
==========================================  ==========================  ==============================

Episodes of different robots overlap in time; they are merged by timestamp (only the
episodes running at a given moment are held in memory) so messages are written in order.
Metadata is rosbag2 version 8 (as ROS 2 Jazzy writes it).
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cloud.export import EpisodeRef, ExportFilter, ExportResult, iter_steps, select_episodes
from fleet import ros2_convert as convert
from fleet.errors import ConfigError
from fleet.types import Step

log = logging.getLogger(__name__)

FLOAT32 = "std_msgs/msg/Float32"
INT64 = "std_msgs/msg/Int64"


def ros_name(text: str) -> str:
    """A string made a valid ROS 2 name token (letters, digits, underscores; not starting with a digit)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", text)
    return f"_{name}" if not name or name[0].isdigit() else name


def _events(redis, refs: list[EpisodeRef]) -> Iterator[tuple[int, int, EpisodeRef, Step | None, str]]:
    """(time_ns, tie, ref, step, kind) for every step and episode start/end, in time order.

    An episode's steps are read only once the merge reaches its start time."""
    counter = itertools.count()
    heap: list = []
    pending = sorted(refs, key=lambda r: r.start_s)
    opened = 0

    def push(ref: EpisodeRef, steps: Iterator[Step]) -> None:
        step = next(steps, None)
        if step is not None:
            heapq.heappush(heap, (round(step.timestamp_s * 1e9), next(counter), ref, step, steps))

    while heap or opened < len(pending):
        if opened < len(pending) and (not heap or round(pending[opened].start_s * 1e9) <= heap[0][0]):
            ref = pending[opened]
            opened += 1
            push(ref, iter_steps(redis, ref))
            continue
        time_ns, tie, ref, step, steps = heapq.heappop(heap)
        if step.index == 0:
            yield time_ns, tie, ref, None, "start"
        yield time_ns, tie, ref, step, "step"
        if step.done:
            yield time_ns, tie, ref, step, "end"
        push(ref, steps)


def export_rosbag2(redis, out_dir: str | Path, flt: ExportFilter) -> ExportResult:
    """Write the episodes passing ``flt`` to a new MCAP rosbag2 directory ``out_dir``."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    out = Path(out_dir)
    if out.exists():
        raise ConfigError(f"output {out} exists; a rosbag2 is written into a new directory")
    refs = select_episodes(redis, flt)
    if not refs:
        raise ConfigError("no episodes match the filters")
    store = get_typestore(Stores.ROS2_JAZZY)
    types = convert.RosbagsTypes(store)
    steps = 0
    with Writer(out, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        conns: dict[tuple[str, str], object] = {}

        def write(topic: str, msgtype: str, msg: object, time_ns: int) -> None:
            conn = conns.get((topic, msgtype))
            if conn is None:
                conn = conns[(topic, msgtype)] = writer.add_connection(topic, msgtype, typestore=store)
            writer.write(conn, time_ns, store.serialize_cdr(msg, msgtype))

        for time_ns, _, ref, step, kind in _events(redis, refs):
            base = f"/fleet/{ros_name(ref.robot_id)}"
            if kind != "step":
                event = {"event": kind, "robot_id": ref.robot_id, "episode_id": ref.episode_id, "task": ref.task,
                         "embodiment": ref.embodiment, "evaluation": ref.evaluation, "policy_version": ref.version}
                if kind == "end":
                    event.update(success=bool(step.success), steps=step.index + 1)
                write(f"{base}/episode", convert.STRING, types.new(convert.STRING, data=json.dumps(event)), time_ns)
                continue
            _write_step(write, types, base, ref, step, time_ns)
            steps += 1
    log.info("exported %d episodes (%d steps) to %s", len(refs), steps, out)
    return ExportResult(path=str(out), episodes=len(refs), steps=steps)


def _write_step(write, types: convert.MessageTypes, base: str, ref: EpisodeRef, step: Step, time_ns: int) -> None:
    for spec in ref.schema.observation:
        if spec.is_image:
            image = step.images[spec.name]
            msg = convert.compressed_image_msg(types, image.data, image.encoding, time_ns, frame_id=spec.name)
            write(f"{base}/observation/images/{ros_name(spec.name)}", convert.COMPRESSED_IMAGE, msg, time_ns)
        else:
            values = np.asarray(step.observation[spec.name], dtype=np.float32)
            msg = convert.multi_array_msg(types, values, convert.FLOAT32_MULTI_ARRAY, spec.name)
            write(f"{base}/observation/{ros_name(spec.name)}", convert.FLOAT32_MULTI_ARRAY, msg, time_ns)
    for name, value in (("action", step.action), ("policy_action", step.policy_action)):
        msg = convert.multi_array_msg(types, np.asarray(value, dtype=np.float32), convert.FLOAT32_MULTI_ARRAY, name)
        write(f"{base}/{name}", convert.FLOAT32_MULTI_ARRAY, msg, time_ns)
    write(f"{base}/is_intervention", convert.BOOL, types.new(convert.BOOL, data=bool(step.is_intervention)), time_ns)
    write(f"{base}/reward", FLOAT32, types.new(FLOAT32, data=float(step.reward)), time_ns)
    write(f"{base}/policy_version", INT64, types.new(INT64, data=int(step.policy_version)), time_ns)
    write(f"{base}/help_score", FLOAT32, types.new(FLOAT32, data=float(step.help_score)), time_ns)
