"""Export the buffer's episodes in the formats the field uses (``fleet export``).

This module selects episodes from Redis (by task, robot, embodiment, start time and
policy version) and reads their steps; ``lerobot.py`` writes a LeRobotDataset v3 and
``rosbag2.py`` an MCAP rosbag2.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from cloud.buffer import SOURCE_ONLINE
from cloud.buffer.reader import BufferReader
from fleet.columns import decode_element
from fleet.convert import schema_from_dict
from fleet.errors import ConfigError
from fleet.types import Schema, Step

log = logging.getLogger(__name__)

FORMATS = ("lerobot", "rosbag2")


@dataclass(frozen=True)
class ExportFilter:
    """Which episodes to export; empty/None fields do not filter."""

    tasks: tuple[str, ...] = ()
    """Only episodes of these tasks (language instructions)."""
    robots: tuple[str, ...] = ()
    """Only episodes of these robot ids."""
    embodiment: str = ""
    """Only robots registered with this embodiment."""
    since_s: float | None = None
    """Only episodes that started at or after this Unix time."""
    until_s: float | None = None
    """Only episodes that started before this Unix time."""
    min_version: int | None = None
    """Only episodes run with a policy version >= this."""
    max_version: int | None = None
    """Only episodes run with a policy version <= this."""
    include_unfinished: bool = False
    """Also export episodes whose last step has not arrived yet."""
    include_eval: bool = True
    """Also export evaluation episodes."""
    episode_ids: tuple[str, ...] = ()
    """Only these episode ids (retention archives the episodes it evicts)."""

    def __post_init__(self) -> None:
        if self.since_s is not None and self.until_s is not None and self.until_s <= self.since_s:
            raise ConfigError(f"until ({self.until_s}) must be after since ({self.since_s})")
        if self.min_version is not None and self.max_version is not None and self.max_version < self.min_version:
            raise ConfigError(f"max_version ({self.max_version}) must be >= min_version ({self.min_version})")


@dataclass(frozen=True)
class EpisodeRef:
    """One stored episode and what the catalog and registration say about it."""

    robot_id: str
    episode_id: str
    task: str
    length: int
    ended: bool
    success: bool
    evaluation: bool
    version: int
    source: str
    embodiment: str
    schema: Schema
    start_s: float = 0.0
    """Timestamp of its first step (Unix seconds)."""
    control_hz: float = 0.0
    """Control rate its robot registered (ticks per second); 0 = unknown (registered before the field existed)."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    path: str
    episodes: int
    steps: int


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 date/time (UTC unless it says otherwise) -> Unix seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"time {text!r} is neither Unix seconds nor ISO 8601 (e.g. 2026-01-31T12:00:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _rate(value) -> float:
    """A registration's control rate; anything but a positive finite number reads as 0 (unknown)."""
    try:
        hz = float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return hz if math.isfinite(hz) and hz > 0 else 0.0


def select_episodes(redis, flt: ExportFilter) -> list[EpisodeRef]:
    """The episodes that pass ``flt``, oldest first (reads catalogs and each episode's first step)."""
    robots = {_text(k): json.loads(v) for k, v in BufferReader(redis).registrations_raw().items()}
    unknown = sorted(set(flt.robots) - set(robots))
    if unknown:
        raise ConfigError(f"unknown robot(s) {unknown}; registered: {sorted(robots)}")
    candidates: list[EpisodeRef] = []
    for rid, reg in sorted(robots.items()):
        if (flt.robots and rid not in flt.robots) or (flt.embodiment and reg.get("embodiment") != flt.embodiment):
            continue
        schema = schema_from_dict(reg["schema"])
        for eid, raw in BufferReader(redis).catalog(rid).items():
            entry = json.loads(raw)
            version = int(entry.get("version") or 0)
            if ((flt.tasks and entry["task"] not in flt.tasks)
                    or (flt.episode_ids and _text(eid) not in flt.episode_ids)
                    or (not entry.get("ended") and not flt.include_unfinished)
                    or (entry.get("eval") and not flt.include_eval)
                    or (flt.min_version is not None and version < flt.min_version)
                    or (flt.max_version is not None and version > flt.max_version)):
                continue
            candidates.append(EpisodeRef(rid, _text(eid), entry["task"], int(entry["len"]), bool(entry.get("ended")),
                                         bool(entry.get("success")), bool(entry.get("eval")), version,
                                         entry.get("source", reg.get("source", SOURCE_ONLINE)),
                                         reg.get("embodiment", ""), schema, control_hz=_rate(reg.get("control_hz"))))
    pipe, reader = redis.pipeline(transaction=False), BufferReader(redis)
    for ref in candidates:
        reader.queue_elements(pipe, ref.robot_id, ref.episode_id, 0, 0)
    selected = []
    for ref, first in zip(candidates, pipe.execute()):
        if not first:
            continue
        start = float(decode_element(first[0], ref.schema).columns.timestamp_s[0])
        if (flt.since_s is not None and start < flt.since_s) or (flt.until_s is not None and start >= flt.until_s):
            continue
        selected.append(EpisodeRef(**{**ref.__dict__, "start_s": start}))
    selected.sort(key=lambda r: (r.start_s, r.robot_id, r.episode_id))
    log.info("selected %d of %d episodes", len(selected), len(candidates))
    return selected


def iter_steps(redis, ref: EpisodeRef, blobs=None) -> Iterator[Step]:
    """The steps of one episode in order (with their camera frames), a few chunks at a time."""
    yield from BufferReader(redis, blobs).iter_steps(ref.robot_id, ref.episode_id, ref.schema)


def single_schema(refs: list[EpisodeRef]) -> Schema:
    """The one schema all ``refs`` share; a clear error when they mix embodiments."""
    if not refs:
        raise ConfigError("no episodes match the filters")
    kinds: dict[Schema, set[str]] = {}
    for ref in refs:
        kinds.setdefault(ref.schema, set()).add(f"{ref.embodiment or '?'} ({ref.robot_id})")
    if len(kinds) > 1:
        described = "; ".join(", ".join(sorted(v)) for v in kinds.values())
        raise ConfigError(f"the selected episodes have {len(kinds)} different schemas ({described}); "
                          "export one embodiment at a time with --embodiment or --robot")
    return refs[0].schema
