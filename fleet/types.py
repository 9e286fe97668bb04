"""Domain types shared by edge and cloud. Generated ``*_pb2`` objects never leave
``fleet/convert.py``; everything else speaks these dataclasses and numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# numpy dtype names allowed on the wire ("bfloat16" travels as raw 16-bit patterns).
DTYPES = ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool")


@dataclass(frozen=True)
class FeatureSpec:
    """One named observation or action feature."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    is_image: bool = False
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"FeatureSpec {self.name!r}: dtype {self.dtype!r} is not one of {DTYPES}")
        if any(int(d) < 0 for d in self.shape):
            raise ValueError(f"FeatureSpec {self.name!r}: shape {self.shape} has a negative dimension")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


@dataclass(frozen=True)
class Schema:
    """What a robot observes (``observation``) and how it is commanded (``action``)."""

    observation: tuple[FeatureSpec, ...]
    action: FeatureSpec

    def observation_spec(self, name: str) -> FeatureSpec | None:
        for spec in self.observation:
            if spec.name == name:
                return spec
        return None


@dataclass(frozen=True)
class EncodedImage:
    """A camera frame as PNG/JPEG bytes plus its decoded size."""

    encoding: str
    height: int
    width: int
    channels: int
    data: bytes


@dataclass
class Step:
    """One control step as recorded on the robot."""

    seq: int
    index: int
    observation: dict[str, np.ndarray]
    policy_action: np.ndarray
    action: np.ndarray
    is_intervention: bool
    reward: float
    success: bool
    done: bool
    policy_version: int
    timestamp_s: float
    images: dict[str, EncodedImage] = field(default_factory=dict)
    help_score: float = 0.0
    """The robot's need-for-help score at this step (0..1, edge/help.py; 0 when not computed)."""


@dataclass(frozen=True)
class EpisodeSummary:
    """Outcome of an episode; sent with its last chunk."""

    success: bool
    num_steps: int
    intervention_steps: int
    interventions: int
    evaluation: bool
    policy_version: int



@dataclass
class EpisodeCounts:
    """Finished episodes and successes, split into evaluation (no operator) and supervised ones; the one
    counter the control loop (LoopStats) and ``fleet status`` (TaskWindow) both keep."""

    episodes: int = 0
    successes: int = 0
    eval_episodes: int = 0
    """Evaluation episodes: run without the operator."""
    eval_successes: int = 0

    def count_episode(self, success: bool, evaluation: bool) -> None:
        self.episodes += 1
        self.successes += int(success)
        self.eval_episodes += int(evaluation)
        self.eval_successes += int(evaluation and success)

    @property
    def supervised_episodes(self) -> int:
        return self.episodes - self.eval_episodes

    @property
    def supervised_successes(self) -> int:
        return self.successes - self.eval_successes

    @property
    def autonomous_success_ratio(self) -> float | None:
        return self.eval_successes / self.eval_episodes if self.eval_episodes else None

    @property
    def supervised_success_ratio(self) -> float | None:
        return self.supervised_successes / self.supervised_episodes if self.supervised_episodes else None

@dataclass
class Chunk:
    """Consecutive steps of one episode of one robot."""

    robot_id: str
    episode_id: str
    task: str
    steps: list[Step]
    gap_declared: bool = False
    episode_end: EpisodeSummary | None = None
    evaluation: bool = False


@dataclass(frozen=True)
class HelpSignal:
    """A robot's need for a human operator, computed each control tick (``edge/help.py``, docs/operators.md)."""

    score: float = 0.0
    """0..1, the combined need (what the allocator ranks by by default)."""
    uncertainty: float = 0.0
    """0..1, the policy's uncertainty (disagreement across its action chunk's re-predictions)."""
    stall: float = 0.0
    """0..1, lack of progress."""
    risk: float = 0.0
    """0..1, predicted failure (RECAP's value function when the policy provides it; else 0)."""
    wanted: bool = False
    """score >= the robot's help threshold."""
    holding: bool = False
    """The robot stopped (or fell back) because it wants help and has no operator."""
    intervening: bool = False
    """A human (or stand-in) drives right now."""
    wanted_for_s: float = 0.0
    """Seconds help has been wanted continuously (0 if not wanted)."""


@dataclass(frozen=True)
class OperatorAssignment:
    """The operator the cloud assigned to a robot (``operator_id`` "" = none)."""

    operator_id: str = ""
    manual: bool = False
    """A console take-over: the operator drives every step until hand-back."""
    since_s: float = 0.0
    """Wall-clock time the assignment began."""


NO_ASSIGNMENT = OperatorAssignment()


@dataclass(frozen=True)
class RobotInfo:
    """What a robot says about itself when it registers."""

    robot_id: str
    embodiment: str
    schema: Schema
    tasks: tuple[str, ...]
    protocol_version: str
    software_version: str = ""
    control_hz: float = 0.0
    """Control rate the robot's steps are recorded at (ticks per second); 0 = unknown."""
