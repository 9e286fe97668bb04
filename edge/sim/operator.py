"""The simulated operator: HG-DAgger's human (Kelly et al., 2019) played by a MetaWorld scripted expert.

It watches the robot, takes over when the policy goes wrong, drives for a segment, and hands control
back. Its "judgement" is a MetaWorld scripted expert, imported only when one is built.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

from edge.operator import Operator, OperatorConfig
from edge.robots.base import Observation
from fleet.errors import ConfigError

log = logging.getLogger(__name__)

EXPERTS: dict[str, str] = {
    "reach-v3": "SawyerReachV3Policy",
    "push-v3": "SawyerPushV3Policy",
    "pick-place-v3": "SawyerPickPlaceV3Policy",
    "door-open-v3": "SawyerDoorOpenV3Policy",
    "drawer-open-v3": "SawyerDrawerOpenV3Policy",
    "drawer-close-v3": "SawyerDrawerCloseV3Policy",
    "button-press-topdown-v3": "SawyerButtonPressTopdownV3Policy",
    "peg-insert-side-v3": "SawyerPegInsertionSideV3Policy",
    "window-open-v3": "SawyerWindowOpenV3Policy",
    "window-close-v3": "SawyerWindowCloseV3Policy",
}
"""MetaWorld env name -> scripted expert class in ``metaworld.policies``."""


class SimulatedOperator(Operator):
    """HG-DAgger gating with a MetaWorld scripted expert as the human.

    Robot in control: take over when the policy's action is more than
    ``divergence_threshold`` from the expert's for ``divergence_steps`` consecutive
    steps, or when reward has not improved by ``stall_min_improvement`` over
    ``stall_steps`` (non-agreeing) steps, or when it has driven ``patience_steps``
    steps without finishing (a slow creep). Operator in control: drive with the expert's
    action (plus noise) for ``segment_steps`` steps, then hand back.
    """

    def __init__(self, config: OperatorConfig | None = None):
        self.config = config if config is not None else OperatorConfig()
        self._rng = np.random.default_rng(self.config.seed)
        self._experts: dict[str, Any] = {}  # env name -> metaworld.policies.policy.Policy
        self._expert: Any = None
        self.interventions = 0
        """Take-overs in the current episode."""
        self.intervention_steps = 0
        """Steps the operator drove in the current episode."""
        self.last_expert_action: np.ndarray | None = None
        """The expert's (clipped) action at the last ``decide``."""
        self._intervening = False
        self._segment_left = 0
        self._divergent = 0
        self._driven = 0
        self._stall = 0
        self._best_reward = -np.inf

    @property
    def is_intervening(self) -> bool:
        """Whether the operator holds control right now."""
        return self._intervening

    def reset(self, task: str) -> None:
        """Pick the expert for ``task`` (instruction or env name) and clear the counters."""
        import metaworld.policies

        from edge.sim.metaworld import env_name_for

        env_name = env_name_for(task)
        if env_name not in EXPERTS:
            raise ConfigError(f"no scripted expert for task {task!r}")
        if env_name not in self._experts:
            self._experts[env_name] = getattr(metaworld.policies, EXPERTS[env_name])()
        self._expert = self._experts[env_name]
        self.interventions = 0
        self.intervention_steps = 0
        self.last_expert_action = None
        self._intervening = False
        self._segment_left = 0
        self._divergent = 0
        self._driven = 0
        self._restart_stall_window()

    def expert_action(self, observation: Observation) -> np.ndarray:
        """The expert's action for ``observation``, clipped to [-1, 1] (float32)."""
        if self._expert is None:
            raise RuntimeError("call reset(task) before decide()")
        state = np.asarray(observation.features["state"], dtype=np.float64)
        with warnings.catch_warnings():
            # Experts use gains > 1 and warn that the env clips; we clip ourselves.
            warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
            action = self._expert.get_action(state)
        return np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0).astype(np.float32)

    def decide(self, observation: Observation, policy_action: np.ndarray) -> np.ndarray | None:
        """Apply the gating rule; return the operator's action while it drives, else None."""
        cfg = self.config
        expert = self.expert_action(observation)
        self.last_expert_action = expert
        if self._intervening:
            if self._segment_left > 0:
                return self._drive(expert)
            self._hand_back(observation.reward)
            return None

        policy = np.clip(np.asarray(policy_action, dtype=np.float64), -1.0, 1.0)
        distance = float(np.linalg.norm(policy - expert))
        self._divergent = self._divergent + 1 if distance > cfg.divergence_threshold else 0
        if observation.reward > self._best_reward + cfg.stall_min_improvement:
            self._best_reward = observation.reward
            self._stall = 0
        elif distance > cfg.agree_threshold:
            self._stall += 1

        if self._divergent >= cfg.divergence_steps:
            reason = f"policy diverged from expert for {self._divergent} steps (last distance {distance:.2f})"
        elif self._stall >= cfg.stall_steps:
            reason = f"no reward progress for {self._stall} steps (best {self._best_reward:.2f})"
        elif 0 < cfg.patience_steps <= self._driven:
            reason = f"not done after {self._driven} steps (best reward {self._best_reward:.2f})"
        else:
            self._driven += 1
            return None
        self._take_over(reason)
        return self._drive(expert)

    def command(self, observation: Observation, policy_action: np.ndarray) -> np.ndarray | None:
        """The expert's action (plus noise) whatever the gating: the simulated human at the console drives."""
        expert = self.expert_action(observation)
        self.last_expert_action = expert
        self.intervention_steps += 1
        return self._noisy(expert)

    def _take_over(self, reason: str) -> None:
        log.debug("operator takes over: %s", reason)
        self.interventions += 1
        self._intervening = True
        self._segment_left = self.config.segment_steps

    def _hand_back(self, reward: float) -> None:
        log.debug("operator hands back after %d steps", self.config.segment_steps)
        self._intervening = False
        self._divergent = 0
        self._driven = 0
        self._restart_stall_window(reward)

    def _drive(self, expert: np.ndarray) -> np.ndarray:
        self._segment_left -= 1
        self.intervention_steps += 1
        return self._noisy(expert)

    def _noisy(self, expert: np.ndarray) -> np.ndarray:
        if self.config.noise_std > 0:
            noisy = expert + self._rng.normal(0.0, self.config.noise_std, size=expert.shape)
            return np.clip(noisy, -1.0, 1.0).astype(np.float32)
        return expert.copy()

    def _restart_stall_window(self, reward: float = -np.inf) -> None:
        self._best_reward = reward
        self._stall = 0
