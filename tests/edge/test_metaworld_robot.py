"""MetaWorldRobot against real MetaWorld."""

from __future__ import annotations

import numpy as np
import pytest

from edge.robots.base import ROBOTS, Robot, make_robot
from edge.sim.metaworld import (
    INSTRUCTIONS,
    MetaWorldRobot,
    env_name_for,
    instruction_for,
    variant_indices,
)
from fleet.errors import ConfigError, InvalidInput
from fleet.types import FeatureSpec


def test_schema_and_identity() -> None:
    robot = MetaWorldRobot(["reach-v3", "close the drawer"])
    assert robot.embodiment == "metaworld-sawyer"
    assert robot.schema.observation == (FeatureSpec("state", "float32", (39,)),)
    assert robot.schema.action == FeatureSpec("action", "float32", (4,))
    assert robot.tasks == ("reach the goal", "close the drawer")
    assert isinstance(robot, Robot)


def test_reset_and_act_shapes(make_robot_connected) -> None:
    robot = make_robot_connected(("reach-v3",), max_episode_steps=5)
    obs = robot.reset("reach the goal")
    state = obs.features["state"]
    assert set(obs.features) == {"state"}
    assert state.dtype == np.float32 and state.shape == (39,)
    assert (obs.reward, obs.success, obs.terminated) == (0.0, False, False)
    assert robot.current_env_name == "reach-v3"
    assert robot.current_raw_obs is not None and robot.current_raw_obs.dtype == np.float64
    np.testing.assert_array_equal(robot.current_raw_obs.astype(np.float32), state)
    assert robot.observe() is obs

    for i in range(5):
        obs = robot.act(np.array([5.0, -5.0, 0.0, 1.0], dtype=np.float32))  # clipped, not refused
        assert obs.features["state"].dtype == np.float32 and obs.features["state"].shape == (39,)
        assert isinstance(obs.reward, float)
        assert obs.terminated == (i == 4)  # MetaWorld truncates at the robot's max_episode_steps
    with pytest.raises(RuntimeError, match="terminated"):
        robot.act(np.zeros(4))
    robot.reset("reach-v3")  # an env name works too
    with pytest.raises(InvalidInput, match="shape"):
        robot.act(np.zeros(3))
    with pytest.raises(InvalidInput, match="finite"):
        robot.act(np.array([np.nan, 0, 0, 0]))


def test_expert_succeeds_on_reach_through_robot_api(make_robot_connected, expert) -> None:
    robot = make_robot_connected(("reach-v3",))
    for _ in range(2):
        obs = robot.reset("reach the goal")
        for _ in range(150):
            obs = robot.act(expert("reach-v3", obs.features["state"]))
            if obs.success or obs.terminated:
                break
        assert obs.success and not obs.terminated


def test_held_out_variants_are_disjoint_from_training(make_robot_connected) -> None:
    train_idx, held_idx = set(variant_indices(False)), set(variant_indices(True))
    assert not train_idx & held_idx and len(train_idx) == len(held_idx) == 25

    def goals(held_out: bool) -> tuple[set[int], set[tuple[float, ...]]]:
        robot = make_robot_connected(("push-v3",), seed=3, held_out=held_out)
        variants, goal_positions = set(), set()
        for _ in range(40):
            robot.reset("push-v3")
            variants.add(robot.current_variant)
            goal_positions.add(tuple(np.round(robot.current_raw_obs[-3:], 6)))
        return variants, goal_positions

    train_variants, train_goals = goals(held_out=False)
    held_variants, held_goals = goals(held_out=True)
    assert train_variants <= train_idx and held_variants <= held_idx
    assert len(train_variants) > 10 and len(held_variants) > 10
    assert not train_goals & held_goals  # the initial states themselves differ


def test_evaluation_episodes_draw_held_out_variants(make_robot_connected) -> None:
    robot = make_robot_connected(("reach-v3",), seed=5, held_out_eval=True)
    drawn = {True: set(), False: set()}
    for i in range(40):
        evaluation = i % 2 == 0
        robot.set_evaluation(evaluation)
        robot.reset("reach-v3")
        drawn[evaluation].add(robot.current_variant)
    assert drawn[True] <= set(variant_indices(True)) and len(drawn[True]) > 5
    assert drawn[False] <= set(variant_indices(False)) and len(drawn[False]) > 5
    plain = make_robot_connected(("reach-v3",), seed=5)  # held_out_eval off: evaluation changes nothing
    plain.set_evaluation(True)
    assert {(plain.reset("reach-v3"), plain.current_variant)[1] for _ in range(20)} <= set(variant_indices(False))


