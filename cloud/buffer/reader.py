"""The read side of the buffer (sampler, status, export, metrics, retention): registrations, the
episode catalog, an episode's chunk elements decoded to columns, camera frames from the element or
the blob store. Synchronous (redis-py); the layout is :mod:`cloud.buffer.layout`'s."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

from cloud.buffer.layout import OPS_ASSIGNMENTS_KEY, OPS_OPERATORS_KEY, ROBOTS_KEY, SOURCE_ONLINE, RobotKeys, frames_key
from fleet.columns import FRAMES_BLOB, FRAMES_INLINE, Element, decode_element, unpack_frames
from fleet.convert import schema_from_dict
from fleet.errors import InvalidInput
from fleet.types import Schema, Step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodeInfo:
    """One catalog entry (what retention, status and export need)."""

    robot_id: str
    episode_id: str
    task: str
    source: str
    evaluation: bool
    ended: bool
    success: bool
    length: int
    redis_bytes: int
    blob_bytes: int
    intervention_steps: int
    first_s: float
    updated_s: float
    policy_version: int = 0


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def status_number(value, default: float = 0.0, low: float = -math.inf, high: float = math.inf) -> float:
    """A field of a status hash (a robot's heartbeat, the trainer's status) as a finite float clipped to
    [low, high]; missing, malformed or not finite: ``default``. Whatever Redis holds, readers do not crash."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return default
    return min(max(x, low), high) if math.isfinite(x) else default


