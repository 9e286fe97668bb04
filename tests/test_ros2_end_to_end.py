"""End to end over DDS: the simulated arm as a ROS 2 driver with a scripted teleop station
(`fleet ros2-sim-robot`, a process), `fleet edge --backend.type=ros2` (a process: a real rclpy node),
the gateway and the trainer (in this process) and a real redis-server. Steps arrive exactly
once with the joint state and camera frame, operator segments from the ROS teleop topics are
labeled with the operator's command as the executed action, and a newer policy version
reaches the edge and is swapped in between episodes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy missing: pip install -e '.[ros2]'")

from cloud.buffer.reader import BufferReader, parse_label_runs
from cloud.buffer import RobotKeys  # noqa: E402
from cloud.offline import write_episodes as write_offline  # noqa: E402
from cloud.trainer import Trainer  # noqa: E402
from edge.robots.ros2.config import load_config  # noqa: E402
from edge.robots.ros2.robot import schema_for  # noqa: E402
from edge.sim.ros2_arm_config import EMBODIMENT, SimArmConfig  # noqa: E402
from fleet.codec import decode_image, encode_image  # noqa: E402
from cloud.trainer_config import TrainerConfig  # noqa: E402
from fleet.policies import PolicyConfig  # noqa: E402
from fleet.types import EpisodeSummary, Step  # noqa: E402
from tests.ros2_procs import Proc, start_sim_arm  # noqa: E402

TASK = "reach the goal"
H, W = 24, 32
SMALL = PolicyConfig(chunk_size=4, n_action_steps=4, dim_model=32, n_heads=2, dim_feedforward=64,
                     n_encoder_layers=1, n_decoder_layers=1)


def demos(schema, episodes: int = 2, steps: int = 8):
    """Offline episodes of the arm's schema (random states and frames), so the trainer publishes v1."""
    rng = np.random.default_rng(0)
    state_size = schema.observation[0].shape[0]
    out = []
    for _ in range(episodes):
        run = []
        for t in range(steps):
            action = rng.uniform(-1, 1, 4).astype(np.float32)
            frame = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            run.append(Step(0, t, {"state": rng.normal(size=state_size).astype(np.float32)}, action, action, False,
                            0.0, False, t == steps - 1, 0, time.time(), {"front": encode_image(frame)}))
        out.append((TASK, run, EpisodeSummary(False, steps, 0, 0, False, 0)))
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ros2_robot_learns_over_dds(redis_proc, redis_client, gateway, tmp_path, ros_domain):
    sim_cfg = SimArmConfig(rate_hz=60, camera_height=H, camera_width=W, teleop=True, teleop_period_steps=20,
                           teleop_segment_steps=6)
    ros2 = {**sim_cfg.edge_backend_section(), "node_name": "fleet_edge_e2e"}
    schema = schema_for(load_config(ros2))
    assert asyncio.run(write_offline(redis_proc.url, "demos-ros2", demos(schema), schema, (TASK,), EMBODIMENT)) == 16

    sim = start_sim_arm(tmp_path / "sim.log", "--rate_hz", "60", "--camera_height", str(H), "--camera_width", str(W),
                        "--teleop", "true", "--teleop_period_steps", "20", "--teleop_segment_steps", "6",
                        "--node_name", "sim_e2e", wait=False)
    stop = threading.Event()
    trainer = Trainer(TrainerConfig(redis_url=redis_proc.url, policy_dir=gateway.cfg.policy_dir, tasks=(TASK,),
                                    batch_size=8, seed_bc_steps=10, publish_every_steps=10, min_labeled_steps=4,
                                    refresh_interval_s=0.2, policy=SMALL, checkpoint_every_s=0,
                                    checkpoint_every_steps=0), stop)
    trainer_thread = threading.Thread(target=trainer.run, daemon=True)
    trainer_thread.start()
    rid = "ros-arm-1"
    config = {"robot_id": rid, "gateway": gateway.target, "tasks": [TASK], "loop": {"control_hz": 30,
              "max_episode_steps": 20, "eval_every": 0}, "heartbeat_interval_s": 0.5, "first_policy_timeout_s": 90,
              "state_dir": str(tmp_path / "edge"), "backend": ros2}
    (tmp_path / "edge.json").write_text(json.dumps(config))
    edge = Proc(["edge", "--config_path", str(tmp_path / "edge.json")], tmp_path / "edge.log")
    keys = RobotKeys(rid)

    def episodes() -> list[dict]:
        return [json.loads(v) for v in redis_client.hgetall(keys.catalog).values()]

    def swapped() -> bool:
        ended = [e for e in episodes() if e.get("ended")]
        return len({e["version"] for e in ended}) >= 2 and len(ended) >= 3

    try:
        edge.wait_for(swapped, "episodes under two policy versions", timeout_s=120)
        assert edge.stop() == 0, edge.log()[-3000:]  # drains the spool before it exits
    finally:
        edge.kill()
        sim.stop()
        stop.set()
        trainer_thread.join(60)
    assert "Traceback" not in edge.log(), edge.log()[-3000:]

    acked = int(redis_client.get(keys.seq))
    seqs, versions = [], defaultdict(set)
    intervention, autonomous = [], []
    for eid in redis_client.hkeys(keys.catalog):
        steps = BufferReader(redis_client).steps(keys.robot_id, eid.decode(), BufferReader(redis_client).schema(keys.robot_id))
        assert [s.index for s in steps] == list(range(len(steps)))
        for s in steps:
            seqs.append(s.seq)
            versions[eid].add(s.policy_version)
            assert s.observation["state"].shape == (18,) and np.isfinite(s.observation["state"]).all()
            assert decode_image(s.images["front"]).shape == (H, W, 3)
            assert s.action.shape == (4,) and s.timestamp_s > 0
            (intervention if s.is_intervention else autonomous).append(s)
    assert sorted(seqs) == list(range(1, acked + 1)), "a step is missing or duplicated"
    assert all(len(v) == 1 for v in versions.values()), "a policy was swapped mid-episode"
    assert len({v for vs in versions.values() for v in vs}) >= 2
    # Operator segments: the teleop station's command is the executed action, the policy's is kept.
    assert intervention and autonomous
    for s in autonomous:
        np.testing.assert_array_equal(s.action, s.policy_action)
    assert any(not np.array_equal(s.action, s.policy_action) for s in intervention)
    assert int(redis_client.hget(keys.stats, "intervention_steps")) == len(intervention)
    # ... and labeled for the trainer (HG-DAgger's targets): one index entry per operator-driven step.
    names = [raw.decode().split("|", 1)[0] for raw in redis_client.lrange(keys.episode_ids, 0, -1)]
    runs = ((n, start, end) for raw in redis_client.lrange(keys.labeled, 0, -1)  # "n|start|end[|start|end...]"
            for n, pairs in [parse_label_runs(raw)] for start, end in pairs)
    labeled = {(names[int(n)], i) for n, start, end in runs for i in range(int(start), int(end))}
    driven = {(eid.decode(), s.index) for eid in redis_client.hkeys(keys.catalog)
              for s in BufferReader(redis_client).steps(keys.robot_id, eid.decode(), BufferReader(redis_client).schema(keys.robot_id)) if s.is_intervention}
    assert labeled == driven
