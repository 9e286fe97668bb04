"""The LeRobot backend against hardware-free LeRobot devices (tests/lerobot_toys), registered
through LeRobot's own ``register_subclass``: schema mapping, triggers, config errors, and the
whole edge (``fleet edge --config_path FILE``, ``backend.type: lerobot``) streaming to a real gateway."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

import tests.lerobot_toys  # noqa: F401  (registers toy_arm / toy_leader with LeRobot)
from cloud.buffer.reader import BufferReader
from cloud.buffer import ROBOTS_KEY, RobotKeys
from cloud.policy_store import PolicyStore
from edge.operator import AllocatedOperator, NoOperator
from edge.robots.base import make_robot
from edge.robots.lerobot import LeRobotRobot, feature_map
from edge.help import HelpBoard
from edge.robots.lerobot_teleop import TeleopLink, TeleopOperator
from fleet.types import EncodedImage, OperatorAssignment
from fleet.codec import decode_image
from fleet.errors import ConfigError
from fleet.policies import PolicyConfig, build_policy

TASK = "put the arm at the goal"
SMALL = PolicyConfig(chunk_size=4, n_action_steps=4, dim_model=32, n_heads=2, dim_feedforward=64,
                     n_encoder_layers=1, n_decoder_layers=1)


def section(tmp_path: Path, **leader: object) -> dict:
    calib = str(tmp_path / "calibration")
    return {"robot": {"type": "toy_arm", "id": "arm", "calibration_dir": calib},
            "teleop": {"type": "toy_leader", "id": "leader", "calibration_dir": calib, "arm_id": "arm", **leader}}


def test_schema_comes_from_lerobot_features(tmp_path):
    robot = make_robot("lerobot", tasks=[TASK], config=section(tmp_path))
    assert isinstance(robot, LeRobotRobot)
    assert robot.embodiment == "lerobot-toy_arm"
    spec = {f.name: f for f in robot.schema.observation}
    assert spec["state"].shape == (3,) and spec["state"].dtype == "float32"
    assert spec["wrist"].is_image and spec["wrist"].shape == (12, 16, 3)
    assert robot.schema.action.shape == (3,)
    assert robot.features.state_names == ("j0.pos", "j1.pos", "j2.pos")
    assert robot.link.trigger == "events"  # auto: the toy leader has get_teleop_events
    with robot:
        first = robot.reset(TASK)
        assert first.features["wrist"].dtype == np.uint8
        nxt = robot.act(np.array([1.0, 0.0, -1.0], dtype=np.float32))
        np.testing.assert_allclose(nxt.features["state"], [0.6, 0.0, -0.6], atol=1e-6)
        assert robot.device.sent[-1] == {"j0.pos": 1.0, "j1.pos": 0.0, "j2.pos": -1.0}
    assert not robot.device.is_connected and not robot.teleop.is_connected


def test_config_errors_name_the_bad_value(tmp_path):
    with pytest.raises(ConfigError, match="intervention"):
        make_robot("lerobot", tasks=[TASK], config={**section(tmp_path), "intervention": "sometimes"})
    with pytest.raises(ConfigError, match="n_joints_typo"):
        bad = section(tmp_path)
        bad["robot"]["n_joints_typo"] = 2
        make_robot("lerobot", tasks=[TASK], config=bad)
    with pytest.raises(ConfigError, match=r"j3\.pos"):  # the leader produces 3 joints, the arm wants 4
        cfg = section(tmp_path)
        cfg["robot"]["n_joints"] = 4
        cfg["teleop"]["arm_id"] = "other"
        make_robot("lerobot", tasks=[TASK], config=cfg)
    with pytest.raises(ConfigError, match="teleop"):
        cfg = section(tmp_path)
        del cfg["teleop"]
        make_robot("lerobot", tasks=[TASK], config={**cfg, "intervention": "motion"})


class _Stick:
    """A teleop-like device playing back a list of actions (one per get_action)."""

    def __init__(self, values: list[float]):
        self.values = values
        self.i = 0

    def get_action(self) -> dict[str, float]:
        v = self.values[min(self.i, len(self.values) - 1)]
        self.i += 1
        return {"a": v}


def test_motion_trigger_takes_over_on_movement_and_releases_when_still():
    fm = feature_map({"a": float}, {"a": float})
    values = [0.0, 0.0, 5.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    link = TeleopLink(_Stick(values), None, "auto", fm, motion_threshold=1.0, release_steps=3)
    assert link.trigger == "motion"
    op = TeleopOperator(link)
    op.reset(TASK)
    decided = [op.decide(None, np.zeros(1, np.float32)) for _ in values]
    held = [d is not None for d in decided]
    assert held == [False, False, True, True, True, True, False, False]
    assert decided[3][0] == 10.0 and op.interventions == 1


def test_a_console_take_over_reads_the_teleop_whatever_its_trigger():
    """Allocated mode, manual assignment: the teleop's action every step, even while its motion trigger is off."""
    fm = feature_map({"a": float}, {"a": float})
    link = TeleopLink(_Stick([3.0] * 4), None, "auto", fm, motion_threshold=1.0, release_steps=3)
    op = AllocatedOperator(TeleopOperator(link), HelpBoard())
    op.reset(TASK)
    assert op.decide(None, np.zeros(1, np.float32)) is None  # nobody assigned
    op.board.assign(OperatorAssignment("op-1", manual=False))
    assert op.decide(None, np.zeros(1, np.float32)) is None  # assigned, but the stick does not move
    op.board.assign(OperatorAssignment("op-1", manual=True))
    assert [float(op.decide(None, np.zeros(1, np.float32))[0]) for _ in range(2)] == [3.0, 3.0]


