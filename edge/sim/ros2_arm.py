"""``fleet ros2-sim-robot``: a MetaWorld Sawyer behind the ROS 2 interfaces of a ros2_control arm.

A separate process (a ROS 2 node of its own; this module is never imported on a real
robot's path), so that ``fleet edge --backend.type=ros2`` can be tried, tested and measured over
real DDS without hardware. At ``rate_hz`` it steps MetaWorld with the latest command and
publishes what a ros2_control arm driver publishes:

* ``sensor_msgs/JointState`` on ``joint_state_topic``: the Sawyer's 7 arm joints and 2 finger
  joints (position, velocity), stamped with the node's clock;
* optionally ``sensor_msgs/Image`` (rgb8) on ``camera_topic``, same stamp: a synthetic frame
  drawn from the simulator's state (hand, object and goal as squares on a fixed background;
  CPU rendering of the MuJoCo scene runs at ~9 fps, too slow for a 30 Hz stream);
* ``std_msgs/Bool`` on ``episode_end_topic`` once per episode: true when the task succeeds,
  false when ``max_episode_steps`` ticks pass (the arm then holds until the next reset).

It takes commands as a forward_command_controller does (``std_msgs/Float64MultiArray``) or as
a joint_trajectory_controller does (``trajectory_msgs/JointTrajectory``, first point's
positions), both in MetaWorld's action space (``COMMAND_NAMES``: end-effector xyz delta and
gripper effort); without a command fresher than ``command_timeout_s`` it holds still. A
``std_srvs/Trigger`` on ``reset_service`` starts a new episode (a new MetaWorld variant).

With ``teleop`` it also plays the operator of a teleop station: MetaWorld's scripted expert
drives for ``teleop_segment_steps`` of every ``teleop_period_steps`` ticks of an episode,
publishing ``std_msgs/Bool`` true on ``intervention_topic`` and the expert's action on
``teleop_topic`` (``Float64MultiArray``), and false otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import numpy as np
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from std_msgs.msg import Bool, Float64MultiArray
from std_srvs.srv import Trigger

from fleet import ros2_convert as convert
from edge.robots.ros2.node import RclpyTypes
from edge.sim.ros2_arm_config import COMMAND_NAMES, JOINT_NAMES, SimArmConfig

log = logging.getLogger(__name__)

class SyntheticCamera:
    """A cheap RGB frame of the scene: hand (red), object (green) and goal (blue) seen from above."""

    def __init__(self, height: int, width: int, seed: int):
        rng = np.random.default_rng(seed)
        ys, xs = np.mgrid[0:height, 0:width]
        base = np.stack([xs * 127 // max(width - 1, 1), ys * 127 // max(height - 1, 1),
                         np.full_like(xs, 64)], axis=-1).astype(np.uint8)
        self.background = np.clip(base + rng.integers(0, 16, base.shape), 0, 255).astype(np.uint8)
        self.height, self.width = height, width
        self.size = max(2, min(height, width) // 16)

    def frame(self, state: np.ndarray) -> np.ndarray:
        """MetaWorld's 39-d state -> (H, W, 3) uint8."""
        img = self.background.copy()
        for xy, colour in ((state[0:2], (255, 0, 0)), (state[4:6], (0, 255, 0)), (state[36:38], (0, 0, 255))):
            # the table spans about x in [-0.5, 0.5], y in [0.3, 1.0] metres
            col = int(np.clip((xy[0] + 0.5) / 1.0, 0, 1) * (self.width - self.size))
            row = int(np.clip((1.0 - xy[1]) / 0.7, 0, 1) * (self.height - self.size))
            img[row:row + self.size, col:col + self.size] = colour
        return img