class BufferReader:
    """Reads over a synchronous Redis client; ``blobs`` (a ``cloud.blobstore.BlobStore``) serves frames
    stored in the blob store."""

    def __init__(self, redis, blobs=None):
        self.redis = redis
        self.blobs = blobs

    def registrations(self) -> dict[str, dict]:
        """robot id -> its registration JSON (unreadable ones left out)."""
        out = {}
        for key, raw in self.redis.hgetall(ROBOTS_KEY).items():
            try:
                out[_text(key)] = json.loads(raw)
            except ValueError:
                continue
        return out

    def registrations_raw(self) -> dict:
        """robot id -> its registration JSON bytes, unparsed (callers that count unreadable ones)."""
        return self.redis.hgetall(ROBOTS_KEY)

    # --- pipelined reads (queue on ``pipe``, read the replies in order) ------------------------------------------
    def queue_index_reads(self, pipe, robot_id: str, labeled_from: int, names_from: int, last_event: bytes | None,
                          evicted_from: int) -> None:
        """What the trainer's index mirrors incrementally: 5 replies (new label runs, new episode names, new
        episode-end events, the robot's stored step count, new eviction records)."""
        k = RobotKeys(robot_id)
        pipe.lrange(k.labeled, labeled_from, -1)
        pipe.lrange(k.episode_ids, names_from, -1)  # after the runs: every number they name is in this reply
        pipe.xrange(k.events, min=b"(" + last_event if last_event else "-", max="+")
        pipe.hget(k.stats, "steps")
        pipe.lrange(k.evicted, evicted_from, -1)

    def queue_catalog(self, pipe, robot_id: str, values_only: bool = False) -> None:
        k = RobotKeys(robot_id).catalog
        pipe.hvals(k) if values_only else pipe.hgetall(k)

    def queue_events(self, pipe, robot_id: str, start="-") -> None:
        """Episode-end events from ``start`` (a stream id; "(" + id for after it)."""
        pipe.xrange(RobotKeys(robot_id).events, min=start, max="+")

    def events(self, robot_id: str, start="-") -> list:
        return self.redis.xrange(RobotKeys(robot_id).events, min=start, max="+")

    def queue_robot_state(self, pipe, robot_id: str) -> None:
        """3 replies: the last heartbeat (hash), the counters (hash), the last durable seq."""
        k = RobotKeys(robot_id)
        pipe.hgetall(k.status)
        pipe.hgetall(k.stats)
        pipe.get(k.seq)

    # --- operators (cloud/operators) ------------------------------------------------------------------------------
    def robot_needs(self) -> dict[str, dict[str, str]]:
        """Online robot id -> its status hash (last heartbeat with its help signal), decoded; one round trip
        after the registrations. The operators service turns it into ``Need``s."""
        regs = self.registrations()
        rids = sorted(r for r, reg in regs.items() if (reg or {}).get("source", SOURCE_ONLINE) == SOURCE_ONLINE)
        pipe = self.redis.pipeline(transaction=False)
        for rid in rids:
            pipe.hgetall(RobotKeys(rid).status)
        return {rid: {_text(k): _text(v) for k, v in status.items()}
                for rid, status in zip(rids, pipe.execute() if rids else [])}

    def thumbnail(self, robot_id: str) -> bytes | None:
        """The last JPEG thumbnail robot ``robot_id``'s heartbeat carried (None: none in the last minute)."""
        return self.redis.get(RobotKeys(robot_id).thumb)

    def thumbnails_present(self, robot_ids: list[str]) -> list[str]:
        """Those of ``robot_ids`` that have a thumbnail now (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for rid in robot_ids:
            pipe.exists(RobotKeys(rid).thumb)
        return [rid for rid, n in zip(robot_ids, pipe.execute() if robot_ids else []) if n]

    def assignments(self) -> dict[str, bytes]:
        """robot id -> its raw JSON entry of the operator assignments (``fleet:ops:assignments``)."""
        return {_text(k): v for k, v in self.redis.hgetall(OPS_ASSIGNMENTS_KEY).items()}

    def operators(self) -> dict[str, bytes]:
        """operator id -> its raw JSON entry (``fleet:ops:operators``)."""
        return {_text(k): v for k, v in self.redis.hgetall(OPS_OPERATORS_KEY).items()}

    def schema(self, robot_id: str) -> Schema | None:
        raw = self.redis.hget(ROBOTS_KEY, robot_id)
        try:
            return schema_from_dict(json.loads(raw)["schema"]) if raw else None
        except (ValueError, KeyError, TypeError):
            return None

    def elements(self, robot_id: str, episode_id: str, first_chunk: int = 0, last_chunk: int = -1) -> list[bytes]:
        return self.redis.lrange(RobotKeys(robot_id).episode(episode_id), first_chunk, last_chunk)

    def queue_elements(self, pipe, robot_id: str, episode_id: str, first_chunk: int = 0, last_chunk: int = -1) -> None:
        """Queue an LRANGE of the episode's elements [first_chunk, last_chunk] on ``pipe`` (a pipeline)."""
        pipe.lrange(RobotKeys(robot_id).episode(episode_id), first_chunk, last_chunk)

    def episode_length(self, robot_id: str, episode_id: str) -> int:
        """Steps stored of one episode (its catalog entry; 0 if none)."""
        raw = self.redis.hget(RobotKeys(robot_id).catalog, episode_id)
        try:
            return int(json.loads(raw)["len"]) if raw else 0
        except (ValueError, KeyError, TypeError):
            return 0

    def labeled_steps(self, robot_id: str) -> int:
        """Steps the robot's label runs cover."""
        total = 0
        for raw in self.redis.lrange(RobotKeys(robot_id).labeled, 0, -1):
            try:
                _, runs = parse_label_runs(raw)
            except ValueError:
                continue
            total += sum(end - start for start, end in runs)
        return total

    def catalog(self, robot_id: str) -> dict:
        """The robot's raw catalog (episode id bytes -> JSON bytes)."""
        return self.redis.hgetall(RobotKeys(robot_id).catalog)

    def iter_steps(self, robot_id: str, episode_id: str, schema: Schema, batch_chunks: int = 16):
        """The episode's steps in order with their frames, ``batch_chunks`` elements read at a time."""
        start = 0
        while True:
            raws = self.elements(robot_id, episode_id, start, start + batch_chunks - 1)
            for i, raw in enumerate(raws):
                element = decode_element(raw, schema, f"robot {robot_id!r} episode {episode_id!r} chunk {start + i}")
                yield from self._with_frames(robot_id, episode_id, element, schema)
            if len(raws) < batch_chunks:
                return
            start += batch_chunks

    def _with_frames(self, robot_id: str, episode_id: str, element: Element, schema: Schema) -> list[Step]:
        cols = element.columns
        for f in schema.observation:
            if f.is_image and f.name not in cols.frames:
                cols.frames[f.name] = self.frames(robot_id, episode_id, element, f.name)
        return cols.steps(element.first_index, schema)

    def columns(self, robot_id: str, episode_id: str, schema: Schema, first_chunk: int = 0) -> list[Element]:
        """The episode's chunks from ``first_chunk`` on, decoded (InvalidInput if one cannot be)."""
        return [decode_element(raw, schema, f"robot {robot_id!r} episode {episode_id!r} chunk {first_chunk + i}")
                for i, raw in enumerate(self.elements(robot_id, episode_id, first_chunk))]

    def frames(self, robot_id: str, episode_id: str, element: Element, camera: str) -> list[bytes]:
        """One camera's encoded frames of one chunk (from the element, or the blob store)."""
        if element.frames_where == FRAMES_INLINE:
            return element.columns.frames[camera]
        if element.frames_where != FRAMES_BLOB:
            raise InvalidInput(f"robot {robot_id!r} episode {episode_id!r}: chunk has no frames of {camera!r}")
        if self.blobs is None:
            raise InvalidInput("the buffer keeps frames in a blob store, but none is configured (--blob_url)")
        key = frames_key(robot_id, episode_id, element.columns.first_seq, camera)
        frames = unpack_frames(self.blobs.get(key), key)
        if len(frames) != element.columns.n:
            raise InvalidInput(f"{key}: {len(frames)} frames for {element.columns.n} steps")
        return frames

    def steps(self, robot_id: str, episode_id: str, schema: Schema) -> list[Step]:
        """The episode as per-step records with their frames (export and tools; not a hot path)."""
        return list(self.iter_steps(robot_id, episode_id, schema))

    def episodes(self, robot_ids: list[str] | None = None) -> list[EpisodeInfo]:
        """Every catalog entry (of ``robot_ids``, default all registered robots); unreadable ones skipped."""
        regs = self.registrations()
        rids = list(regs) if robot_ids is None else robot_ids
        pipe = self.redis.pipeline(transaction=False)
        for rid in rids:
            pipe.hgetall(RobotKeys(rid).catalog)
        out = []
        for rid, catalog in zip(rids, pipe.execute()):
            default_source = (regs.get(rid) or {}).get("source", SOURCE_ONLINE)
            for eid, raw in catalog.items():
                try:
                    e = json.loads(raw)
                    out.append(EpisodeInfo(
                        rid, _text(eid), str(e["task"]), str(e.get("source", default_source)), bool(e.get("eval")),
                        bool(e.get("ended")), bool(e.get("success")), int(e["len"]), int(e.get("redis_bytes", 0)),
                        int(e.get("blob_bytes", 0)), int(e.get("interventions", 0)),
                        float(e.get("first_s", e.get("updated_s", 0.0))), float(e.get("updated_s", 0.0)),
                        int(e.get("version") or 0)))
                except (ValueError, KeyError, TypeError) as exc:
                    log.debug("robot %s: catalog entry %r unreadable (%r)", rid, eid, exc)
        return out


def parse_label_runs(raw: bytes) -> tuple[int, list[tuple[int, int]]]:
    """A ``labeled`` entry ``"<episode number>|start|end[|start|end...]"`` -> (number, runs); ValueError
    if it is not one (each run 0 <= start < end)."""
    fields = [int(x) for x in raw.split(b"|")]
    if len(fields) < 3 or len(fields) % 2 != 1:
        raise ValueError(f"{len(fields)} fields; expected the episode number and start|end pairs")
    runs = list(zip(fields[1::2], fields[2::2]))
    for start, end in runs:
        if not 0 <= start < end:
            raise ValueError(f"run [{start}, {end})")
    return fields[0], runs
