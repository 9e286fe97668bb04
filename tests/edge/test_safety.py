"""Action safety outside the policy, with real parts: a real LeRobot ACT policy whose action_std is 1e30
(finite actions around 1e29, which the finite check lets through), a real MetaWorld robot, the real
simulated operator, a real gateway + Redis for the updater that refuses a rolled-back version."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from edge.client import FleetClient
from edge.hotswap import PolicySlot
from edge.loop import ControlLoop, LoopConfig
from edge.operator import NoOperator, OperatorConfig
from edge.sim.operator import SimulatedOperator
import tests.lerobot_toys  # noqa: F401  (registers toy_arm / toy_leader with LeRobot)
from edge.robots.base import make_robot
from edge.sim.metaworld import MetaWorldRobot
from edge.safety import ActionGuard, SafetyConfig
from edge.updater import LastGood, Updater
from fleet.errors import ConfigError
from fleet.policies import FleetPolicy, PolicyConfig, build_policy
from fleet.policies.base import NullPolicy
from fleet.policies.norm import NORM_PREFIX

TASK = "reach-v3"
SMALL = PolicyConfig(chunk_size=4, n_action_steps=4, dim_model=32, n_heads=2, dim_feedforward=64,
                     n_encoder_layers=1, n_decoder_layers=1)


class RecordingRobot(MetaWorldRobot):
    """The real MetaWorld robot, keeping every action that reached ``act`` (what the arm would get)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[np.ndarray] = []

    def act(self, action: np.ndarray):
        self.sent.append(np.array(action, copy=True))
        return super().act(action)


@pytest.fixture
def robot():
    r = RecordingRobot((TASK,), seed=0, max_episode_steps=200)
    r.connect()
    yield r
    r.disconnect()


def exploding_policy(robot: MetaWorldRobot, version: int) -> FleetPolicy:
    """A real ACT policy with action_std = 1e30: every action is finite and astronomically large."""
    policy = build_policy(SMALL, robot.schema, (TASK,), seed=0)
    tensors = dict(policy.tensors())
    tensors[NORM_PREFIX + "action_std"] = torch.full_like(tensors[NORM_PREFIX + "action_std"], 1e30)
    policy.load_tensors(tensors, version)
    return policy


def violations(robot_id: str, kind: str, source: str) -> float:
    return REGISTRY.get_sample_value("fleet_edge_safety_violations_total",
                                     {"robot": robot_id, "kind": kind, "source": source}) or 0.0


def run(robot, slot, guard: SafetyConfig, robot_id: str, sink, operator=None, episodes: int = 1,
        steps: int = 12) -> ControlLoop:
    cfg = LoopConfig(realtime=False, max_episodes=episodes, max_episode_steps=steps, control_hz=20)
    loop = ControlLoop(robot_id, robot, slot, operator or NoOperator(), sink, cfg,
                       guard=ActionGuard(guard, robot.schema.action.shape, cfg.control_hz, robot_id))
    loop.start()
    assert loop.wait_episodes(episodes, timeout_s=30) and loop.error is None
    loop.stop()
    return loop


@pytest.mark.timeout(60)
def test_huge_finite_policy_actions_are_clipped_and_rate_limited_before_the_robot(robot, make_sink,
                                                                                  caplog) -> None:
    sink = make_sink()
    limits = SafetyConfig(position_min=(-1.0,), position_max=(1.0,), max_delta_per_tick=(0.25,))
    with caplog.at_level(logging.WARNING, logger="edge.safety"):
        loop = run(robot, PolicySlot(exploding_policy(robot, 1)), limits, "safe-clip", sink)
    proposed = np.stack([r.step.policy_action for r in sink.records])
    assert np.isfinite(proposed).all() and np.abs(proposed).max() > 1e20  # the attack: finite, ~1e29
    sent = np.stack(robot.sent)
    assert len(sent) == 12 and np.abs(sent).max() <= 1.0
    assert np.abs(np.diff(sent, axis=0)).max() <= 0.25 + 1e-6  # rate limited too
    assert np.abs(sent[0]).max() <= 1.0  # the first tick has nothing to rate-limit against: clipped
    assert np.array_equal(np.stack([r.step.action for r in sink.records]), sent)  # recorded = what was sent
    assert violations("safe-clip", "position", "policy") == 12
    assert loop.stats().safety_violations == 12
    assert len([r for r in caplog.records if "violates the safety limits" in r.message]) == 1  # once per episode