def test_dealt_variants_weigh_every_held_out_variant_the_same(make_robot_connected) -> None:
    """deal_variants (the studies' evaluation): each task's variants come as a shuffled deck, every one once
    before any repeats, in an order fixed by the seed; drawn with replacement, 25 draws miss several."""
    def deal(seed: int, deal_variants: bool = True) -> dict[str, list[int]]:
        robot = make_robot_connected(("reach-v3", "push-v3"), seed=seed, held_out=True, deal_variants=deal_variants)
        drawn = {"reach-v3": [], "push-v3": []}
        for _ in range(50):
            for task, seq in drawn.items():
                robot.reset(task)
                seq.append(robot.current_variant)
        return drawn

    dealt = deal(5)
    for seq in dealt.values():
        assert sorted(seq[:25]) == sorted(seq[25:]) == list(variant_indices(True)) and seq[:25] != seq[25:]
    assert deal(5) == dealt and deal(6) != dealt
    assert any(len(set(seq[:25])) < 25 for seq in deal(5, deal_variants=False).values())


def test_fresh_variants_sample_new_training_states_and_keep_held_out_fixed(make_robot_connected) -> None:
    """fresh_variants: every training episode starts from a new goal (seeded); evaluation still draws the
    fixed held-out variants, so no training episode can start from an evaluation state."""
    def goals(seed: int, evaluation: bool, n: int = 30) -> list[tuple[float, ...]]:
        robot = make_robot_connected(("reach-v3",), seed=seed, held_out_eval=True, fresh_variants=True)
        robot.set_evaluation(evaluation)
        out = []
        for _ in range(n):
            robot.reset("reach-v3")
            assert robot.current_variant == (-1 if not evaluation else robot.current_variant)
            out.append(tuple(np.round(robot.current_raw_obs[-3:], 6)))
            if evaluation:
                assert robot.current_variant in variant_indices(True)
        return out

    fresh = goals(7, evaluation=False)
    assert len(set(fresh)) == len(fresh)  # a new initial state every episode
    assert goals(7, evaluation=False) == fresh and goals(8, evaluation=False) != fresh  # seeded
    fixed = make_robot_connected(("reach-v3",), seed=7)
    fixed_goals = set()
    for _ in range(60):
        fixed.reset("reach-v3")
        fixed_goals.add(tuple(np.round(fixed.current_raw_obs[-3:], 6)))
    assert len(fixed_goals) <= 25 and not fixed_goals & set(fresh)  # without it: the 25 training variants
    held = set(goals(7, evaluation=True))
    assert not held & set(fresh) and len(held) > 5


def test_variant_choice_is_seeded(make_robot_connected) -> None:
    def sequence(seed: int) -> list[int | None]:
        robot = make_robot_connected(("reach-v3",), seed=seed)
        out = []
        for _ in range(8):
            robot.reset("reach-v3")
            out.append(robot.current_variant)
        return out

    assert sequence(5) == sequence(5)
    assert sequence(5) != sequence(6)


def test_instruction_mapping_round_trip() -> None:
    assert len(set(INSTRUCTIONS.values())) == len(INSTRUCTIONS) == 10
    for env_name, instruction in INSTRUCTIONS.items():
        assert instruction_for(env_name) == instruction
        assert env_name_for(instruction) == env_name
        assert env_name_for(env_name) == env_name
    assert instruction_for("button-press-topdown-v3") == "press the button from the top"
    with pytest.raises(ConfigError, match="fly to the moon"):
        env_name_for("fly to the moon")
    with pytest.raises(ConfigError, match="hammer-v3"):
        instruction_for("hammer-v3")


def test_bad_configuration_is_refused(make_robot_connected) -> None:
    with pytest.raises(ConfigError, match="tasks"):
        MetaWorldRobot([])
    with pytest.raises(ConfigError, match="max_episode_steps \\(0\\)"):
        MetaWorldRobot(["reach-v3"], max_episode_steps=0)
    robot = make_robot_connected(("reach-v3",))
    with pytest.raises(ConfigError, match="not one of this robot's tasks"):
        robot.reset("open the door")


def test_context_manager_connects_and_disconnects() -> None:
    robot = MetaWorldRobot(["reach-v3"])
    with pytest.raises(RuntimeError, match="not connected"):
        robot.reset("reach-v3")
    with robot:
        robot.reset("reach-v3")
    with pytest.raises(RuntimeError, match="not connected"):
        robot.reset("reach-v3")


def test_registry() -> None:
    robot = make_robot("metaworld", tasks=["reach-v3"], held_out=True)
    assert isinstance(robot, MetaWorldRobot) and robot.held_out
    assert ROBOTS["metaworld"] is MetaWorldRobot
    with pytest.raises(ConfigError, match="unknown robot type 'so101'.*metaworld"):
        make_robot("so101")
