"""ROS 2 backend without ROS: conversion and synchronisation with ``rosbags`` message types
(every message goes through real CDR serialisation), the robot + operator over an in-process
transport driven by the real control loop, and the rclpy node where rclpy exists."""

from __future__ import annotations

import io
import os
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.hotswap import PolicySlot
from edge.images import ImageEncodingSink
from edge.loop import ControlLoop, LoopConfig
from edge.help import HelpBoard
from edge.operator import AllocatedOperator, NoOperator
from edge.robots.base import make_robot
from fleet import ros2_convert as convert
from edge.robots.ros2.config import load_config
from edge.robots.ros2.robot import Ros2Operator, Ros2Robot
from edge.robots.ros2.sync import ApproximateTimeSync
from edge.spool import Spool
from fleet.codec import decode_image
from fleet.errors import ConfigError, InvalidInput
from fleet.policies.base import NullPolicy
from fleet.types import OperatorAssignment

TYPES = convert.RosbagsTypes()
STORE = TYPES.typestore
JOINTS = ("shoulder", "elbow", "wrist")
MS = 1_000_000


def wire(msg, msgtype: str):
    """Serialise to CDR and back, as a message arriving over DDS would be."""
    return STORE.deserialize_cdr(STORE.serialize_cdr(msg, msgtype), msgtype)


def joint_state(names, positions, ns, velocity=None):
    msg = TYPES.new(convert.JOINT_STATE, header=convert.header(TYPES, ns), name=list(names),
                    position=TYPES.floats(positions), velocity=TYPES.floats(velocity or []), effort=TYPES.floats([]))
    return wire(msg, convert.JOINT_STATE)


# ------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("encoding,channels", [("rgb8", 3), ("bgr8", 3), ("rgba8", 4), ("mono8", 1)])
def test_image_encodings_and_row_padding(encoding, channels):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)
    raw = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "rgba8": np.dstack([rgb, np.full((5, 7), 9, np.uint8)]),
           "mono8": rgb[..., :1]}[encoding]
    step = 7 * channels + 3  # rows padded to a stride, as drivers do
    padded = np.zeros((5, step), np.uint8)
    padded[:, : 7 * channels] = raw.reshape(5, -1)
    msg = wire(TYPES.new(convert.IMAGE, header=convert.header(TYPES, 5), height=5, width=7, encoding=encoding,
                         is_bigendian=0, step=step, data=TYPES.octets(padded.tobytes())), convert.IMAGE)
    pixels = convert.image_array(msg)
    expected = np.repeat(rgb[..., :1], 3, axis=2) if encoding == "mono8" else rgb
    np.testing.assert_array_equal(pixels, expected)


def test_image_round_trip_and_bad_input():
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    msg = wire(convert.image_msg(TYPES, pixels, 1_500_000_123), convert.IMAGE)
    assert convert.stamp_ns(msg) == 1_500_000_123
    np.testing.assert_array_equal(convert.image_array(msg), pixels)
    msg.encoding = "32FC1"
    with pytest.raises(InvalidInput, match="32FC1"):
        convert.image_array(msg)
    short = wire(TYPES.new(convert.IMAGE, header=convert.header(TYPES, 0), height=4, width=6, encoding="rgb8",
                           is_bigendian=0, step=18, data=TYPES.octets(b"\0" * 10)), convert.IMAGE)
    with pytest.raises(InvalidInput, match="10 bytes"):
        convert.image_array(short)


