"""The help signal: how much this robot needs a human right now, computed each control tick.

Three inputs the edge already has, each in [0, 1]:

* **uncertainty**: the policy's own disagreement with itself. A chunking policy (ACT, Diffusion,
  SmolVLA through :class:`~fleet.policies.FleetPolicy`) predicts ``chunk_size`` actions but executes
  only ``n_action_steps`` of them; when it predicts the next chunk, the ticks both chunks cover were
  predicted twice. ``policy.action_disagreement`` is the RMS difference of the two predictions over
  those ticks, in units of the action's standard deviation; ``uncertainty_scale`` of it is 1. A policy
  that cannot tell (no attribute, or chunks that do not overlap) gives 0.
* **stall**: lack of progress. Progress is a reward gain over the best so far of at least
  ``stall_min_improvement``, or the low-dim state moving ``stall_min_motion`` (L2) away from where it
  was at the last progress (a robot without a reward signal still makes progress by moving). Stall is
  the ticks since the last progress over ``stall_window_steps``, capped at 1.
* **risk**: predicted failure, ``policy.failure_risk`` in [0, 1], passed through. A policy trained by RECAP
  carries RECAP's value function (it is published with the weights, fleet/policies/value.py), and
  :class:`~fleet.policies.FleetPolicy` sets ``failure_risk`` in each ``select_action`` (before the scorer
  runs on the same observation) from one small MLP forward on the normalised state and task one-hot: the
  probability that the episode's normalised return lies below tau = -L_max / (L_max + C), where only failed
  episodes' returns can be (the distributional head's mass on those bins; for the scalar head the least
  failure probability its mean allows). Any other policy (HG-DAgger's, the null policy) gives 0.

The score combines them as a noisy OR, ``1 - prod(1 - w_i * x_i)``: any one strong reason is enough,
several weak ones add up, and the result stays in [0, 1]. Help is ``wanted`` while
``score >= threshold``.

Cost per tick: a few float operations and one L2 norm of the low-dim state (plus, in the policy, the value
function's forward pass: about (state + tasks) x 256 + 256 x 256 + 256 x 201 multiply-adds with RECAP's
defaults); no allocation beyond the
small :class:`~fleet.types.HelpSignal` it returns. :class:`HelpBoard` hands the newest signal (and the
newest camera frame) to the heartbeat thread and the cloud's assignment back, by swapping one
reference each way: no lock on the control thread.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from fleet.codec import encode_image
from fleet.convert import MAX_THUMBNAIL_BYTES
from fleet.errors import ConfigError
from fleet.types import NO_ASSIGNMENT, HelpSignal, OperatorAssignment

@dataclass(frozen=True)
class HelpConfig:
    """When this robot asks for a human, and how often it says so (docs/operators.md)."""

    threshold: float = 0.6
    """Help is wanted while the score is at least this (0..1)."""
    weight_uncertainty: float = 1.0
    """Weight (0..1) of the policy's uncertainty in the score."""
    weight_stall: float = 0.8
    """Weight (0..1) of lack of progress in the score."""
    weight_risk: float = 1.0
    """Weight (0..1) of predicted failure in the score."""
    uncertainty_scale: float = 1.0
    """Disagreement across action-chunk re-predictions (RMS, in action standard deviations) that counts as
    uncertainty 1."""
    stall_window_steps: int = 60
    """Ticks without progress after which stall is 1."""
    stall_min_improvement: float = 0.05
    """Reward gain over the best so far that counts as progress."""
    stall_min_motion: float = 0.05
    """L2 distance the low-dim state must move from where it was at the last progress to count as progress
    (0 = reward only)."""
    heartbeat_s: float = 0.25
    """Seconds between heartbeats while help is wanted or an operator is assigned."""
    thumbnail_width: int = 160
    """Width in pixels of the camera thumbnail sent with the heartbeat (0 = none)."""

    def __post_init__(self) -> None:
        for name in ("threshold", "weight_uncertainty", "weight_stall", "weight_risk"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ConfigError(f"help_signal.{name} ({value!r}) must be a number in [0, 1]")
        if not (math.isfinite(self.uncertainty_scale) and self.uncertainty_scale > 0):
            raise ConfigError(f"help_signal.uncertainty_scale ({self.uncertainty_scale}) must be > 0")
        if self.stall_window_steps < 1:
            raise ConfigError(f"help_signal.stall_window_steps ({self.stall_window_steps}) must be >= 1")
        for name in ("stall_min_improvement", "stall_min_motion"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"help_signal.{name} ({value}) must be a finite number >= 0")
        if not (math.isfinite(self.heartbeat_s) and self.heartbeat_s > 0):
            raise ConfigError(f"help_signal.heartbeat_s ({self.heartbeat_s}) must be > 0")
        if self.thumbnail_width < 0:
            raise ConfigError(f"help_signal.thumbnail_width ({self.thumbnail_width}) must be >= 0")


def _unit(value) -> float:
    """A policy-provided number as a float in [0, 1] (NaN, None or junk: 0)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0


class HelpScorer:
    """The need-for-help score of one robot, updated once per control tick (on the control thread)."""

    def __init__(self, config: HelpConfig | None = None):
        self.config = config or HelpConfig()
        self._state_names: tuple[str, ...] | None = None
        self.reset()

    def reset(self) -> None:
        """Start of an episode: no progress history, help not wanted."""
        self._best_reward = -math.inf
        self._anchor: np.ndarray | None = None
        self._since_progress = 0
        self._wanted_since: float | None = None

    def _state(self, features: dict) -> np.ndarray | None:
        if self._state_names is None:
            self._state_names = tuple(k for k, v in features.items()
                                      if np.ndim(v) <= 1 and np.size(v) <= 4096 and np.issubdtype(
                                          np.asarray(v).dtype, np.number))
        if not self._state_names:
            return None
        parts = [np.asarray(features[k], dtype=np.float64).reshape(-1) for k in self._state_names if k in features]
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else None

    def _stall(self, features: dict, reward: float) -> float:
        cfg = self.config
        progressed = reward >= self._best_reward + cfg.stall_min_improvement
        if progressed:
            self._best_reward = reward
        if cfg.stall_min_motion > 0:
            state = self._state(features)
            if state is not None:
                if self._anchor is None or self._anchor.shape != state.shape:
                    self._anchor, progressed = state, True
                elif float(np.linalg.norm(state - self._anchor)) >= cfg.stall_min_motion:
                    progressed = True
                if progressed:
                    self._anchor = state
        self._since_progress = 0 if progressed else self._since_progress + 1
        return min(self._since_progress / cfg.stall_window_steps, 1.0)

    def update(self, features: dict, reward: float, policy, now_s: float) -> HelpSignal:
        """This tick's signal: ``features``/``reward`` of the observation the policy acted on, ``policy`` the
        acting policy (read for ``action_disagreement`` and ``failure_risk``), ``now_s`` a monotonic clock.
        ``holding`` and ``intervening`` are the control loop's to set (they depend on this signal)."""
        cfg = self.config
        disagreement = getattr(policy, "action_disagreement", 0.0)
        uncertainty = _unit(_unit_free(disagreement) / cfg.uncertainty_scale)
        risk = _unit(getattr(policy, "failure_risk", 0.0))
        stall = self._stall(features, float(reward) if math.isfinite(reward) else self._best_reward)
        score = 1.0 - ((1.0 - cfg.weight_uncertainty * uncertainty) * (1.0 - cfg.weight_stall * stall)
                       * (1.0 - cfg.weight_risk * risk))
        score = min(max(score, 0.0), 1.0)
        wanted = score >= cfg.threshold
        if not wanted:
            self._wanted_since = None
        elif self._wanted_since is None:
            self._wanted_since = now_s
        return HelpSignal(score=score, uncertainty=uncertainty, stall=stall, risk=risk, wanted=wanted,
                          wanted_for_s=now_s - self._wanted_since if wanted else 0.0)


def _unit_free(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


class HelpBoard:
    """What the control thread and the heartbeat thread share about help: each side swaps one reference.

    The control thread publishes the newest :class:`HelpSignal` and camera frame (``publish``); the heartbeat
    thread reads them and stores the cloud's :class:`OperatorAssignment` (``assign``), which the control thread
    reads (``assignment``). ``wake`` is set when help becomes wanted or no longer wanted, so that the heartbeat
    goes out at once rather than at its next interval."""

    def __init__(self, config: HelpConfig | None = None):
        self.config = config or HelpConfig()
        self.signal = HelpSignal()
        self.assignment: OperatorAssignment = NO_ASSIGNMENT
        self.operator_id = ""
        """The operator assignment the loop acted on at its last tick ("" = none), reported back."""
        self.frame: np.ndarray | None = None
        self.wake = threading.Event()

    # --- control thread
    def publish(self, signal: HelpSignal, frame: np.ndarray | None, operator_id: str) -> None:
        if signal.wanted != self.signal.wanted or signal.holding != self.signal.holding:
            self.wake.set()
        self.signal, self.frame, self.operator_id = signal, frame, operator_id

    # --- heartbeat thread
    def assign(self, assignment: OperatorAssignment) -> None:
        if assignment.operator_id != self.assignment.operator_id:
            self.wake.set()
        self.assignment = assignment

    def interval_s(self, normal_s: float) -> float:
        """Seconds to the next heartbeat: ``heartbeat_s`` while help is wanted or an operator is assigned."""
        busy = self.signal.wanted or bool(self.assignment.operator_id)
        return min(self.config.heartbeat_s, normal_s) if busy else normal_s

    def thumbnail(self) -> bytes:
        """The newest camera frame as a JPEG of about ``thumbnail_width`` pixels wide (b"" without a camera or
        when it does not fit in 64 KiB). Runs on the heartbeat thread."""
        frame, width = self.frame, self.config.thumbnail_width
        if frame is None or not width or frame.ndim != 3 or frame.dtype != np.uint8 or frame.shape[2] not in (1, 3):
            return b""
        step = max(1, -(-frame.shape[1] // width))
        data = encode_image(frame[::step, ::step], "jpeg", quality=70).data
        return data if len(data) <= MAX_THUMBNAIL_BYTES else b""
