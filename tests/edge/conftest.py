"""Test-only helpers for the edge tests: a list sink and a scripted acting policy."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import metaworld.policies
import numpy as np
import pytest

from edge.sim.operator import EXPERTS
from edge.sim.metaworld import MetaWorldRobot, env_name_for
from fleet.types import EpisodeSummary, Step


@dataclass
class Recorded:
    """One ``StepSink.record`` call."""

    episode_id: str
    task: str
    evaluation: bool
    step: Step
    episode_end: EpisodeSummary | None


class ListSink:
    """A StepSink keeping every call in memory; ``on_record`` runs after each one."""

    def __init__(self, on_record: Callable[[Recorded], None] | None = None):
        self.records: list[Recorded] = []
        self.threads: set[str] = set()
        self.on_record = on_record

    def record(
        self, episode_id: str, task: str, evaluation: bool, step: Step, episode_end: EpisodeSummary | None
    ) -> None:
        """Append the call."""
        self.threads.add(threading.current_thread().name)
        rec = Recorded(episode_id, task, evaluation, step, episode_end)
        self.records.append(rec)
        if self.on_record is not None:
            self.on_record(rec)

    def episodes(self) -> list[list[Recorded]]:
        """Records grouped by episode, in order."""
        grouped: dict[str, list[Recorded]] = {}
        for rec in self.records:
            grouped.setdefault(rec.episode_id, []).append(rec)
        return list(grouped.values())


def expert_action(task: str, state: np.ndarray) -> np.ndarray:
    """The MetaWorld scripted expert's clipped action for ``task`` at ``state``."""
    expert = getattr(metaworld.policies, EXPERTS[env_name_for(task)])()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        action = expert.get_action(np.asarray(state, dtype=np.float64))
    return np.clip(action, -1.0, 1.0).astype(np.float32)


class ScriptedPolicy:
    """An ActingPolicy that acts as the expert, zeros, NaN, or raises (``mode``)."""

    def __init__(self, mode: str = "expert", version: int = 1):
        assert mode in ("expert", "zero", "nan", "raise")
        self.mode = mode
        self.version = version
        self.resets = 0
        self.calls = 0

    def reset(self) -> None:
        """Count resets."""
        self.resets += 1

    def select_action(self, observation: dict[str, np.ndarray], task: str) -> np.ndarray:
        """The action of ``mode``."""
        self.calls += 1
        if self.mode == "expert":
            return expert_action(task, observation["state"])
        if self.mode == "nan":
            return np.full(4, np.nan, dtype=np.float32)
        if self.mode == "raise":
            raise RuntimeError("broken policy")
        return np.zeros(4, dtype=np.float32)


@pytest.fixture
def make_robot_connected() -> Iterator[Callable[..., MetaWorldRobot]]:
    """Factory of connected MetaWorld robots, disconnected at teardown."""
    robots: list[MetaWorldRobot] = []

    def make(tasks: tuple[str, ...] = ("reach-v3",), **kwargs: object) -> MetaWorldRobot:
        robot = MetaWorldRobot(tasks, **kwargs)  # type: ignore[arg-type]
        robot.connect()
        robots.append(robot)
        return robot

    yield make
    for robot in robots:
        robot.disconnect()


@pytest.fixture
def expert() -> Callable[[str, np.ndarray], np.ndarray]:
    """``expert(task, state)``: the scripted expert's clipped action."""
    return expert_action


@pytest.fixture
def make_policy() -> Callable[..., ScriptedPolicy]:
    """``make_policy(mode="expert", version=1)``: a ScriptedPolicy."""
    return ScriptedPolicy


@pytest.fixture
def make_sink() -> Callable[..., ListSink]:
    """``make_sink(on_record=None)``: a ListSink."""
    return ListSink
