"""The rclpy transport: the only module that imports rclpy.

Subscribes to the configured topics (sensor data with the sensor-data QoS), publishes
actions and episode events, serves ``end_episode`` (std_srvs/SetBool) and calls
``reset_service`` (std_srvs/Trigger). A multi-threaded executor spins the node on its own
threads; every callback hands the message to the :class:`~edge.robots.ros2.robot.Ros2Bridge`.
"""

from __future__ import annotations

import array
import importlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import rclpy
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data

from fleet import ros2_convert as convert
from edge.robots.ros2.config import Ros2Config

log = logging.getLogger(__name__)


class RclpyTypes:
    """convert.MessageTypes for rclpy's generated message classes."""

    def cls(self, msgtype: str) -> type:
        package, kind, name = msgtype.split("/")
        return getattr(importlib.import_module(f"{package}.{kind}"), name)

    def new(self, msgtype: str, **fields: Any) -> Any:
        return self.cls(msgtype)(**fields)

    def floats(self, values: Sequence[float] | np.ndarray, dtype: str = "float64") -> array.array:
        return array.array("d" if dtype == "float64" else "f", np.asarray(values, dtype=dtype).reshape(-1).tobytes())

    def octets(self, data: bytes) -> array.array:
        return array.array("B", data)


class RclpyTransport:
    """One rclpy node in its own context, spun by a MultiThreadedExecutor on a daemon thread."""

    def __init__(self, config: Ros2Config):
        self.config = config
        self.types = RclpyTypes()
        self._context: Any = None
        self._node: Node | None = None
        self._executor: MultiThreadedExecutor | None = None
        self._thread: threading.Thread | None = None

    def start(self, bridge: Any) -> None:
        cfg, types = self.config, self.types
        self._context = rclpy.Context()
        rclpy.init(context=self._context)
        node = self._node = Node(cfg.node_name, context=self._context)
        group = ReentrantCallbackGroup()

        def sub(msgtype: str, topic: str, callback: Any, qos: Any = 10) -> None:
            node.create_subscription(types.cls(msgtype), topic, callback, qos, callback_group=group)

        sub(convert.JOINT_STATE, cfg.joint_state_topic, bridge.on_joint_state, qos_profile_sensor_data)
        for name, cam in cfg.cameras.items():
            sub(convert.COMPRESSED_IMAGE if cam.compressed else convert.IMAGE, cam.topic,
                lambda msg, n=name: bridge.on_image(n, msg), qos_profile_sensor_data)
        if cfg.intervention_topic:
            sub(convert.BOOL, cfg.intervention_topic, bridge.on_intervention)
        if cfg.teleop_topic:
            sub(convert.TELEOP_MSGTYPES[cfg.teleop_type], cfg.teleop_topic, bridge.on_teleop)
        if cfg.episode_end_topic:
            sub(convert.BOOL, cfg.episode_end_topic, lambda msg: bridge.on_episode_end(bool(msg.data)))
        if cfg.end_episode_service:
            from std_srvs.srv import SetBool

            def end_episode(request: Any, response: Any) -> Any:
                bridge.on_episode_end(bool(request.data))
                response.success, response.message = True, "the episode ends after the current step"
                return response

            node.create_service(SetBool, cfg.end_episode_service, end_episode, callback_group=group)
        self._reset_client = None
        if cfg.reset_service:
            from std_srvs.srv import Trigger

            self._reset_client = node.create_client(Trigger, cfg.reset_service, callback_group=group)
        self._action_pub = node.create_publisher(types.cls(convert.ACTION_MSGTYPES[cfg.action_type]),
                                                 cfg.action_topic, 10)
        self._episode_pub = node.create_publisher(types.cls(convert.STRING), cfg.episode_topic, 10)
        self._executor = MultiThreadedExecutor(num_threads=2, context=self._context)
        self._executor.add_node(node)
        self._thread = threading.Thread(target=self._executor.spin, name="ros2-executor", daemon=True)
        self._thread.start()
        log.info("rclpy node %s spinning", cfg.node_name)

    def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(timeout_sec=2.0)
        if self._node is not None:
            self._node.destroy_node()
        if self._context is not None and self._context.ok():
            rclpy.shutdown(context=self._context)
        if self._thread is not None:
            self._thread.join(2.0)
        self._executor = self._node = self._context = self._thread = None

    def publish_action(self, msg: Any) -> None:
        self._action_pub.publish(msg)

    def publish_episode(self, msg: Any) -> None:
        self._episode_pub.publish(msg)

    def call_reset(self, timeout_s: float) -> bool:
        from std_srvs.srv import Trigger

        if self._reset_client is None or not self._reset_client.wait_for_service(timeout_sec=timeout_s):
            return False
        done = threading.Event()
        future = self._reset_client.call_async(Trigger.Request())
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(timeout_s):
            future.cancel()
            return False
        result = future.result()
        if not result.success:
            log.warning("reset service %s answered failure: %s", self.config.reset_service, result.message)
        return bool(result.success)

    def topic_types(self) -> dict[str, list[str]]:
        return {name: list(types) for name, types in self._node.get_topic_names_and_types()}

    def wait_reset_service(self, timeout_s: float) -> bool:
        return self._reset_client is None or self._reset_client.wait_for_service(timeout_sec=timeout_s)

    def now_ns(self) -> int:
        return int(self._node.get_clock().now().nanoseconds)
