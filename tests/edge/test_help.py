"""The edge's help signal (edge/help.py) and allocated operators (edge/operator.py): the score's parts, the
board the heartbeat reads, and a simulated robot in allocated mode against a real gateway and Redis: it holds
while it wants help and nobody is assigned, its steps become interventions once a manual assignment appears in
fleet:ops:assignments, and stop being interventions when the entry is removed."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest

from cloud.buffer import RobotKeys
from cloud.buffer.layout import OPS_ASSIGNMENTS_KEY
from cloud.buffer.reader import BufferReader
from edge.agent import EdgeAgent, EdgeConfig
from edge.help import HelpBoard, HelpConfig, HelpScorer
from edge.loop import LoopConfig
from edge.operator import AllocatedOperator, Operator, OperatorConfig
from edge.sim.fleet import SimFleetConfig
from edge.sim.metaworld import SCHEMA
from fleet.convert import JPEG_MAGIC, MAX_THUMBNAIL_BYTES
from fleet.errors import ConfigError
from fleet.types import HelpSignal, OperatorAssignment
from tests.edge.test_restart_offline import TASKS, save_last_good
from tests.waiting import wait_until

STATE = {"state": np.zeros(4, np.float32)}


class Chunky:
    """An acting policy as the scorer sees one: what it says about itself."""

    def __init__(self, disagreement: float = 0.0, risk=None):
        self.action_disagreement = disagreement
        if risk is not None:
            self.failure_risk = risk


def test_uncertainty_follows_the_policy_s_chunk_disagreement_and_a_policy_that_cannot_tell_gives_zero():
    scorer = HelpScorer(HelpConfig(uncertainty_scale=0.5, weight_stall=0.0, weight_risk=0.0, threshold=0.6))
    assert scorer.update(STATE, 0.0, object(), 0.0).uncertainty == 0.0  # no attribute: cannot tell
    low = scorer.update(STATE, 0.0, Chunky(0.1), 0.1)
    high = scorer.update(STATE, 0.0, Chunky(0.4), 0.2)
    capped = scorer.update(STATE, 0.0, Chunky(3.0), 0.3)
    assert math.isclose(low.uncertainty, 0.2) and math.isclose(high.uncertainty, 0.8) and capped.uncertainty == 1.0
    assert (low.wanted, high.wanted, capped.wanted) == (False, True, True)
    assert math.isclose(high.score, 0.8) and high.wanted_for_s == 0.0 and math.isclose(capped.wanted_for_s, 0.1)
    assert scorer.update(STATE, 0.0, Chunky(math.nan), 0.4).uncertainty == 0.0


def test_stall_rises_without_progress_and_falls_back_with_reward_or_motion():
    scorer = HelpScorer(HelpConfig(stall_window_steps=10, stall_min_improvement=0.1, stall_min_motion=0.5,
                                   weight_uncertainty=0.0, weight_risk=0.0, threshold=0.7))
    policy = Chunky()
    stalls = [scorer.update(STATE, 1.0, policy, t).stall for t in range(12)]  # same state, same reward
    assert stalls[0] == 0.0 and all(b > a for a, b in zip(stalls[:10], stalls[1:10])) and stalls[-1] == 1.0
    assert scorer.update(STATE, 1.0, policy, 12).wanted
    assert scorer.update(STATE, 1.2, policy, 13).stall == 0.0  # reward progress
    for t in range(5):
        scorer.update(STATE, 1.2, policy, 14 + t)
    small = {"state": np.full(4, 0.2, np.float32)}  # moved 0.4 < 0.5: no progress
    assert scorer.update(small, 1.2, policy, 20).stall == 0.6
    moved = {"state": np.full(4, 0.3, np.float32)}  # 0.6 away from where progress was last made
    assert scorer.update(moved, 1.2, policy, 21).stall == 0.0
    scorer.reset()
    assert scorer.update(STATE, 0.0, policy, 22).stall == 0.0


def test_risk_passes_through_and_the_score_is_a_noisy_or():
    scorer = HelpScorer(HelpConfig(weight_uncertainty=0.5, weight_stall=0.0, weight_risk=1.0, uncertainty_scale=1.0))
    signal = scorer.update(STATE, 0.0, Chunky(0.5, risk=0.4), 0.0)
    assert signal.risk == 0.4 and math.isclose(signal.score, 1 - (1 - 0.25) * (1 - 0.4))
    assert scorer.update(STATE, 0.0, Chunky(0.0, risk=7.0), 0.0).risk == 1.0
    assert scorer.update(STATE, 0.0, Chunky(0.0, risk="junk"), 0.0).risk == 0.0


@pytest.mark.parametrize("kwargs", [{"threshold": 1.5}, {"weight_stall": -0.1}, {"uncertainty_scale": 0.0},
                                    {"stall_window_steps": 0}, {"stall_min_motion": math.nan}, {"heartbeat_s": 0.0},
                                    {"thumbnail_width": -1}])
def test_bad_help_config_is_refused(kwargs):
    with pytest.raises(ConfigError, match=f"help_signal.{next(iter(kwargs))}"):
        HelpConfig(**kwargs)


def test_bad_allocation_config_is_refused():
    with pytest.raises(ConfigError, match="operator.allocation"):
        OperatorConfig(allocation="shared")
    with pytest.raises(ConfigError, match="operator.hold"):
        OperatorConfig(hold="panic")


def test_a_simulated_fleet_runs_its_robots_allocated():
    fleet = SimFleetConfig(robots=3, edge=EdgeConfig(operator=OperatorConfig(allocation="allocated", hold="policy")))
    assert {(c.operator.allocation, c.operator.hold) for c in fleet.robot_configs()} == {("allocated", "policy")}
    assert len({c.operator.seed for c in fleet.robot_configs()}) == 3


def test_board_thumbnail_and_heartbeat_interval():
    board = HelpBoard(HelpConfig(heartbeat_s=0.25, thumbnail_width=64))
    assert board.thumbnail() == b"" and board.interval_s(2.0) == 2.0
    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    board.publish(HelpSignal(score=0.9, wanted=True), frame, "")
    assert board.wake.is_set() and board.interval_s(2.0) == 0.25
    thumb = board.thumbnail()
    assert thumb.startswith(JPEG_MAGIC) and len(thumb) <= MAX_THUMBNAIL_BYTES
    board.publish(HelpSignal(), frame, "")
    board.wake.clear()
    board.assign(OperatorAssignment("op-1", manual=True, since_s=1.0))
    assert board.wake.is_set() and board.interval_s(2.0) == 0.25


class Gated(Operator):
    """An operator whose own gating intervenes on every other step; forced, it always acts."""

    def __init__(self):
        self.n = 0

    def reset(self, task: str) -> None:
        self.n = 0

    def decide(self, observation, policy_action):
        self.n += 1
        return np.ones(2, np.float32) if self.n % 2 else None

    def command(self, observation, policy_action):
        return np.full(2, 2.0, np.float32)

    @property
    def is_intervening(self) -> bool:
        return False


def test_allocated_operator_acts_only_while_assigned():
    board = HelpBoard()
    op = AllocatedOperator(Gated(), board)
    op.reset("t")
    assert [op.decide(None, np.zeros(2)) for _ in range(3)] == [None] * 3 and op.acting_for == ""
    board.assign(OperatorAssignment("op-1", manual=False))
    auto = [op.decide(None, np.zeros(2)) for _ in range(4)]
    assert [a is None for a in auto] == [False, True, False, True] and op.acting_for == "op-1"
    board.assign(OperatorAssignment("op-1", manual=True))
    assert all(np.array_equal(op.decide(None, np.zeros(2)), [2.0, 2.0]) for _ in range(3))


@pytest.mark.timeout(120)
def test_allocated_sim_robot_holds_then_is_driven_by_a_manual_assignment(gateway, redis_client, tmp_path):
    state_dir = tmp_path / "edge"
    save_last_good(state_dir, version=1)
    # threshold 0: this robot always wants help, so what it does depends only on the assignment
    agent = EdgeAgent(EdgeConfig(robot_id="r0", gateway=gateway.target, tasks=TASKS, state_dir=str(state_dir),
                                 loop=LoopConfig(control_hz=100.0, max_episode_steps=400),
                                 operator=OperatorConfig(allocation="allocated", hold="stop"),
                                 help_signal=HelpConfig(threshold=0.0, heartbeat_s=0.1), heartbeat_interval_s=5.0,
                                 first_policy_timeout_s=1.0))
    stop = threading.Event()
    status = RobotKeys("r0").status
    try:
        agent.start(stop)
        wait_until(lambda: agent.loop.stats().holding_steps >= 20, 30, "the robot holding")
        wait_until(lambda: redis_client.hget(status, "holding") == b"1", 10, "holding=1 in the robot's status")
        assert agent.loop.stats().intervention_steps == 0
        assert redis_client.hget(status, "help_wanted") == b"1" and redis_client.hget(status, "operator") == b""

        redis_client.hset(OPS_ASSIGNMENTS_KEY, "r0", json.dumps({"operator": "op-1", "since_s": 5.0, "manual": True}))
        wait_until(lambda: agent.loop.stats().intervention_steps >= 30, 30, "the operator driving")
        wait_until(lambda: redis_client.hget(status, "intervening") == b"1", 10, "intervening=1 in the status")
        assert redis_client.hget(status, "operator") == b"op-1" and redis_client.hget(status, "holding") == b"0"

        redis_client.hdel(OPS_ASSIGNMENTS_KEY, "r0")
        wait_until(lambda: agent.help_board.assignment.operator_id == "", 10, "the hand-back reaching the edge")
        driven, held = agent.loop.stats().intervention_steps, agent.loop.stats().holding_steps
        wait_until(lambda: agent.loop.stats().holding_steps >= held + 20, 30, "the robot holding again")
        assert agent.loop.stats().intervention_steps <= driven + 1  # at most the tick that read the old entry
    finally:
        stop.set()
        agent.stop()
    # What reached the buffer: held steps sent zeros (MetaWorld's stop) while the policy proposed something else;
    # the operator's steps are labelled interventions.
    reader = BufferReader(redis_client)
    steps = [s for ep in reader.episodes(["r0"]) for s in reader.steps("r0", ep.episode_id, SCHEMA)]
    held = [s for s in steps if not s.is_intervention]
    driven = [s for s in steps if s.is_intervention]
    assert len(held) >= 40 and len(driven) >= 30
    assert all(not s.action.any() for s in held) and any(s.policy_action.any() for s in held)
    assert all(s.action.any() for s in driven)
    scores = np.array([s.help_score for s in steps])  # recorded with every step: wanted (threshold 0), stalled
    assert ((scores >= 0) & (scores <= 1)).all() and scores.max() > 0.1
    assert np.isclose(np.diff(scores), 0.8 / 60, atol=1e-4).sum() > 20  # stall: +1/60 per tick held, weight 0.8
