"""The operator console end to end (issue #19): real redis-server, the real gateway, two simulated robots (full
edge agents, MetaWorld) whose operators are allocated by the cloud, the operators service serving its console,
and real headless Chromium clicking on the page. Take-over turns that robot's steps into interventions (its
intervention-step counter in Redis rises, the other robot's does not); hand-back stops it."""

from __future__ import annotations

import threading

import pytest

from cloud.buffer import RobotKeys
from cloud.operators.config import OperatorsConfig
from cloud.operators.service import OperatorsService
from cloud.policy_store import PolicyStore
from cloud.publisher import Publisher
from edge.agent import EdgeAgent, EdgeConfig
from edge.help import HelpConfig
from edge.loop import LoopConfig
from edge.operator import OperatorConfig
from edge.robots.config import MetaWorldConfig
from edge.sim.metaworld import SCHEMA, MetaWorldRobot
from fleet.policies import PolicyConfig, build_policy
from tests.browser import headless_chromium, needs_chromium
from tests.waiting import wait_until

TASKS = ("reach the goal",)
SMALL = PolicyConfig(chunk_size=4, n_action_steps=4, dim_model=16, n_heads=2, dim_feedforward=32,
                     n_encoder_layers=1, n_decoder_layers=1)
ROBOTS = ("r-a", "r-b")


def counters(redis_client, robot_id: str) -> tuple[int, int]:
    """(steps, intervention steps) of ``robot_id`` the buffer has stored."""
    stats = redis_client.hmget(RobotKeys(robot_id).stats, "steps", "intervention_steps")
    return int(stats[0] or 0), int(stats[1] or 0)


@needs_chromium
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_take_over_in_the_browser_turns_that_robots_steps_into_interventions(redis_proc, redis_client, gateway,
                                                                              tmp_path):
    from selenium.webdriver.support.ui import Select

    policy = build_policy(SMALL, SCHEMA, MetaWorldRobot(tasks=TASKS).tasks, seed=0)
    Publisher(PolicyStore(gateway.cfg.policy_dir, redis_client), every_steps=1).publish(policy, 1)
    # Help is never wanted (threshold 1, weights 0): no automatic assignment, only the console's; nobody holds.
    never = HelpConfig(threshold=1.0, weight_uncertainty=0.0, weight_stall=0.0, weight_risk=0.0, heartbeat_s=0.1)
    agents = [EdgeAgent(EdgeConfig(
        robot_id=rid, gateway=gateway.target, tasks=TASKS, state_dir=str(tmp_path / rid),
        loop=LoopConfig(control_hz=100.0, max_episode_steps=40, eval_every=0), backend=MetaWorldConfig(seed=i),
        heartbeat_interval_s=0.1, help_signal=never,
        operator=OperatorConfig(seed=i, allocation="allocated", hold="policy")))
        for i, rid in enumerate(ROBOTS)]
    service = OperatorsService(OperatorsConfig(redis_url=redis_proc.url, operators="alice,bob", period_s=0.1,
                                               console_listen="127.0.0.1:0"))
    stop = threading.Event()
    service_thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    service_thread.start()
    try:
        for agent in agents:
            agent.start(stop)
        wait_until(lambda: service.console is not None and service.console.url, 10, "the console to serve")
        x, y = ROBOTS
        with headless_chromium() as driver:
            driver.get(service.console.url)

            def listed() -> set[str]:
                return {tr.get_attribute("data-robot") for tr in driver.find_elements("css selector", "#robots tr")}

            wait_until(lambda: listed() == set(ROBOTS), 20, "both robots on the page")
            # both robots step, nobody intervenes
            wait_until(lambda: all(counters(redis_client, r)[0] > 0 for r in ROBOTS), 20, "steps from both robots")
            assert all(counters(redis_client, r)[1] == 0 for r in ROBOTS)

            Select(driver.find_element("id", "operator")).select_by_value("bob")
            driver.find_element("css selector", f'button.take-over[data-robot="{x}"]').click()
            y_steps = counters(redis_client, y)[0]
            wait_until(lambda: counters(redis_client, x)[1] >= 40, 30, f"{x}'s intervention steps to rise")
            wait_until(lambda: counters(redis_client, y)[0] >= y_steps + 40, 20, f"{y} to go on stepping")
            assert counters(redis_client, y)[1] == 0, "the other robot's steps became interventions"
            assert redis_client.hget(RobotKeys(x).status, "operator") == b"bob"  # what the edge acts on
            wait_until(lambda: "bob (took over)" in driver.find_element(
                "css selector", f'#robots tr[data-robot="{x}"] .assigned').text, 10, "the take-over on the page")
            wait_until(lambda: "human driving" in driver.find_element(
                "css selector", f'#robots tr[data-robot="{x}"] .badges').text, 10, "x intervening on the page")

            driver.find_element("css selector", f'button.hand-back[data-robot="{x}"]').click()
            wait_until(lambda: redis_client.hget(RobotKeys(x).status, "intervening") == b"0", 10,
                       f"{x} to report it is no longer driven")
            # steps spooled before the hand-back may still arrive: let a window of steps pass, then none may be
            # an intervention
            steps_now = counters(redis_client, x)[0]
            wait_until(lambda: counters(redis_client, x)[0] >= steps_now + 40, 20, f"more steps from {x}")
            settled = counters(redis_client, x)
            wait_until(lambda: counters(redis_client, x)[0] >= settled[0] + 60, 20, f"more steps from {x}")
            assert counters(redis_client, x)[1] == settled[1], "interventions went on after hand-back"
            assert counters(redis_client, y)[1] == 0
    finally:
        stop.set()
        for agent in agents:
            agent.stop()
        service_thread.join(10)
