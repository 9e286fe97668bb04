"""How a fleet observation feature maps onto LeRobot's keys when one vector holds two kinds of state.

LeRobot separates what the robot knows of itself (``observation.state``: joints, end effector,
gripper) from what a simulator knows of the world (``observation.environment_state``: object poses,
goals), and its policies need one of images or environment state (ACT refuses a dataset with
neither). MetaWorld hands the robot one 39-d vector; the fleet keeps it whole (the wire schema,
the trainer and the scripted operator read it so), and the export splits it here, per embodiment.
The split travels with the export as ``meta/fleet_features.json`` so that ``fleet import`` puts the
vector back together and the imported robot has the schema the trainer of that embodiment expects.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import ConfigError
from fleet.types import FeatureSpec

log = logging.getLogger(__name__)

OBS_STATE = "observation.state"
OBS_ENV_STATE = "observation.environment_state"
LAYOUT_FILE = "meta/fleet_features.json"


@dataclass(frozen=True)
class Part:
    """Elements ``start:stop`` of a fleet feature, written as LeRobot key ``key``."""

    key: str
    start: int
    stop: int
    names: tuple[str, ...] | None = None
    """One name per element (LeRobot's ``names``), or None."""


def _xyz(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}_{axis}" for axis in "xyz")


def _objects(prefix: str) -> tuple[str, ...]:  # two objects, position and MuJoCo quaternion (w, x, y, z)
    return tuple(name for i in (0, 1) for name in (*_xyz(f"{prefix}obj{i}"),
                                                   *(f"{prefix}obj{i}_q{c}" for c in "wxyz")))


_HAND = (*_xyz("hand"), "gripper_open")
METAWORLD_STATE = (
    Part(OBS_STATE, 0, 4, _HAND),
    Part(OBS_ENV_STATE, 4, 39, (*_objects(""), *(f"prev_{n}" for n in _HAND), *_objects("prev_"), *_xyz("goal"))),
)
"""MetaWorld's 39-d state: hand xyz and gripper opening (the agent), then the objects (14), the previous
frame of hand, gripper and objects (18, MetaWorld's frame stacking) and the goal (3): the environment."""

SPLITS: dict[str, dict[str, tuple[Part, ...]]] = {"metaworld-sawyer": {"state": METAWORLD_STATE}}
"""embodiment -> {fleet feature name -> its parts}; features not listed map to ``observation.<name>``."""


def _fits(spec: FeatureSpec, parts: tuple[Part, ...]) -> bool:
    bounds = [(p.start, p.stop) for p in parts]
    contiguous = all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])) and bounds[0][0] == 0
    return (not spec.is_image and len(spec.shape) == 1 and contiguous and bounds[-1][1] == spec.shape[0]
            and all(p.names is None or len(p.names) == p.stop - p.start for p in parts))


def split_for(embodiments: set[str], observation: tuple[FeatureSpec, ...]) -> dict[str, tuple[Part, ...]]:
    """The split of the exported episodes' features: the embodiments' own, when they agree and it fits."""
    known = {e: SPLITS.get(e, {}) for e in embodiments}
    if not any(known.values()):
        return {}
    if len({json.dumps({k: [p.__dict__ for p in v] for k, v in s.items()}) for s in known.values()}) > 1:
        log.warning("embodiments %s map their state differently; exporting every feature whole", sorted(embodiments))
        return {}
    split = next(iter(known.values()))
    specs = {s.name: s for s in observation}
    for name, parts in split.items():
        if name not in specs or not _fits(specs[name], parts):
            shape = specs[name].shape if name in specs else "absent"
            log.warning("feature %r (%s) does not fit the %s split; exporting every feature whole", name, shape,
                        sorted(embodiments))
            return {}
    return split


def write_layout(root: Path, split: dict[str, tuple[Part, ...]]) -> None:
    """Record the split next to LeRobot's metadata (nothing when there is none)."""
    if split:
        data = {name: [{"key": p.key, "start": p.start, "stop": p.stop} for p in parts] for name, parts in split.items()}
        (root / LAYOUT_FILE).write_text(json.dumps(data, indent=1) + "\n")


def read_layout(root: Path, features: dict[str, dict]) -> dict[str, tuple[Part, ...]]:
    """The split an export recorded, checked against the dataset's features; {} when it recorded none."""
    path = root / LAYOUT_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        split = {str(name): tuple(Part(str(p["key"]), int(p["start"]), int(p["stop"])) for p in parts)
                 for name, parts in data.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a fleet feature layout ({type(exc).__name__}: {exc})") from None
    used: set[str] = set()
    for name, parts in split.items():
        size = parts[-1].stop if parts else 0
        if not parts or not _fits(FeatureSpec(name, "float32", (size,)), parts):
            raise ConfigError(f"{path}: the parts of {name!r} are not contiguous from 0")
        for p in parts:
            shape = tuple(features.get(p.key, {}).get("shape", ()))
            if p.key in used or shape != (p.stop - p.start,):
                raise ConfigError(f"{path}: {name!r} part {p.key!r} [{p.start}:{p.stop}] does not match the "
                                  f"dataset's {p.key!r} (shape {list(shape) or 'absent'}), or is used twice")
            used.add(p.key)
    return split