class _Events:
    def __init__(self, script: list[dict]):
        self.script = script

    def get_teleop_events(self) -> dict:
        return self.script.pop(0) if self.script else {}


def test_events_latch_until_cleared():
    from lerobot.teleoperators import TeleopEvents

    fm = feature_map({"a": float}, {"a": float})
    device = _Events([{TeleopEvents.IS_INTERVENTION: True}, {"success": True}, {}])
    link = TeleopLink(None, device, "events", fm, 1.0, 1)
    link.poll_events()
    assert link.intervening and not link.ended
    link.poll_events()  # a one-shot "success" key press...
    link.poll_events()
    assert link.success and link.ended and not link.intervening  # ...is still there a poll later
    link.clear()
    assert not link.success and not link.ended


def test_no_teleop_means_no_operator(tmp_path):
    cfg = section(tmp_path)
    del cfg["teleop"]
    robot = make_robot("lerobot", tasks=[TASK], config=cfg)
    assert isinstance(robot.make_operator(), NoOperator)


@pytest.mark.timeout(120)
def test_fleet_edge_cli_runs_a_lerobot_robot_with_interventions(gateway, redis_client, tmp_path):
    from fleet.cli import main

    robot = make_robot("lerobot", tasks=[TASK], config=section(tmp_path))
    policy = build_policy(SMALL, robot.schema, [TASK], seed=0)
    PolicyStore(gateway.cfg.policy_dir, redis_client).publish(policy.tensors(), policy.manifest_config(),
                                                              policy.trainable_names())
    config = {"robot_id": "so-toy", "gateway": gateway.target, "tasks": [TASK],
              "state_dir": str(tmp_path / "edge"), "loop": {"control_hz": 60, "max_episode_steps": 20, "eval_every": 3},
              "heartbeat_interval_s": 0.5, "first_policy_timeout_s": 60, "backend": {"type": "lerobot", **section(tmp_path)}}
    path = tmp_path / "so101.json"
    path.write_text(json.dumps(config))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["edge", "--config_path", str(path), "--duration_s", "3"]) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)

    reg = json.loads(redis_client.hget(ROBOTS_KEY, "so-toy"))
    assert reg["embodiment"] == "lerobot-toy_arm"
    keys = RobotKeys("so-toy")
    catalog = {k.decode(): json.loads(v) for k, v in redis_client.hgetall(keys.catalog).items()}
    assert len(catalog) >= 4
    interventions = 0
    successes = 0
    for eid, entry in catalog.items():
        steps = BufferReader(redis_client).steps("so-toy", eid, BufferReader(redis_client).schema("so-toy"))
        assert [s.index for s in steps] == list(range(len(steps)))
        for s in steps:
            assert s.observation["state"].shape == (3,) and set(s.observation) == {"state"}
            assert s.images["wrist"].encoding == "jpeg"
            assert decode_image(s.images["wrist"]).shape == (12, 16, 3)
            if s.is_intervention:  # the leader's action was executed and recorded
                np.testing.assert_array_equal(s.action, [1.0, 1.0, 1.0])
                assert not entry["eval"], "the operator intervened in an evaluation episode"
            else:
                np.testing.assert_array_equal(s.action, s.policy_action)
        interventions += sum(s.is_intervention for s in steps)
        if entry["ended"] and entry["success"]:  # ended by the operator's success event
            successes += 1
            assert steps[-1].success and steps[-1].done and len(steps) < 20
    assert interventions > 0 and successes > 0
    assert BufferReader(redis_client).labeled_steps("so-toy") == interventions
    # its heartbeat carried the help signal and a thumbnail of its first camera
    thumb = redis_client.get(keys.thumb)
    assert thumb.startswith(b"\xff\xd8\xff") and decode_image(EncodedImage("jpeg", 12, 16, 3, thumb)).shape == (12, 16, 3)
    assert 0.0 <= float(redis_client.hget(keys.status, "help_score")) <= 1.0
