"""Who gets a human: M operators shared by N robots (pure Python; the service feeds it from Redis).

Every ``step`` the robots' needs come in (``Need``, from the help signal each robot heartbeats) and the
allocator answers which operator drives which robot. Three policies rank the robots that want help:

- ``priority``: Fleet-DAgger's C/U/R (Hoque et al., 2022): robots in constraint violation first (here:
  ``holding``, stopped because they want help and have nobody), then by predicted risk, then by the
  combined need ``score`` and the policy's ``uncertainty``; ties by how long help has been wanted.
- ``round_robin``: the robot served least recently first (never served: first), so operators rotate.
- ``random``: a fresh seeded random rank every step (Fleet-DAgger's random baseline).

Rules common to all three:

- An operator holds at most one robot, a robot at most one operator.
- An automatic assignment lasts at least ``min_hold_s`` (control does not flap). After that it is
  released once the robot no longer wants help, and while the robot still wants help it competes
  again with the waiting robots under the policy's ranking: as in Fleet-DAgger, the top robots keep
  or get the operators (an assigned robot that is still among them keeps its operator).
- A robot that no longer reports (absent from ``needs``) loses an automatic operator at once.
- ``take_over`` pins an operator to a robot (the console's button) until ``hand_back``; the
  allocator never moves a pinned operator and never hands a pinned robot to anyone else.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from fleet.errors import ConfigError

POLICIES = ("priority", "round_robin", "random")


@dataclass(frozen=True)
class Need:
    """One robot's need for a human, as its last heartbeat reported it (all in [0, 1] but the times)."""

    robot_id: str
    score: float
    uncertainty: float
    stall: float
    risk: float
    wanted: bool
    holding: bool
    wanted_for_s: float

    @property
    def wants_help(self) -> bool:
        return self.wanted or self.holding


@dataclass(frozen=True)
class Assignment:
    """An operator on a robot since ``since_s`` (the allocator's clock); ``manual``: pinned by take-over."""

    operator: str
    since_s: float
    manual: bool


