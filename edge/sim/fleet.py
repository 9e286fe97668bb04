"""``fleet sim-fleet``: N simulated robots, each a full edge agent, on threads of one process.

Every robot is a complete :class:`~edge.agent.EdgeAgent` (its own MetaWorld
robot, control loop, spool, gRPC channel, updater and heartbeat), exactly what
``fleet edge`` runs; only the interpreter is shared. That saves N-1 interpreter
start-ups (each imports torch and LeRobot: seconds of CPU and about 1 GB of
memory) when a study or a demo simulates many robots on one machine. The
robots' control loops are real-time threads; policy inference and MuJoCo
release the GIL for most of their work.

Robot i is ``<robot_id_prefix><i>``, keeps its spool and last good policy in
``<state_root>/<robot id>``, draws initial states and its task order with seed ``seed + i`` and
its operator's noise with seed ``seed + 100000 + i``; everything else comes
from the ``edge`` template.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from edge.agent import EdgeAgent, EdgeConfig
from edge.robots.config import MetaWorldConfig
from fleet.config import require

log = logging.getLogger(__name__)

OPERATOR_SEED_OFFSET = 100_000
"""Robot i's operator seed is ``seed + OPERATOR_SEED_OFFSET + i`` (disjoint from the robots' seeds)."""


@dataclass(frozen=True)
class SimFleetConfig:
    """N simulated robots (full edge agents) on threads of one process."""

    robots: int = 4
    """Number of robots."""
    robot_id_prefix: str = "robot-"
    """Robot i is called <prefix><i>."""
    first_index: int = 0
    """Index of the first robot (to run one fleet as several processes without id clashes)."""
    state_root: str = "runs/default/edge"
    """Robot <id> keeps its spool and last good policy in <state_root>/<id>."""
    seed: int = 0
    """Robot i draws initial states with seed + i and operator noise with seed + 100000 + i."""
    duration_s: float = 0.0
    """Stop after this many seconds of control (0 = run until SIGINT/SIGTERM)."""
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    """Template of every robot's edge config (robot_id, state_dir, seed, loop.seed and operator.seed are set per
    robot)."""

    def __post_init__(self) -> None:
        require(self.robots >= 1, f"robots ({self.robots}) must be >= 1")
        require(self.first_index >= 0, f"first_index ({self.first_index}) must be >= 0")
        require(bool(self.robot_id_prefix), "robot_id_prefix must not be empty")
        require(self.duration_s >= 0, f"duration_s ({self.duration_s}) must be >= 0")

    def _backend(self, seed: int) -> MetaWorldConfig:
        """The template's MetaWorld settings (the defaults if it names another backend) with this robot's seed."""
        backend = self.edge.backend if isinstance(self.edge.backend, MetaWorldConfig) else MetaWorldConfig()
        return replace(backend, seed=seed)

    def robot_configs(self) -> list[EdgeConfig]:
        """One EdgeConfig per robot, derived from the template."""
        out = []
        for i in range(self.first_index, self.first_index + self.robots):
            robot_id = f"{self.robot_id_prefix}{i}"
            out.append(replace(
                self.edge, robot_id=robot_id, state_dir=str(Path(self.state_root) / robot_id),
                backend=self._backend(self.seed + i), duration_s=0.0,
                loop=replace(self.edge.loop, seed=self.seed + i),
                operator=replace(self.edge.operator, seed=self.seed + OPERATOR_SEED_OFFSET + i)))
        return out


class SimFleet:
    """Builds the agents; ``start`` brings them up together, ``stop`` takes them down together."""

    def __init__(self, cfg: SimFleetConfig):
        self.cfg = cfg
        self.agents = [EdgeAgent(c) for c in cfg.robot_configs()]

    def _each(self, name: str, fn) -> list[BaseException]:
        """Run ``fn(agent)`` for every agent on its own thread; returns the exceptions raised."""
        errors: list[BaseException] = []

        def call(agent: EdgeAgent) -> None:
            try:
                fn(agent)
            except BaseException as exc:  # noqa: BLE001 - collected and re-raised by the caller
                log.exception("robot %s: %s failed", agent.cfg.robot_id, name)
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(a,), name=f"{name}-{a.cfg.robot_id}") for a in self.agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors

    def start(self, stop: threading.Event) -> None:
        """Connect every robot and start its control loop once it has a policy (in parallel)."""
        errors = self._each("start", lambda agent: agent.start(stop))
        if errors:
            raise errors[0]

    def stop(self) -> None:
        """Stop every agent (loop, bounded drain of the spool, network, robot), in parallel."""
        self._each("stop", lambda agent: agent.stop())

    def failed(self) -> str:
        """A description of the first robot whose control loop died, or ""."""
        for agent in self.agents:
            if agent.loop.error is not None:
                return f"robot {agent.cfg.robot_id}: control loop failed: {agent.loop.error!r}"
        return ""

    def run(self, stop: threading.Event, poll_s: float = 1.0) -> None:
        """Start, run until ``stop`` is set, ``duration_s`` passed or a control loop died, then stop."""
        try:
            self.start(stop)
            if stop.is_set():
                return
            log.info("sim-fleet: %d robots running", len(self.agents))
            deadline = time.monotonic() + self.cfg.duration_s if self.cfg.duration_s else float("inf")
            while not stop.wait(max(0.0, min(poll_s, deadline - time.monotonic()))):
                failure = self.failed()
                if failure:
                    raise RuntimeError(failure)
                if time.monotonic() >= deadline:
                    break
        finally:
            self.stop()
