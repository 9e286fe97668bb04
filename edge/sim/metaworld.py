"""A simulated Sawyer arm running MetaWorld MT10 tasks.

Task variants (initial object/goal positions). For each task we use the 50
variants MetaWorld generates for it, built with ``metaworld.MT1(env_name,
seed=variant_seed)`` (the same construction MT10 uses, but one environment at a
time: MT10 builds all ten, about 6 s). Training robots draw episodes from the
variants with an **even** index (0, 2, ..., 48); ``held_out=True`` robots draw
from the **odd** ones (1, 3, ..., 49), so evaluation on held-out robots never
starts from a state the learner was trained on. A robot built with
``held_out_eval=True`` (the simulated fleet's default) draws its evaluation episodes
(announced by the control loop with ``set_evaluation``) from the odd variants and
its operator-supervised ones from the even. Within its set a robot picks a
variant uniformly at random with its own seeded generator.

A robot built with ``fresh_variants=True`` starts each training episode instead from a fresh initial
state drawn from MetaWorld's own task distribution (object and goal positions sampled anew, seeded by
the robot's generator), so every episode is a new variant and a fleet of N robots sees N times as many
distinct initial states per minute; held-out episodes stay the fixed odd variants. With 25 fixed
variants, reach is limited by which 25 goals were seen (a small ACT cloned from 50 or 200 demonstrations
on them succeeds on 0.4-0.6 of held-out goals); from fresh ones, 100 demonstrations give 1.0.

Tasks are addressed by language instruction (``INSTRUCTIONS``); the MetaWorld
env name is accepted too.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from typing import Any

import metaworld
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from edge.robots.base import Observation, Robot, register_robot
from fleet.errors import ConfigError, InvalidInput
from fleet.types import FeatureSpec, Schema

log = logging.getLogger(__name__)

INSTRUCTIONS: dict[str, str] = {
    "reach-v3": "reach the goal",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "open the window",
    "window-close-v3": "close the window",
}
"""MetaWorld env name -> the language instruction used as the task string."""

_ENV_NAMES: dict[str, str] = {instruction: name for name, instruction in INSTRUCTIONS.items()}

SCHEMA = Schema(
    observation=(FeatureSpec("state", "float32", (39,)),),
    action=FeatureSpec("action", "float32", (4,)),
)
"""Observation: MetaWorld's 39-d state (hand, gripper, objects, previous frame, goal).
Action: xyz end-effector delta and gripper effort, each in [-1, 1]."""

N_VARIANTS = 50
"""Variants MetaWorld generates per task."""

# MetaWorld seeds and restores numpy's *global* RNG while generating variants;
# serialise that so two robots built on two threads cannot interleave.
_VARIANTS_LOCK = threading.Lock()


def instruction_for(env_name: str) -> str:
    """The language instruction of a MetaWorld env name."""
    try:
        return INSTRUCTIONS[env_name]
    except KeyError:
        raise ConfigError(f"unknown MetaWorld task {env_name!r}; known: {', '.join(INSTRUCTIONS)}") from None


def env_name_for(instruction_or_env_name: str) -> str:
    """The MetaWorld env name of an instruction (an env name is returned as is)."""
    if instruction_or_env_name in INSTRUCTIONS:
        return instruction_or_env_name
    try:
        return _ENV_NAMES[instruction_or_env_name]
    except KeyError:
        raise ConfigError(
            f"unknown MetaWorld task {instruction_or_env_name!r}; "
            f"known instructions: {', '.join(repr(i) for i in _ENV_NAMES)}"
        ) from None


def variant_indices(held_out: bool) -> tuple[int, ...]:
    """The variant indices a training (even) or held-out (odd) robot draws from."""
    return tuple(range(1 if held_out else 0, N_VARIANTS, 2))


@functools.lru_cache(maxsize=None)
def _variants(env_name: str, variant_seed: int) -> tuple[Any, ...]:
    """MetaWorld's task variants of one env (deterministic in ``variant_seed``; cached)."""
    with _VARIANTS_LOCK:
        benchmark = metaworld.MT1(env_name, seed=variant_seed)
    tasks = tuple(benchmark.train_tasks)
    if len(tasks) != N_VARIANTS:
        raise ConfigError(f"MetaWorld generated {len(tasks)} variants of {env_name!r}, expected {N_VARIANTS}")
    return tasks


class _TaskEnv:
    """One cached MetaWorld environment and its variants."""

    def __init__(self, env_name: str, variant_seed: int, max_episode_steps: int):
        self.variants = _variants(env_name, variant_seed)
        self.env = ALL_V3_ENVIRONMENTS[env_name]()
        # MetaWorld truncates (and then refuses to step) at max_path_length (500 by default).
        self.env.max_path_length = max_episode_steps