def test_compressed_png_decodes_exactly():
    pixels = np.random.default_rng(1).integers(0, 255, (8, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    msg = wire(convert.compressed_image_msg(TYPES, buf.getvalue(), "png", 7), convert.COMPRESSED_IMAGE)
    np.testing.assert_array_equal(convert.compressed_array(msg), pixels)
    msg.data = TYPES.octets(b"not an image")
    with pytest.raises(InvalidInput, match="cannot decode"):
        convert.compressed_array(msg)


def test_joint_state_is_reordered_by_name_and_missing_joints_are_named():
    msg = joint_state(["wrist", "shoulder", "elbow", "gripper"], [3.0, 1.0, 2.0, 9.0], 0, [30, 10, 20, 90])
    np.testing.assert_array_equal(convert.joint_vector(msg, JOINTS), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(convert.joint_vector(msg, JOINTS, ("position", "velocity")),
                                  [1, 2, 3, 10, 20, 30])
    with pytest.raises(InvalidInput, match="lacks joints \\['elbow'\\]"):
        convert.joint_vector(joint_state(["shoulder", "wrist"], [1.0, 2.0], 0), JOINTS)
    with pytest.raises(InvalidInput, match="effort has 0 values"):
        convert.joint_vector(msg, JOINTS, ("effort",))


@pytest.mark.parametrize("kind", ["joint_state", "float64_multi_array", "joint_trajectory"])
def test_action_messages_carry_the_action(kind):
    action = np.array([0.5, -1.25, 2.0])
    msg = wire(convert.action_msg(kind, TYPES, JOINTS, action, 42 * MS, 0.25), convert.ACTION_MSGTYPES[kind])
    if kind == "joint_state":
        assert list(msg.name) == list(JOINTS) and convert.stamp_ns(msg) == 42 * MS
        np.testing.assert_array_equal(msg.position, action)
    elif kind == "float64_multi_array":
        np.testing.assert_array_equal(msg.data, action)
        assert msg.layout.dim[0].size == 3
    else:
        assert list(msg.joint_names) == list(JOINTS) and len(msg.points) == 1
        np.testing.assert_array_equal(msg.points[0].positions, action)
        assert (msg.points[0].time_from_start.sec, msg.points[0].time_from_start.nanosec) == (0, 250_000_000)
    with pytest.raises(InvalidInput, match="2 values for 3 joints"):
        convert.action_msg(kind, TYPES, JOINTS, action[:2], 0)


def test_teleop_commands():
    js = joint_state(["elbow", "shoulder", "wrist"], [2.0, 1.0, 3.0], 0)
    np.testing.assert_array_equal(convert.teleop_vector(js, "joint_state", JOINTS), [1, 2, 3])
    arr = wire(convert.multi_array_msg(TYPES, np.array([4.0, 5.0, 6.0])), convert.FLOAT64_MULTI_ARRAY)
    np.testing.assert_array_equal(convert.teleop_vector(arr, "float64_multi_array", JOINTS), [4, 5, 6])
    with pytest.raises(InvalidInput, match="2 values for 3 joints"):
        convert.teleop_vector(wire(convert.multi_array_msg(TYPES, np.zeros(2)), convert.FLOAT64_MULTI_ARRAY),
                              "float64_multi_array", JOINTS)


def test_config_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="joint_names"):
        load_config({"cameras": {}})
    with pytest.raises(ConfigError, match="action_type.*'twist'"):
        load_config({"joint_names": ["a"], "action_type": "twist"})
    with pytest.raises(ConfigError, match="unknown field.*'topics'"):
        load_config({"joint_names": ["a"], "topics": {}})
    with pytest.raises(ConfigError, match="height"):
        load_config({"joint_names": ["a"], "cameras": {"front": {"topic": "/c", "height": 0, "width": 4}}})


# ---------------------------------------------------------------------- synchronisation


def test_approximate_time_sync_matches_within_slop_only():
    got = []
    sync = ApproximateTimeSync(["joints", "cam"], slop_ns=10 * MS, queue_size=5, on_match=got.append)
    assert sync.add("joints", 100 * MS, "j100") is None  # nothing to pair with yet
    assert sync.add("cam", 125 * MS, "c125") is None  # 25 ms apart: beyond the slop
    m = sync.add("joints", 120 * MS, "j120")  # 5 ms from c125
    assert m is not None and m.messages == {"joints": (120 * MS, "j120"), "cam": (125 * MS, "c125")}
    assert m.stamp_ns == 125 * MS and got == [m]
    # j100 was older than the match: dropped; a late message older than the match is ignored.
    assert sync.add("cam", 101 * MS, "c101") is None and sync.dropped == 1
    assert sync.add("cam", 140 * MS, "c140") is None
    assert sync.add("joints", 150 * MS, "j150").messages["cam"] == (140 * MS, "c140")


def test_sync_picks_a_consistent_set_of_three():
    sync = ApproximateTimeSync(["a", "b", "c"], slop_ns=10, queue_size=10, on_match=lambda m: None)
    sync.add("b", 101, "b101")
    sync.add("c", 103, "c103")
    sync.add("c", 116, "c116")
    # a=110: c116 is the nearest c but spans 15 with the only b (b101); c103 spans 9 -> chosen.
    m = sync.add("a", 110, "a110")
    assert {k: v[1] for k, v in m.messages.items()} == {"a": "a110", "b": "b101", "c": "c103"}


def test_sync_out_of_order_and_queue_bound():
    sync = ApproximateTimeSync(["a", "b"], slop_ns=1, queue_size=2, on_match=lambda m: None)
    for stamp in (30, 10, 20):  # out of order; the oldest (10) falls out of the 2-deep queue
        sync.add("a", stamp, f"a{stamp}")
    assert sync.add("b", 10, "b10") is None
    assert sync.add("b", 20, "b20").messages["a"] == (20, "a20")


# --------------------------------------------------------------- robot over a transport


class LoopbackTransport:
    """In-process stand-in for the rclpy node: a simulated arm answers each action with a new
    joint state and camera frame (stamped a few ms apart), delivered through rosbags CDR."""

    def __init__(self, cfg, camera_skew_ns=3 * MS):
        self.types = TYPES
        self.cfg = cfg
        self.bridge = None
        self.actions = []
        self.events = []
        self.positions = np.zeros(len(cfg.joint_names))
        self.clock_ns = 1_000 * MS
        self.skew = camera_skew_ns
        self.resets = 0

    def start(self, bridge):
        self.bridge = bridge
        self._sense()

    def stop(self):
        self.bridge = None

    def now_ns(self):
        return self.clock_ns

    def _sense(self):
        self.clock_ns += 50 * MS
        self.bridge.on_joint_state(joint_state(self.cfg.joint_names, self.positions, self.clock_ns))
        frame = np.zeros((6, 8, 3), np.uint8)
        frame[..., 0] = np.clip(self.positions[0] * 50 + 100, 0, 255)
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        cam = convert.compressed_image_msg(TYPES, buf.getvalue(), "png", self.clock_ns + self.skew)
        self.bridge.on_image("front", wire(cam, convert.COMPRESSED_IMAGE))

    def publish_action(self, msg):
        msg = wire(msg, convert.JOINT_TRAJECTORY)
        self.actions.append(msg)
        self.positions = np.asarray(msg.points[0].positions, dtype=np.float64)
        self._sense()

    def publish_episode(self, msg):
        self.events.append(json.loads(wire(msg, convert.STRING).data))
        self._sense()  # sensors stream on between episodes too

    def topic_types(self):
        return {}

    def wait_reset_service(self, timeout_s):
        return True

    def call_reset(self, timeout_s):
        self.resets += 1
        self.positions = np.zeros_like(self.positions)
        self._sense()
        return True


ROS_CFG = {"joint_names": list(JOINTS), "action_type": "joint_trajectory", "reset_service": "/arm/home",
           "teleop_type": "float64_multi_array", "embodiment": "toy-ros-arm", "slop_s": 0.005,
           "observation_timeout_s": 0.5, "reset_timeout_s": 2.0,
           "cameras": {"front": {"topic": "/cam/compressed", "height": 6, "width": 8, "compressed": True}}}


def test_schema_and_a_step_over_the_transport():
    cfg = load_config(ROS_CFG)
    transport = LoopbackTransport(cfg)
    robot = make_robot("ros2", tasks=["wave"], config=ROS_CFG, transport=transport)
    assert isinstance(robot, Ros2Robot) and robot.embodiment == "toy-ros-arm"
    assert [(f.name, f.shape, f.is_image) for f in robot.schema.observation] == [
        ("state", (3,), False), ("front", (6, 8, 3), True)]
    with robot:
        first = robot.reset("wave")
        assert transport.resets == 1 and transport.events == [{"event": "start", "episode": 1, "task": "wave"}]
        np.testing.assert_array_equal(first.features["state"], [0, 0, 0])
        obs = robot.act(np.array([1.0, 2.0, 3.0], np.float32))
        np.testing.assert_array_equal(obs.features["state"], [1, 2, 3])
        assert obs.features["front"][0, 0, 0] == 150 and not obs.terminated
        robot.bridge.on_episode_end(True)  # another node says: done, success
        done = robot.act(np.array([1.0, 2.0, 3.0], np.float32))
        assert done.success and done.terminated
        assert transport.events[-1] == {"event": "end", "episode": 1, "success": True}


def test_missing_camera_ends_the_episode_instead_of_hanging():
    cfg = load_config({**ROS_CFG, "observation_timeout_s": 0.05})
    transport = LoopbackTransport(cfg, camera_skew_ns=40 * MS)  # never within the 5 ms slop
    robot = Ros2Robot(["wave"], cfg, transport=transport)
    transport.start(robot.bridge)
    transport.skew = 0
    transport._sense()  # one matched set to start from
    robot.reset("wave")
    transport.skew = 40 * MS
    obs = robot.act(np.zeros(3, np.float32))
    assert obs.terminated and not obs.success


def test_a_console_take_over_reads_the_teleop_topic_whatever_the_intervention_topic_says():
    """Allocated mode, manual assignment: the teleop topic's command drives, the intervention topic is not asked."""
    robot = Ros2Robot(["wave"], load_config({**ROS_CFG, "reset_service": ""}), transport=None)
    operator = AllocatedOperator(robot.make_operator(), HelpBoard())
    robot.bridge.on_teleop(wire(convert.multi_array_msg(TYPES, np.array([0.25, 0.5, 0.75])),
                                convert.FLOAT64_MULTI_ARRAY))
    assert not robot.bridge.intervening
    operator.board.assign(OperatorAssignment("op-1", manual=False))
    assert operator.decide(None, np.zeros(3, np.float32)) is None  # its own gating: the topic says no
    operator.board.assign(OperatorAssignment("op-1", manual=True))
    np.testing.assert_allclose(operator.decide(None, np.zeros(3, np.float32)), [0.25, 0.5, 0.75])


def test_control_loop_records_interventions_from_ros_topics(tmp_path):
    cfg = load_config({**ROS_CFG, "reset_service": ""})
    transport = LoopbackTransport(cfg)
    robot = Ros2Robot(["wave"], cfg, transport=transport)
    operator = robot.make_operator()
    assert isinstance(operator, Ros2Operator)
    bool_msg = TYPES.new(convert.BOOL, data=True)
    teleop = wire(convert.multi_array_msg(TYPES, np.array([0.5, 0.5, 0.5])), convert.FLOAT64_MULTI_ARRAY)

    class Driver:  # flips the intervention topic on for steps 3..5 of each episode
        def __init__(self, inner):
            self.inner = inner

        def record(self, episode_id, task, evaluation, step, end):
            on = 2 <= step.index < 5
            robot.bridge.on_intervention(TYPES.new(convert.BOOL, data=on) if not on else bool_msg)
            if on:
                robot.bridge.on_teleop(teleop)
            self.inner.record(episode_id, task, evaluation, step, end)

    spool = Spool(tmp_path / "spool.db", robot.schema)
    loop = ControlLoop("ros-1", robot, PolicySlot(NullPolicy((3,), "float32")), operator,
                       Driver(ImageEncodingSink(spool, robot.schema, "png")),
                       LoopConfig(max_episode_steps=8, realtime=False, max_episodes=2))
    with robot:
        loop.start()
        assert loop.wait_episodes(2, timeout_s=30)
        loop.stop()
    assert loop.error is None
    steps = spool.steps(spool.read_after(0, max_steps=100))
    steps += spool.steps(spool.read_after(steps[-1].seq, max_steps=100))
    assert len(steps) == 16
    for s in steps:
        assert set(s.observation) == {"state"} and decode_image(s.images["front"]).shape == (6, 8, 3)
        # the recording of step k decides whether step k+2 (one tick late + one tick) is driven
        assert s.is_intervention == (3 <= s.index < 6), s.index
        expected = [0.5, 0.5, 0.5] if s.is_intervention else [0, 0, 0]
        np.testing.assert_array_equal(s.action, expected)
    # what was published is what was recorded as executed
    executed = [list(m.points[0].positions) for m in transport.actions]
    assert executed == [list(map(float, s.action)) for s in steps]
    assert isinstance(Ros2Robot(["wave"], {**ROS_CFG, "teleop_topic": ""}).make_operator(), NoOperator)


def test_the_ros2_backend_never_loads_the_simulator():
    """A real robot's edge (agent + ros2 backend) must not need MetaWorld or MuJoCo."""
    code = ("import sys, edge.agent, edge.robots.ros2.robot; "
            "print(sorted(m for m in ('metaworld', 'mujoco') if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------- rclpy


def test_rclpy_node_round_trip():
    rclpy = pytest.importorskip("rclpy", reason="rclpy missing: pip install -e '.[ros2]'")
    from rclpy.node import Node
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray

    cfg = {"joint_names": list(JOINTS), "action_type": "float64_multi_array", "node_name": "fleet_edge_test",
           "joint_state_topic": "/test_fleet/joint_states", "action_topic": "/test_fleet/command",
           "reset_timeout_s": 10.0}
    robot = Ros2Robot(["wave"], cfg)
    rclpy.init()
    peer = Node("fleet_edge_peer")
    received = []
    peer.create_subscription(Float64MultiArray, "/test_fleet/command", lambda m: received.append(list(m.data)), 10)
    pub = peer.create_publisher(JointState, "/test_fleet/joint_states", 10)
    def publish():
        msg = JointState(name=list(JOINTS), position=[0.1, 0.2, 0.3])
        msg.header.stamp = peer.get_clock().now().to_msg()
        pub.publish(msg)

    timer = peer.create_timer(0.02, publish)  # the driver streams before the robot connects
    spin = threading.Thread(target=lambda: rclpy.spin(peer), daemon=True)
    spin.start()
    try:
        with robot:
            obs = robot.reset("wave")
            np.testing.assert_allclose(obs.features["state"], [0.1, 0.2, 0.3], rtol=1e-6)
            robot.act(np.array([1.0, 2.0, 3.0], np.float32))
            peer.destroy_timer(timer)
    finally:
        peer.destroy_node()
        rclpy.shutdown()
    assert [1.0, 2.0, 3.0] in received