class Allocator:
    """Assigns ``operators`` to the robots that want help; see the module docstring for the rules."""

    def __init__(self, operators: list[str], policy: str = "priority", min_hold_s: float = 5.0, seed: int = 0):
        operators = list(operators)
        if not operators:
            raise ConfigError("operators must name at least one operator")
        if any(not isinstance(o, str) or not o for o in operators):
            raise ConfigError(f"operator ids must be non-empty strings, got {operators!r}")
        if len(set(operators)) != len(operators):
            raise ConfigError(f"operator ids must be unique, got {operators!r}")
        if policy not in POLICIES:
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if not min_hold_s >= 0:
            raise ConfigError(f"min_hold_s ({min_hold_s}) must be >= 0")
        self.operators = operators
        self.policy = policy
        self.min_hold_s = float(min_hold_s)
        self._rng = random.Random(seed)
        self._by_robot: dict[str, Assignment] = {}
        self._last_served: dict[str, float] = {}
        self._known: set[str] = set()
        self._needs: dict[str, Need] = {}

    # --- reading ---------------------------------------------------------------------------------------------

    @property
    def assignments(self) -> dict[str, Assignment]:
        """robot id -> its operator's assignment (a copy)."""
        return dict(self._by_robot)

    def robot_of(self, operator: str) -> str:
        """The robot ``operator`` holds ("" = none)."""
        return next((r for r, a in self._by_robot.items() if a.operator == operator), "")

    def rank(self, needs: Mapping[str, Need], now: float) -> list[str]:
        """Every robot of ``needs``, most in need first under this policy (the console's order): those that
        want help first."""
        return sorted(sorted(needs), key=lambda r: (needs[r].wants_help, *self._key(needs[r], now, False)),
                      reverse=True)

    def queue(self) -> list[str]:
        """Robots that want help and have no operator, in the order the policy would serve them now."""
        waiting = {r: n for r, n in self._needs.items() if n.wants_help and r not in self._by_robot}
        return self.rank(waiting, 0.0)

    # --- deciding --------------------------------------------------------------------------------------------

    def step(self, needs: Mapping[str, Need], now: float) -> dict[str, Assignment]:
        """Release and assign operators for ``needs`` (robot id -> Need) at time ``now``; returns
        robot id -> Assignment for every robot that has an operator now."""
        self._needs = dict(needs)
        self._known = set(needs)
        for robot, a in list(self._by_robot.items()):
            if a.manual:
                continue
            need = needs.get(robot)
            held_long_enough = now - a.since_s >= self.min_hold_s
            if need is None or (held_long_enough and not need.wants_help):
                del self._by_robot[robot]
        # Robots that compete for the operators now: waiting ones, and automatically assigned ones whose
        # hold time has passed (they keep their operator if they are still among the top).
        busy = {a.operator for a in self._by_robot.values()}
        free_ops = [o for o in self.operators if o not in busy]
        open_assigned = [r for r, a in self._by_robot.items() if not a.manual and now - a.since_s >= self.min_hold_s]
        waiting = [r for r in sorted(needs) if needs[r].wants_help and r not in self._by_robot]
        if not waiting:
            self._mark_served(now)
            return self.assignments
        candidates = sorted(open_assigned + waiting)
        keys = {r: self._key(needs[r], now) for r in candidates}
        chosen = sorted(candidates, key=lambda r: keys[r], reverse=True)[:len(free_ops) + len(open_assigned)]
        for robot in open_assigned:
            if robot not in chosen:
                free_ops.append(self._by_robot.pop(robot).operator)
        free_ops.sort(key=self.operators.index)
        for robot in chosen:
            if robot in self._by_robot:
                continue
            self._by_robot[robot] = Assignment(free_ops.pop(0), now, False)
        self._mark_served(now)
        return self.assignments

    def _mark_served(self, now: float) -> None:
        for robot in self._by_robot:
            self._last_served[robot] = now

    def _key(self, need: Need, now: float, consume_random: bool = True) -> tuple:
        """Larger = served first."""
        if self.policy == "priority":
            return (need.holding, need.risk, need.score, need.uncertainty, need.wanted_for_s)
        if self.policy == "round_robin":
            waited = now - self._last_served.get(need.robot_id, float("-inf"))
            return (waited, need.wanted_for_s)
        return (self._rng.random() if consume_random else 0.0, need.wanted_for_s)

    # --- manual ----------------------------------------------------------------------------------------------

    def _check(self, operator: str, robot: str) -> None:
        if operator not in self.operators:
            raise ConfigError(f"unknown operator {operator!r} (operators: {', '.join(self.operators)})")
        if robot not in self._known and robot not in self._by_robot:
            raise ConfigError(f"unknown robot {robot!r}: it has not reported a help signal recently")

    def take_over(self, operator: str, robot: str, now: float) -> None:
        """Pin ``operator`` to ``robot`` until :meth:`hand_back`. The operator leaves the robot it held; an
        automatic operator on ``robot`` is freed; a robot pinned by another operator is refused (ConfigError)."""
        self._check(operator, robot)
        current = self._by_robot.get(robot)
        if current is not None and current.manual and current.operator != operator:
            raise ConfigError(f"robot {robot!r} is taken over by operator {current.operator!r}: "
                              "it must hand back first")
        held = self.robot_of(operator)
        if held:
            del self._by_robot[held]
        self._by_robot[robot] = Assignment(operator, now, True)
        self._last_served[robot] = now

    def hand_back(self, operator: str, robot: str, now: float) -> None:
        """End ``operator``'s hold on ``robot`` (manual or automatic); ConfigError if it holds another robot."""
        self._check(operator, robot)
        current = self._by_robot.get(robot)
        if current is None or current.operator != operator:
            raise ConfigError(f"operator {operator!r} does not hold robot {robot!r}")
        del self._by_robot[robot]
        self._last_served[robot] = now
