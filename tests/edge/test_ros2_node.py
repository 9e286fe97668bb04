"""The ROS 2 backend over real DDS (rclpy from the ``ros2`` extra; skipped without it): bad and
missing input against real processes. The driver is `fleet ros2-sim-robot` (a MetaWorld arm
as a ROS 2 driver, its own process); the edge is a real rclpy node in this process, or
`fleet edge --backend.type=ros2` as a process where the exit status is the point."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="rclpy missing: pip install -e '.[ros2]'")

from edge.hotswap import PolicySlot  # noqa: E402
from edge.images import ImageEncodingSink  # noqa: E402
from edge.loop import ControlLoop, LoopConfig  # noqa: E402
from edge.robots.ros2.robot import Disconnected, Ros2Robot  # noqa: E402
from edge.sim.ros2_arm_config import COMMAND_NAMES, JOINT_NAMES, SimArmConfig  # noqa: E402
from edge.spool import Spool  # noqa: E402
from fleet.errors import ConfigError  # noqa: E402
from fleet.policies.base import NullPolicy  # noqa: E402
from tests.ros2_procs import Proc, read_stats, start_sim_arm  # noqa: E402

TASK = "reach the goal"
pytestmark = pytest.mark.timeout(120)


def section(**overrides) -> dict:
    return {**SimArmConfig().edge_backend_section(), "startup_timeout_s": 10.0, **overrides}


def spooled(spool: Spool) -> list:
    steps, seq = [], 0
    while (batch := spool.read_after(seq, max_steps=1000)) is not None:
        steps += spool.steps(batch)
        seq = steps[-1].seq
    return steps


def test_wrong_message_type_on_a_configured_topic_is_refused_at_start(ros_domain):
    import rclpy
    from rclpy.node import Node
    from std_msgs.msg import String

    context = rclpy.Context()
    rclpy.init(context=context)
    peer = Node("wrong_driver", context=context)
    pub = peer.create_publisher(String, "/wrong/joint_states", 10)
    robot = Ros2Robot([TASK], section(joint_state_topic="/wrong/joint_states", node_name="fleet_edge_wrong"))
    try:
        pub.publish(String(data="not a joint state"))
        with pytest.raises(ConfigError, match=r"/wrong/joint_states carries std_msgs/msg/String.*"
                                               r"sensor_msgs/msg/JointState"):
            robot.connect()
    finally:
        robot.disconnect()
        peer.destroy_node()
        rclpy.shutdown(context=context)


def test_a_topic_that_never_publishes_exits_2_naming_it(tmp_path, ros_domain):
    config = {"robot_id": "ros-silent", "tasks": [TASK], "state_dir": str(tmp_path / "edge"),
              "backend": section(joint_state_topic="/silent/joint_states", startup_timeout_s=1.5)}
    (tmp_path / "edge.json").write_text(json.dumps(config))
    edge = Proc(["edge", "--config_path", str(tmp_path / "edge.json")], tmp_path / "edge.log")
    assert edge.popen.wait(90) == 2, edge.log()[-3000:]
    assert "fleet edge: error: ros2: no message on /silent/joint_states within startup_timeout_s" in edge.log()
    assert "Traceback" not in edge.log()


def run_loop(robot: Ros2Robot, spool: Spool, **loop_options) -> ControlLoop:
    loop = ControlLoop("ros-test", robot, PolicySlot(NullPolicy((len(COMMAND_NAMES),), "float32")),
                       robot.make_operator(), ImageEncodingSink(spool, robot.schema, "jpeg"),
                       LoopConfig(**{"control_hz": 30.0, "max_episode_steps": 15, **loop_options}))
    loop.start()
    return loop


def test_stale_sensor_data_holds_without_commanding(tmp_path, ros_domain):
    stats = tmp_path / "sim.json"
    sim = start_sim_arm(tmp_path / "sim.log", "--stamp_lag_s", "1.0", "--stats_path", str(stats),
                        "--node_name", "sim_stale")
    robot = Ros2Robot([TASK], section(max_sensor_age_s=0.3, node_name="fleet_edge_stale"))
    spool = Spool(tmp_path / "spool.db", robot.schema)
    loop = None
    try:
        robot.connect()  # the topics publish, so start-up passes
        loop = run_loop(robot, spool)
        sim.wait_for(lambda: robot.holds >= 1, "the robot to hold", timeout_s=10)
        assert robot.bridge.latest_stamp_ns() > 0  # observations do arrive; they are too old to act on
    finally:
        robot.disconnect()  # wakes the held reset: the loop thread ends with Disconnected
        if loop is not None:
            loop.stop()
        sim.stop()
    assert isinstance(loop.error, Disconnected)
    assert loop.stats().steps == 0 and spooled(spool) == []
    assert read_stats(stats)["commands"] == 0, "a command was sent on stale data"


def test_the_driver_dying_makes_the_edge_hold_and_resume_when_it_is_back(tmp_path, ros_domain):
    options = ("--rate_hz", "60", "--camera_height", "24", "--camera_width", "32", "--node_name", "sim_restart")
    first = start_sim_arm(tmp_path / "sim1.log", *options)
    cfg = SimArmConfig(rate_hz=60, camera_height=24, camera_width=32)
    robot = Ros2Robot([TASK], {**cfg.edge_backend_section(), "node_name": "fleet_edge_restart",
                               "observation_timeout_s": 0.3, "reset_timeout_s": 2.0})
    spool = Spool(tmp_path / "spool.db", robot.schema)
    second = loop = None
    try:
        robot.connect()
        loop = run_loop(robot, spool)
        assert loop.wait_episodes(1, timeout_s=20), loop.error
        first.kill()  # SIGKILL: the driver is gone mid-episode
        deadline = time.monotonic() + 10
        while robot.holds == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert robot.holds >= 1, "the robot did not hold after its driver died"
        held_at = loop.stats().steps
        second = start_sim_arm(tmp_path / "sim2.log", *options)  # takes seconds: nothing may be commanded
        # the tick in flight when the hold began, and the step the loop records one tick late (pending)
        assert loop.stats().steps <= held_at + 2
        episodes = loop.stats().episodes
        assert loop.wait_episodes(episodes + 2, timeout_s=30), "the loop did not resume with the new driver"
    finally:
        robot.disconnect()
        if loop is not None:
            loop.stop()
        for proc in (first, second):
            if proc is not None:
                proc.stop()
    assert loop.error is None or isinstance(loop.error, Disconnected)
    steps = spooled(spool)
    assert len(steps) > held_at  # recorded on after the new driver came up
    for s in steps:
        assert s.observation["state"].shape == (2 * len(JOINT_NAMES),) and np.isfinite(s.observation["state"]).all()
        assert "front" in s.images