@pytest.mark.timeout(60)
def test_hold_repeats_the_last_action_sent(robot, make_sink) -> None:
    guard = ActionGuard(SafetyConfig(mode="hold", position_min=(-1.0,), position_max=(1.0,),
                                     max_delta_per_tick=(0.1,)), (4,), 20.0, "safe-hold")
    guard.start_episode()
    first, kinds = guard.apply(np.array([0.05, 0, 0, 0], np.float32), "policy")
    assert kinds == () and first[0] == np.float32(0.05)
    held, kinds = guard.apply(np.array([0.9, 0, 0, 0], np.float32), "policy")  # jump: rate violation
    assert kinds == ("rate",) and np.array_equal(held, first)
    held, kinds = guard.apply(np.array([np.nan, 5.0, 0, 0], np.float32), "operator")
    assert kinds == ("nonfinite", "position", "rate") and np.array_equal(held, first)
    assert violations("safe-hold", "nonfinite", "operator") == 1 and violations("safe-hold", "rate", "policy") == 1
    guard.start_episode()  # nothing to hold at an episode's start: clipped instead
    clipped, _ = guard.apply(np.array([3.0, -3.0, np.inf, 0], np.float32), "policy")
    assert clipped.tolist() == [1.0, -1.0, 0.0, 0.0]
    # max_velocity is a rate limit of velocity / control_hz
    slow = ActionGuard(SafetyConfig(max_velocity=(2.0,)), (4,), 20.0, "safe-velocity")
    slow.start_episode()
    slow.apply(np.zeros(4, np.float32), "policy")
    moved, kinds = slow.apply(np.ones(4, np.float32), "policy")
    assert kinds == ("rate",) and np.allclose(moved, 0.1)
    effort = ActionGuard(SafetyConfig(max_effort=(2.0,)), (4,), 20.0, "safe-effort")
    effort.start_episode()
    out, kinds = effort.apply(np.array([3, -3, 1, 0], np.float32), "policy")
    assert kinds == ("effort",) and out.tolist() == [2.0, -2.0, 1.0, 0.0]


@pytest.mark.timeout(60)
def test_the_simulated_operator_passes_through_the_same_guard(robot, make_policy, make_sink) -> None:
    sink = make_sink()
    takes_over = SimulatedOperator(OperatorConfig(divergence_threshold=0.01, agree_threshold=0.0, divergence_steps=1,
                                                segment_steps=50))
    limits = SafetyConfig(position_min=(-0.05,), position_max=(0.05,))
    run(robot, PolicySlot(make_policy("zero", version=1)), limits, "safe-operator", sink, operator=takes_over,
        steps=20)
    driven = [r for r in sink.records if r.step.is_intervention]
    assert driven, "the operator never took over"
    assert np.abs(np.stack(robot.sent)).max() <= 0.05
    assert violations("safe-operator", "position", "operator") > 0
    assert violations("safe-operator", "position", "policy") == 0  # zeros are within the limits


@pytest.mark.timeout(90)
def test_new_version_tripping_the_guard_is_rolled_back_and_refused(robot, make_policy, make_sink, gateway,
                                                                    redis_client, tmp_path) -> None:
    slot = PolicySlot(make_policy("zero", version=1))
    updater = Updater("safe-rollback", FleetClient(gateway.target), slot,
                      lambda m, t: FleetPolicy.from_manifest(m.config, t, version=m.version),
                      LastGood(tmp_path / "policy"), robot.schema, TASK, have_version=1)
    updater.start()
    try:
        slot.offer(exploding_policy(robot, 2))
        sink = make_sink()
        limits = SafetyConfig(position_min=(-1.0,), position_max=(1.0,), rollback_violations=5, rollback_episodes=2)
        loop = run(robot, slot, limits, "safe-rollback", sink, episodes=2, steps=12)
        assert slot.current.version == 1 and loop.stats().safety_rollbacks == 1
        versions = [r.step.policy_version for r in sink.records]
        assert versions[:5] == [2] * 5 and set(versions[5:]) == {1}  # rolled back at the 5th violation
        assert violations("safe-rollback", "position", "policy") == 5  # v1's zeros never violate
        assert updater.wait(lambda u: u.refused_version == 2, timeout_s=30)  # the updater refuses it...
        assert _wait_status(redis_client, "safe-rollback", b"2")  # ...and tells the gateway
    finally:
        updater.stop()