@register_robot("metaworld")
class MetaWorldRobot(Robot):
    """A MetaWorld Sawyer that can do any of ``tasks`` (MT10 env names or instructions)."""

    embodiment = "metaworld-sawyer"
    stop_action = "zero"  # actions are hand position deltas (and the gripper effort)

    def __init__(
        self,
        tasks: Sequence[str],
        seed: int = 0,
        max_episode_steps: int = 150,
        held_out: bool = False,
        variant_seed: int = 0,
        held_out_eval: bool = False,
        fresh_variants: bool = False,
        deal_variants: bool = False,
    ):
        """``seed`` drives this robot's variant choice; ``variant_seed`` which 50 variants
        exist (keep it equal across the fleet so train and held-out sets stay disjoint);
        ``held_out_eval``: episodes announced with ``set_evaluation(True)`` draw held-out variants;
        ``fresh_variants``: training episodes start from freshly sampled initial states (module docstring);
        ``deal_variants``: each task's variants are dealt like a shuffled deck, every allowed one once before any
        repeats (an evaluation then weighs every held-out variant the same; otherwise drawn with replacement)."""
        if isinstance(tasks, str) or len(tasks) == 0:
            raise ConfigError(f"tasks ({tasks!r}) must be a non-empty sequence of MT10 tasks")
        if max_episode_steps <= 0:
            raise ConfigError(f"max_episode_steps ({max_episode_steps}) must be a positive integer")
        env_names = tuple(dict.fromkeys(env_name_for(t) for t in tasks))
        self.schema = SCHEMA
        self.tasks = tuple(INSTRUCTIONS[n] for n in env_names)
        self.held_out = held_out
        self.max_episode_steps = max_episode_steps
        self._env_names = env_names
        self._variant_seed = variant_seed
        self._allowed_variants = variant_indices(held_out)
        self.held_out_eval = held_out_eval
        self.fresh_variants = fresh_variants
        self.deal_variants = deal_variants
        self._decks: dict[tuple[str, bool], list[int]] = {}
        self._evaluation = False
        self._rng = np.random.default_rng(seed)
        self._envs: dict[str, _TaskEnv] = {}
        self._connected = False
        self._current: _TaskEnv | None = None
        self._last: Observation | None = None
        self.current_env_name: str | None = None
        """MetaWorld env name of the running episode."""
        self.current_variant: int | None = None
        """Variant index (0..49) of the running episode (-1: a freshly sampled initial state)."""
        self.current_raw_obs: np.ndarray | None = None
        """The latest observation as MetaWorld returned it (float64, (39,))."""

    def connect(self) -> None:
        """Build (and cache) one environment per task, so resets in the loop are fast."""
        for name in self._env_names:
            self._env(name)
        self._connected = True
        log.info("metaworld robot connected: %d task(s), held_out=%s", len(self._env_names), self.held_out)

    def disconnect(self) -> None:
        """Close the environments."""
        for entry in self._envs.values():
            entry.env.close()
        self._envs.clear()
        self._current = None
        self._last = None
        self._connected = False

    def reset(self, task: str) -> Observation:
        """Start an episode of ``task`` from a random allowed variant."""
        self._require_connected()
        env_name = env_name_for(task)
        if env_name not in self._env_names:
            raise ConfigError(f"task {task!r} is not one of this robot's tasks {self.tasks}")
        entry = self._env(env_name)
        held_out = self.held_out or (self._evaluation and self.held_out_eval)
        allowed = variant_indices(True) if held_out else self._allowed_variants
        if self.deal_variants:
            deck = self._decks.setdefault((env_name, held_out), [])
            if not deck:
                deck.extend(self._rng.permutation(allowed).tolist())
            variant = int(deck.pop())
        else:
            variant = int(self._rng.choice(allowed))
        entry.env.set_task(entry.variants[variant])  # also fixes (freezes) the variant's initial state
        if self.fresh_variants and not held_out:
            # MetaWorld's own sampler (it also rejects invalid states), from a generator seeded by ours.
            entry.env._freeze_rand_vec, entry.env.seeded_rand_vec = False, True
            entry.env.np_random = np.random.default_rng(int(self._rng.integers(1 << 63)))
            variant = -1
        raw, _info = entry.env.reset()
        self._current = entry
        self.current_env_name = env_name
        self.current_variant = variant
        return self._observe_raw(raw, reward=0.0, success=False, terminated=False)

    def set_evaluation(self, evaluation: bool) -> None:
        """Whether the next episodes are evaluation episodes (held-out variants when ``held_out_eval``)."""
        self._evaluation = evaluation

    def observe(self) -> Observation:
        """The observation after the last reset or action."""
        if self._last is None:
            raise RuntimeError("no episode running: call reset(task) first")
        return self._last

    def act(self, action: np.ndarray) -> Observation:
        """Clip ``action`` to [-1, 1], step the simulator, and return the new observation."""
        if self._current is None or self._last is None:
            raise RuntimeError("no episode running: call reset(task) first")
        if self._last.terminated:
            raise RuntimeError("the episode has terminated: call reset(task) first")
        a = np.asarray(action, dtype=np.float64)
        if a.shape != SCHEMA.action.shape:
            raise InvalidInput(f"action shape {a.shape} != {SCHEMA.action.shape}")
        if not np.all(np.isfinite(a)):
            raise InvalidInput(f"action {a} is not finite")
        raw, reward, terminated, truncated, info = self._current.env.step(np.clip(a, -1.0, 1.0))
        return self._observe_raw(
            raw,
            reward=float(reward),
            success=bool(info.get("success", False)),
            terminated=bool(terminated or truncated),
        )

    def _observe_raw(self, raw: np.ndarray, reward: float, success: bool, terminated: bool) -> Observation:
        self.current_raw_obs = np.array(raw, dtype=np.float64)
        self._last = Observation(
            features={"state": self.current_raw_obs.astype(np.float32)},
            reward=reward,
            success=success,
            terminated=terminated,
        )
        return self._last

    def _env(self, env_name: str) -> _TaskEnv:
        entry = self._envs.get(env_name)
        if entry is None:
            entry = _TaskEnv(env_name, self._variant_seed, self.max_episode_steps)
            self._envs[env_name] = entry
        return entry

    def _require_connected(self) -> None:
        if not self._connected:
            raise RuntimeError("robot is not connected: call connect() or use it as a context manager")
