"""Hardware-free LeRobot devices for tests, registered through LeRobot's own registries.

``toy_arm`` (a ``lerobot.robots.Robot``): joints that move a fraction of the way to the
commanded positions each tick, and a small camera whose pixels encode the joint positions.
``toy_leader`` (a ``lerobot.teleoperators.Teleoperator`` with ``get_teleop_events``): an
"operator" that drives the arm to its goal during a scripted window of each episode and
reports success when the arm is there. LeRobot finds the device class next to its config
(``make_device_from_device_class``), so the classes live in this package's namespace.
"""

from tests.lerobot_toys.config import ToyArmConfig, ToyLeaderConfig
from tests.lerobot_toys.devices import ARMS, ToyArm, ToyLeader

__all__ = ["ARMS", "ToyArm", "ToyArmConfig", "ToyLeader", "ToyLeaderConfig"]