def _wait_status(redis_client, robot_id: str, value: bytes, timeout_s: float = 20) -> bool:
    """Wait (on Redis keyspace notifications) until the gateway recorded ``value`` as the refused version."""
    key = f"fleet:{{r:{robot_id}}}:status"
    redis_client.config_set("notify-keyspace-events", "Kh")
    pubsub = redis_client.pubsub()
    pubsub.subscribe(f"__keyspace@0__:{key}")
    try:
        if redis_client.hget(key, "policy_refused_version") == value:
            return True
        while pubsub.get_message(timeout=timeout_s) is not None:
            if redis_client.hget(key, "policy_refused_version") == value:
                return True
        return False
    finally:
        pubsub.close()


@pytest.mark.timeout(60)
def test_lerobot_teleoperator_is_guarded_in_episodes_and_during_reset(tmp_path, make_sink) -> None:
    """The LeRobot backend (hardware-free toy arm + leader, tests/lerobot_toys): a leader commanding 5.0 with
    limits of 0.5, driving both in the episode (intervention "always") and during the reset."""
    calib = str(tmp_path / "calibration")
    robot = make_robot("lerobot", tasks=["t"], config={
        "robot": {"type": "toy_arm", "id": "arm-safe", "calibration_dir": calib},
        "teleop": {"type": "toy_leader", "id": "leader", "calibration_dir": calib, "arm_id": "arm-safe", "goal": 5.0},
        "intervention": "always", "reset_time_s": 0.05, "reset_hz": 100})
    cfg = LoopConfig(realtime=False, max_episodes=1, max_episode_steps=10, control_hz=20)
    guard = ActionGuard(SafetyConfig(position_min=(-0.5,), position_max=(0.5,)), robot.schema.action.shape,
                        cfg.control_hz, "safe-lerobot")
    robot.action_filter = guard.operator_filter  # as the agent wires it
    with robot:
        loop = ControlLoop("safe-lerobot", robot, PolicySlot(NullPolicy(robot.schema.action.shape)),
                           robot.make_operator(), make_sink(), cfg, guard=guard)
        loop.start()
        assert loop.wait_episodes(1, timeout_s=30) and loop.error is None
        loop.stop()
        sent = [v for action in robot.device.sent for v in action.values()]
    assert len(robot.device.sent) > 10  # the episode's 10 ticks and the reset's teleoperation
    assert max(sent) == 0.5 and min(sent) >= -0.5
    assert violations("safe-lerobot", "position", "operator") == len(robot.device.sent)


def test_limits_are_checked_against_the_robot(robot) -> None:
    with pytest.raises(ConfigError, match=r"safety.position_min has 3 values .* action has 4 dimensions"):
        ActionGuard(SafetyConfig(position_min=(0, 0, 0)), (4,), 20.0, "bad")
    with pytest.raises(ConfigError, match=r"safety.mode \('stop'\) must be one of"):
        SafetyConfig(mode="stop")
    with pytest.raises(ConfigError, match=r"max_velocity .* must be > 0"):
        SafetyConfig(max_velocity="1,0,1,1")
    with pytest.raises(ConfigError, match="position_min .* must be <= position_max"):
        ActionGuard(SafetyConfig(position_min=(1,), position_max=(0,)), (4,), 20.0, "bad")
    assert SafetyConfig(position_min="-1,-2, -3,-4").position_min == (-1.0, -2.0, -3.0, -4.0)  # as from --flags
