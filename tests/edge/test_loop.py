"""The control loop with a real MetaWorld robot, an in-test sink and scripted policies."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge.hotswap import PolicySlot
from edge.loop import ControlLoop, LoopConfig
from edge.operator import NoOperator, OperatorConfig
from edge.sim.operator import SimulatedOperator
from fleet.errors import ConfigError


def make_loop(robot, policy, sink, operator=None, on_episode_end=None, **config) -> ControlLoop:
    """A loop for robot "r1"; ``config`` are LoopConfig fields (realtime=False unless given)."""
    config.setdefault("realtime", False)
    return ControlLoop(
        "r1",
        robot,
        PolicySlot(policy),
        operator if operator is not None else NoOperator(),
        sink,
        LoopConfig(**config),
        on_episode_end=on_episode_end,
    )


def test_steps_are_recorded_with_correct_fields(make_robot_connected, make_policy, make_sink) -> None:
    robot = make_robot_connected(("reach-v3",))
    resets: list[np.ndarray] = []
    original_reset = robot.reset

    def reset(task: str):
        obs = original_reset(task)
        resets.append(obs.features["state"])
        return obs

    robot.reset = reset  # type: ignore[method-assign]
    sink = make_sink()
    ended = []
    loop = make_loop(
        robot,
        make_policy("zero", version=3),
        sink,
        on_episode_end=lambda summary, task: ended.append((summary, task)),
        max_episode_steps=20,
    )
    summaries = [loop.run_episode(), loop.run_episode()]

    episodes = sink.episodes()
    assert len(episodes) == 2
    for episode, first_obs, summary in zip(episodes, resets, summaries, strict=True):
        steps = [rec.step for rec in episode]
        assert [s.index for s in steps] == list(range(20))
        assert [s.done for s in steps] == [False] * 19 + [True]
        assert [rec.episode_end is not None for rec in episode] == [False] * 19 + [True]
        assert episode[-1].episode_end == summary
        assert summary.num_steps == 20 and not summary.success and not summary.evaluation
        assert summary.policy_version == 3 and summary.interventions == 0
        assert {rec.task for rec in episode} == {"reach the goal"}
        assert episode[0].episode_id.startswith("r1-") and len({rec.episode_id for rec in episode}) == 1
        np.testing.assert_array_equal(steps[0].observation["state"], first_obs)  # obs the action was chosen on
        for prev, step in zip(steps, steps[1:]):
            assert step.timestamp_s >= prev.timestamp_s
        for step in steps:
            assert step.seq == 0 and step.policy_version == 3 and not step.is_intervention
            assert step.observation["state"].dtype == np.float32 and step.observation["state"].shape == (39,)
            assert step.action.dtype == np.float32 and step.action.shape == (4,)
            np.testing.assert_array_equal(step.action, step.policy_action)
            assert isinstance(step.reward, float)
    assert episodes[0][0].episode_id != episodes[1][0].episode_id
    assert [t for _, t in ended] == ["reach the goal"] * 2 and [s for s, _ in ended] == summaries
    stats = loop.stats()
    assert (stats.episodes, stats.steps, stats.successes) == (2, 40, 0)
    assert [t for _, t in stats.recent] == ["reach the goal"] * 2


def test_episode_ends_on_success(make_robot_connected, make_policy, make_sink) -> None:
    robot = make_robot_connected(("reach-v3",))
    sink = make_sink()
    summary = make_loop(robot, make_policy("expert"), sink, max_episode_steps=150).run_episode()
    steps = [rec.step for rec in sink.records]
    assert summary.success and summary.num_steps == len(steps) < 150
    assert steps[-1].success and steps[-1].done and not any(s.done for s in steps[:-1])


def test_interventions_are_flagged(make_robot_connected, make_policy, make_sink) -> None:
    robot = make_robot_connected(("button-press-topdown-v3",))
    sink = make_sink()
    policy = make_policy("zero")
    operator = SimulatedOperator(OperatorConfig(segment_steps=10))
    summary = make_loop(robot, policy, sink, operator=operator, max_episode_steps=60).run_episode()
    steps = [rec.step for rec in sink.records]
    flags = [s.is_intervention for s in steps]
    take_overs = sum(1 for i, f in enumerate(flags) if f and (i == 0 or not flags[i - 1]))
    hand_backs = sum(1 for i, f in enumerate(flags[1:], 1) if not f and flags[i - 1])
    assert take_overs >= 2 and summary.interventions == take_overs
    assert summary.intervention_steps == sum(flags)
    for step in steps:
        if step.is_intervention:
            assert not np.allclose(step.action, step.policy_action)
        else:
            np.testing.assert_array_equal(step.action, step.policy_action)
    # One reset at episode start, one per hand-back (stale action chunks are dropped).
    assert policy.resets == 1 + hand_backs


def test_eval_episodes_have_no_interventions(make_robot_connected, make_policy, make_sink) -> None:
    robot = make_robot_connected(("button-press-topdown-v3", "drawer-close-v3"))
    sink = make_sink()
    loop = make_loop(
        robot, make_policy("zero"), sink, operator=SimulatedOperator(), eval_every=2, max_episode_steps=25
    )
    for _ in range(4):
        loop.run_episode()
    episodes = sink.episodes()
    assert [ep[0].evaluation for ep in episodes] == [False, True, False, True]
    assert [ep[0].task for ep in episodes] == ["press the button from the top", "close the drawer"] * 2
    for ep in episodes:
        assert all(rec.evaluation == ep[0].evaluation for rec in ep)
        intervened = any(rec.step.is_intervention for rec in ep)
        assert intervened != ep[0].evaluation
        assert ep[-1].episode_end is not None and ep[-1].episode_end.evaluation == ep[0].evaluation
    stats = loop.stats()
    assert (stats.episodes, stats.eval_episodes, stats.eval_successes) == (4, 2, 0)


def test_random_task_order_is_seeded(make_robot_connected, make_policy, make_sink) -> None:
    robot = make_robot_connected(("reach-v3", "drawer-close-v3", "button-press-topdown-v3"))

    def order(seed: int) -> list[str]:
        sink = make_sink()
        loop = make_loop(robot, make_policy("zero"), sink, task_order="random", seed=seed, max_episode_steps=1)
        for _ in range(12):
            loop.run_episode()
        return [ep[0].task for ep in sink.episodes()]

    assert order(1) == order(1) and set(order(1)) == set(robot.tasks)


def test_policy_swaps_only_between_episodes(make_robot_connected, make_policy, make_sink) -> None:
    robot = make_robot_connected(("reach-v3",))
    old, new = make_policy("zero", version=1), make_policy("zero", version=2)
    holder: dict[str, PolicySlot] = {}

    def offer_mid_episode(rec) -> None:
        if rec.step.index == 5 and rec.step.policy_version == 1:
            holder["slot"].offer(new)

    sink = make_sink(on_record=offer_mid_episode)
    loop = make_loop(robot, old, sink, max_episode_steps=15, max_episodes=3)
    holder["slot"] = loop.slot
    loop.start()
    assert loop.wait_episodes(3, timeout_s=20)
    assert loop.stop(timeout_s=5) and loop.error is None
    assert sink.threads == {"control-r1"}
    episodes = sink.episodes()
    assert len(episodes) == 3  # max_episodes
    assert {rec.step.policy_version for rec in episodes[0]} == {1}
    assert {rec.step.policy_version for ep in episodes[1:] for rec in ep} == {2}
    assert [ep[-1].episode_end.policy_version for ep in episodes] == [1, 2, 2]
    assert loop.slot.swapped.is_set() and new.resets >= 1


def test_stop_ends_promptly_with_a_truncated_episode(make_robot_connected, make_policy, make_sink) -> None:
    robot = make_robot_connected(("reach-v3",), max_episode_steps=1000)  # past MetaWorld's default 500
    three_steps = threading.Event()
    sink = make_sink(on_record=lambda rec: three_steps.set() if rec.step.index >= 2 else None)
    loop = make_loop(robot, make_policy("zero"), sink, realtime=True, control_hz=10.0, max_episode_steps=1000)
    loop.start()
    assert three_steps.wait(timeout=10)
    started = time.perf_counter()
    assert loop.stop(timeout_s=2.0)
    assert time.perf_counter() - started < 0.3  # well under one 100 ms tick plus the step
    assert not loop.running
    records = sink.records
    assert [rec.step.done for rec in records] == [False] * (len(records) - 1) + [True]
    end = records[-1].episode_end
    assert end is not None and not end.success and end.num_steps == len(records)
    assert loop.stats().episodes == 1


def test_loop_holds_the_control_rate(make_robot_connected, make_policy, make_sink) -> None:
    robot = make_robot_connected(("reach-v3",))
    sink = make_sink()
    loop = make_loop(robot, make_policy("zero"), sink, realtime=True, control_hz=50.0, max_episode_steps=25)
    loop.run_episode()
    stamps = [rec.step.timestamp_s for rec in sink.records]
    assert len(stamps) == 25
    rate_hz = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    assert 40.0 <= rate_hz <= 60.0, rate_hz
    stats = loop.stats()
    assert stats.steps == 25


@pytest.mark.parametrize("bad_mode", ["nan", "raise"])
def test_bad_policy_is_rolled_back(make_robot_connected, make_policy, make_sink, bad_mode: str) -> None:
    robot = make_robot_connected(("reach-v3",))
    good, bad = make_policy("expert", version=1), make_policy(bad_mode, version=2)
    sink = make_sink()
    loop = make_loop(robot, good, sink, max_episode_steps=150)
    loop.slot.offer(bad)
    summary = loop.run_episode()  # swaps to v2 at the boundary; v2's first action is NaN
    steps = [rec.step for rec in sink.records]
    assert bad.calls == 1 and loop.slot.current is good
    assert steps[0].policy_version == 2
    np.testing.assert_array_equal(steps[0].action, np.zeros(4, dtype=np.float32))
    assert all(np.all(np.isfinite(s.policy_action)) for s in steps)
    assert {s.policy_version for s in steps[1:]} == {1}
    assert summary.success and summary.policy_version == 1
    assert loop.stats().bad_actions == 1


def test_nan_policy_without_fallback_acts_with_the_operator(make_robot_connected, make_policy, make_sink) -> None:
    robot = make_robot_connected(("reach-v3",))
    sink = make_sink()
    operator = SimulatedOperator(OperatorConfig(divergence_steps=1, segment_steps=200))
    summary = make_loop(robot, make_policy("nan"), sink, operator=operator, max_episode_steps=150).run_episode()
    assert summary.success  # the operator drove the whole episode
    assert all(rec.step.is_intervention for rec in sink.records)


def test_wait_episodes_times_out_and_loop_errors_surface(make_robot_connected, make_policy, make_sink) -> None:
    robot = make_robot_connected(("reach-v3",))
    loop = make_loop(robot, make_policy("zero"), make_sink())
    assert not loop.wait_episodes(1, timeout_s=0.05)
    robot.disconnect()  # reset() now raises on the control thread
    loop.start()
    assert not loop.wait_episodes(1, timeout_s=10)
    assert isinstance(loop.error, RuntimeError)
    assert loop.stop(timeout_s=1)


@pytest.mark.parametrize(
    ("field", "value"),
    [("control_hz", 0.0), ("max_episode_steps", 0), ("eval_every", -1), ("task_order", "lifo"), ("max_episodes", -2)],
)
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"{field} \\("):
        LoopConfig(**{field: value})