class SimArm:
    """The simulator and its ROS 2 node; ``run(stop)`` ticks at ``rate_hz`` until ``stop`` is set."""

    def __init__(self, cfg: SimArmConfig):
        from edge.sim.metaworld import MetaWorldRobot

        self.cfg = cfg
        self.robot = MetaWorldRobot(tasks=[cfg.task], seed=cfg.seed, max_episode_steps=cfg.max_episode_steps)
        self.task = self.robot.tasks[0]
        self.camera = SyntheticCamera(cfg.camera_height, cfg.camera_width, cfg.seed) if cfg.camera_height else None
        self.expert = None
        if cfg.teleop:
            from edge.sim.operator import SimulatedOperator

            self.expert = SimulatedOperator()
        self.types = RclpyTypes()
        self._lock = threading.Lock()  # the simulator: tick thread and reset service
        self._command: tuple[float, np.ndarray] | None = None
        self._tick = 0
        self._episode_over = False
        self._episodes = 0
        self.commands = 0
        self.bad_commands = 0
        self.command_stamps: list[tuple[int, int]] = []
        """(header stamp, receive time) of each trajectory command, ns (for latency measurements)."""

    # ---- ROS callbacks -----------------------------------------------------------------

    def _on_command(self, msg: Any) -> None:
        received = time.time_ns()
        try:
            if self.cfg.command_type == "joint_trajectory":
                if list(msg.joint_names) != list(COMMAND_NAMES) or not msg.points:
                    raise ValueError(f"joint_names {list(msg.joint_names)} (want {list(COMMAND_NAMES)}), "
                                     f"{len(msg.points)} points")
                values = np.asarray(msg.points[0].positions, dtype=np.float64)
                self.command_stamps.append((convert.stamp_ns(msg), received))
            else:
                values = np.asarray(msg.data, dtype=np.float64)
            if values.shape != (len(COMMAND_NAMES),) or not np.all(np.isfinite(values)):
                raise ValueError(f"values {values.tolist()}")
        except ValueError as e:  # a bad command is refused, never applied
            self.bad_commands += 1
            if self.bad_commands <= 10:
                log.warning("refusing a bad command on %s: %s", self.cfg.command_topic, e)
            return
        with self._lock:
            self._command = (time.monotonic(), values)
            self.commands += 1

    def _on_reset(self, request: Any, response: Any) -> Any:
        with self._lock:
            self._reset_locked()
        response.success, response.message = True, f"episode {self._episodes}: {self.task}"
        return response

    def _reset_locked(self) -> None:
        self._obs = self.robot.reset(self.task)
        if self.expert is not None:
            self.expert.reset(self.task)
        self._tick, self._episode_over, self._command = 0, False, None
        self._episodes += 1
        log.info("episode %d: %s (variant %d)", self._episodes, self.task, self.robot.current_variant)

    # ---- the tick ----------------------------------------------------------------------

    def _step_locked(self) -> tuple[np.ndarray | None, bool | None]:
        """Apply the command (or hold) for one tick; returns (operator action or None, episode end or None)."""
        operator_action, end = None, None
        if self.expert is not None and not self._episode_over:
            period = self.cfg.teleop_period_steps
            if self._tick % period >= period - self.cfg.teleop_segment_steps:
                operator_action = self.expert.expert_action(self._obs)
        if self._episode_over:
            return operator_action, None
        command = self._command
        fresh = command is not None and time.monotonic() - command[0] <= self.cfg.command_timeout_s
        action = command[1] if fresh else np.zeros(len(COMMAND_NAMES))
        self._obs = obs = self.robot.act(action)
        self._tick += 1
        if obs.success or obs.terminated or self._tick >= self.cfg.max_episode_steps:
            self._episode_over, end = True, bool(obs.success)
        return operator_action, end

    def run(self, stop: threading.Event) -> None:
        cfg, types = self.cfg, self.types
        context = rclpy.Context()
        rclpy.init(context=context)
        node = Node(cfg.node_name, context=context)
        joints_pub = node.create_publisher(types.cls(convert.JOINT_STATE), cfg.joint_state_topic,
                                           qos_profile_sensor_data)
        camera_pub = (node.create_publisher(types.cls(convert.IMAGE), cfg.camera_topic, qos_profile_sensor_data)
                      if self.camera is not None else None)
        end_pub = node.create_publisher(Bool, cfg.episode_end_topic, 10)
        intervention_pub = node.create_publisher(Bool, cfg.intervention_topic, 10) if cfg.teleop else None
        teleop_pub = node.create_publisher(Float64MultiArray, cfg.teleop_topic, 10) if cfg.teleop else None
        node.create_subscription(types.cls(convert.ACTION_MSGTYPES[cfg.command_type]), cfg.command_topic,
                                 self._on_command, 10)
        node.create_service(Trigger, cfg.reset_service, self._on_reset)
        executor = MultiThreadedExecutor(num_threads=2, context=context)
        executor.add_node(node)
        spinner = threading.Thread(target=executor.spin, name="ros2-executor", daemon=True)
        with self._lock:
            self.robot.connect()
            self._reset_locked()
        spinner.start()
        log.info("sim arm %s up: %s at %.0f Hz, commands on %s (%s), reset %s, camera %s, teleop %s",
                 cfg.node_name, cfg.joint_state_topic, cfg.rate_hz, cfg.command_topic, cfg.command_type,
                 cfg.reset_service, f"{cfg.camera_topic} {cfg.camera_height}x{cfg.camera_width}"
                 if self.camera else "off", cfg.teleop)
        period = 1.0 / cfg.rate_hz
        deadline = time.perf_counter()
        try:
            while not stop.is_set():
                with self._lock:
                    operator_action, end = self._step_locked()
                    state = self.robot.current_raw_obs.copy()
                    qpos = self._joint_values()
                stamp = time.time_ns() - int(cfg.stamp_lag_s * 1e9)
                joints_pub.publish(types.new(
                    convert.JOINT_STATE, header=convert.header(types, stamp, "base"), name=list(JOINT_NAMES),
                    position=types.floats(qpos[0]), velocity=types.floats(qpos[1]), effort=types.floats([])))
                if camera_pub is not None:
                    camera_pub.publish(convert.image_msg(types, self.camera.frame(state), stamp, "camera"))
                if intervention_pub is not None:
                    intervention_pub.publish(Bool(data=operator_action is not None))
                    if operator_action is not None:
                        teleop_pub.publish(convert.multi_array_msg(types, operator_action))
                if end is not None:
                    end_pub.publish(Bool(data=end))
                    log.info("episode %d ended: success=%s after %d ticks", self._episodes, end, self._tick)
                deadline += period
                remaining = deadline - time.perf_counter()
                if remaining > 0:
                    stop.wait(remaining)
                else:
                    deadline = time.perf_counter()
        finally:
            executor.shutdown(timeout_sec=2.0)
            node.destroy_node()
            if context.ok():
                rclpy.shutdown(context=context)
            self.robot.disconnect()
            self._write_stats()

    def _joint_values(self) -> tuple[np.ndarray, np.ndarray]:
        data = self.robot._current.env.data  # noqa: SLF001 - the simulator's joint state
        n = len(JOINT_NAMES)
        return np.array(data.qpos[:n], dtype=np.float64), np.array(data.qvel[:n], dtype=np.float64)

    def _write_stats(self) -> None:
        if not self.cfg.stats_path:
            return
        tmp = f"{self.cfg.stats_path}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"commands": self.commands, "bad_commands": self.bad_commands, "episodes": self._episodes,
                       "command_stamps": self.command_stamps}, fh)
        os.replace(tmp, self.cfg.stats_path)

