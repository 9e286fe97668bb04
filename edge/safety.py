"""Action safety outside the policy: every action on its way to the robot passes one guard.

The control loop sends the policy's action, the simulated operator's or the teleoperator's through
:class:`ActionGuard` (and a backend that teleoperates during its reset, as the LeRobot one does, sends
those through it too). The guard bounds, per action dimension:

* position: ``position_min``/``position_max`` (joint positions for position-controlled arms);
* effort: ``|action| <= max_effort`` for effort-commanded (torque) actions;
* rate: the change from the last action sent, ``max_delta_per_tick`` and ``max_velocity / control_hz``
  (the smaller);
* non-finite values (NaN/Inf from an operator device or a policy).

A violation is **clipped** (into the limits, NaN replaced by the last action sent) or **held** (the
last action sent is repeated; the first action of an episode, with nothing to hold, is clipped),
counted in ``fleet_edge_safety_violations_total{robot,kind,source}`` and logged once per episode. A
newly swapped-in policy version whose own actions violate the limits ``rollback_violations`` times
within its first ``rollback_episodes`` episodes is rolled back (``PolicySlot.rollback``: the updater
refuses that version, and the last good policy on disk is reverted).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from fleet import metrics
from fleet.errors import ConfigError

log = logging.getLogger(__name__)

SAFETY_MODES = ("clip", "hold")
VIOLATION_KINDS = metrics.SAFETY_VIOLATION_KINDS
SOURCES = metrics.SAFETY_SOURCES
_LIMIT_FIELDS = ("position_min", "position_max", "max_delta_per_tick", "max_velocity", "max_effort")
_TOLERANCE = 1e-6  # relative slack on limits (float32 rounding of clipped values)


def _floats(name: str, value) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        value = (value,)
    if isinstance(value, str):
        value = tuple(s for s in value.split(",") if s.strip())
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"safety.{name} ({value!r}) must be a list of numbers") from None
    if any(math.isnan(v) for v in out):
        raise ConfigError(f"safety.{name} ({value!r}) must not contain NaN")
    return out


@dataclass(frozen=True)
class SafetyConfig:
    """Limits on every action sent to this robot, whoever chose it (docs/robots.md, "Action safety")."""

    mode: str = "clip"
    """On a violation: clip (into the limits) or hold (repeat the last action sent)."""
    position_min: tuple[float, ...] = ()
    """Lowest value per action dimension (one value = every dimension); () = none."""
    position_max: tuple[float, ...] = ()
    """Highest value per action dimension (one value = every dimension); () = none."""
    max_delta_per_tick: tuple[float, ...] = ()
    """Largest change per action dimension from one tick to the next (rate limit); () = none."""
    max_velocity: tuple[float, ...] = ()
    """Largest speed per action dimension, units per second (a rate limit of max_velocity / control_hz); () = none."""
    max_effort: tuple[float, ...] = ()
    """Largest |action| per dimension for effort-commanded (torque) actions; () = none."""
    rollback_violations: int = 20
    """Roll back a newly swapped-in version after this many violations by its own actions (0 = never)."""
    rollback_episodes: int = 3
    """... counted within its first this many episodes."""

    def __post_init__(self) -> None:
        if self.mode not in SAFETY_MODES:
            raise ConfigError(f"safety.mode ({self.mode!r}) must be one of {SAFETY_MODES}")
        for name in _LIMIT_FIELDS:
            object.__setattr__(self, name, _floats(name, getattr(self, name)))
        for name in ("max_delta_per_tick", "max_velocity", "max_effort"):
            if any(not v > 0 for v in getattr(self, name)):
                raise ConfigError(f"safety.{name} ({getattr(self, name)}) must be > 0")
        if self.rollback_violations < 0 or self.rollback_episodes < 1:
            raise ConfigError(f"safety.rollback_violations ({self.rollback_violations}) must be >= 0 and "
                              f"safety.rollback_episodes ({self.rollback_episodes}) >= 1")

    @property
    def has_limits(self) -> bool:
        return any(getattr(self, name) for name in _LIMIT_FIELDS)


class ActionGuard:
    """Bounds actions for one robot (see the module docstring). Not thread-safe: the control thread uses it."""

    def __init__(self, config: SafetyConfig, action_shape: tuple[int, ...], control_hz: float, robot_id: str,
                 dtype=np.float32):
        self.config = config
        self.robot_id = robot_id
        self._shape = tuple(action_shape)
        self._dtype = np.dtype(dtype)
        n = math.prod(self._shape)
        low, high = np.full(n, -np.inf), np.full(n, np.inf)
        self.low = self._per_dim("position_min", n, low)
        self.high = self._per_dim("position_max", n, high)
        if np.any(self.low > self.high):
            raise ConfigError(f"safety.position_min ({config.position_min}) must be <= position_max "
                              f"({config.position_max}) in every dimension")
        effort = self._per_dim("max_effort", n, np.full(n, np.inf))
        self.effort_low, self.effort_high = -effort, effort
        rate = self._per_dim("max_delta_per_tick", n, np.full(n, np.inf))
        self.rate = np.minimum(rate, self._per_dim("max_velocity", n, np.full(n, np.inf)) / control_hz)
        self._previous: np.ndarray | None = None
        self.episode_violations: Counter[str] = Counter()
        """Violations by source in the current episode."""
        self.total_violations = 0
        self._logged_episode = False
        self._counters = {(k, s): metrics.EDGE_SAFETY_VIOLATIONS.labels(robot=robot_id, kind=k, source=s)
                          for k in VIOLATION_KINDS for s in SOURCES}

    def _per_dim(self, name: str, n: int, default: np.ndarray) -> np.ndarray:
        values = getattr(self.config, name)
        if not values:
            return default
        if len(values) not in (1, n):
            raise ConfigError(f"safety.{name} has {len(values)} values ({values}); this robot's action has {n} "
                              f"dimensions (give {n}, or one for all)")
        return np.broadcast_to(np.asarray(values, dtype=np.float64), (n,)).copy()

    @property
    def last_sent(self) -> np.ndarray | None:
        """The last action sent this episode (None before the first)."""
        return self._previous

    def start_episode(self) -> None:
        """Forget the last action sent (the robot is reset) and the episode's counts."""
        self._previous = None
        self.episode_violations = Counter()
        self._logged_episode = False

    def apply(self, action: np.ndarray, source: str) -> tuple[np.ndarray, tuple[str, ...]]:
        """The action to send and the kinds of violation found (empty: ``action`` passes unchanged)."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        kinds = []
        finite = np.isfinite(a)
        if not finite.all():
            kinds.append("nonfinite")
        if np.any(a[finite] < self.low[finite] - _slack(self.low[finite])) or np.any(
                a[finite] > self.high[finite] + _slack(self.high[finite])):
            kinds.append("position")
        if np.any(np.abs(a[finite]) > self.effort_high[finite] * (1 + _TOLERANCE)):
            kinds.append("effort")
        low, high = np.maximum(self.low, self.effort_low), np.minimum(self.high, self.effort_high)
        reference = self._previous if self._previous is not None else np.clip(np.zeros_like(a), low, high)
        bounded = np.clip(np.where(finite, a, reference), low, high)
        if self._previous is not None:
            step = bounded - self._previous
            if np.any(np.abs(step) > self.rate * (1 + _TOLERANCE) + 1e-12):
                kinds.append("rate")
            bounded = np.clip(self._previous + np.clip(step, -self.rate, self.rate), low, high)
        if not kinds:
            out = a
        elif self.config.mode == "hold" and self._previous is not None:
            out = self._previous
        else:
            out = bounded
        sent = out.astype(self._dtype).reshape(self._shape)
        self._previous = sent.astype(np.float64).reshape(-1)
        if kinds:
            self._count(kinds, source, a)
        return sent, tuple(kinds)

    def operator_filter(self, action: np.ndarray) -> np.ndarray:
        """``apply(action, "operator")``'s action: what a backend teleoperating on its own sets as ``action_filter``."""
        return self.apply(action, "operator")[0]

    def _count(self, kinds: list[str], source: str, action: np.ndarray) -> None:
        for kind in kinds:
            self._counters[(kind, source)].inc()
        self.episode_violations[source] += 1
        self.total_violations += 1
        if not self._logged_episode:
            self._logged_episode = True
            log.warning("robot %s: %s action violates the safety limits (%s): %s -> %s (%s); logged once per "
                        "episode, counted in fleet_edge_safety_violations_total", self.robot_id, source,
                        ",".join(kinds), np.array2string(action, precision=4, threshold=16),
                        np.array2string(self._previous, precision=4, threshold=16), self.config.mode)


def _slack(limit: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(limit), np.abs(limit) * _TOLERANCE + 1e-9, 0.0)


__all__ = ["ActionGuard", "SafetyConfig", "SAFETY_MODES", "VIOLATION_KINDS", "SOURCES"]
