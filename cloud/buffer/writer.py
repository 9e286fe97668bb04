"""The gateway side of the buffer: the one atomic, exactly-once chunk write (frames to the blob
store first, then one Lua script), and deleting an episode (retention). Layout and the element
format: :mod:`cloud.buffer.layout`."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass

import numpy as np

from cloud.buffer.layout import (OPS_ASSIGNMENTS_KEY, OPS_OPERATORS_KEY, ROBOTS_KEY, SOURCE_ONLINE, THUMBNAIL_TTL_S,
                                 RobotKeys, frames_key)
from fleet.columns import FRAMES_BLOB, Columns, cameras, encode_element, pack_frames, set_first_index
from fleet.convert import schema_from_dict
from fleet.errors import BackendUnavailable, InvalidInput, SequenceGap, UnknownRobot
from fleet.names import is_id, shown
from fleet.types import EpisodeSummary, OperatorAssignment, Schema

log = logging.getLogger(__name__)

# The element itself never passes through Lua: a string handed to a script costs Redis ~1.3 us per KB
# (100 KB: more than the rest of the write). The caller pushes it onto the episode list and runs this
# script right after, in one MULTI/EXEC (atomic: nothing runs in between); the script takes it back
# (LTRIM, the reply not read into Lua) on every path that does not store the chunk. The gateway sends
# the element's first_index and the label runs as the episode stands in its cache; if that is stale
# (another replica wrote the episode, a restart), nothing is stored and the reply says the truth.
# KEYS: 1 seq, 2 episode list, 3 catalog, 4 labeled, 5 events, 6 stats, 7 registered, 8 episode_ids
# ARGV: 1 first_seq, 2 n, 3 gap_declared, 4 episode_id, 5 task, 6 source, 7 evaluation,
#       8 ends_episode, 9 success, 10 policy_version, 11 now_s, 12 first_index the element carries,
#       13 intervention steps, 14 episode summary JSON (or ""), 15 element bytes, 16 blob bytes,
#       17 the episode's number the label runs carry, 18 the chunk's label runs "number|s|e|s|e..." (or ""),
#       19 the last stored seq this write requires (or "": any; a batch's later chunks name the chunk before)
# Replies {status, seq, extra, number, len}: 1 stored; 0 duplicate; -1 gap; -2 unregistered; -3 summary
# disagrees; -4 overlaps the stored steps (extra = steps already stored: resend the tail); -5 the
# element's first_index or the runs' episode number is stale (number, len: the episode's); -6 the last
# stored seq is not the one ARGV[19] requires (the chunk before it in the batch was not stored).
WRITE_CHUNK_LUA = r"""
local function refuse(status, seq, extra, number, len)
  redis.call('LTRIM', KEYS[2], 0, -2)
  return {status, seq, extra, number or 0, len or 0}
end
if redis.call('EXISTS', KEYS[7]) == 0 then
  return refuse(-2, 0, 0)
end
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if ARGV[19] ~= '' and last ~= tonumber(ARGV[19]) then
  return refuse(-6, last, 0)
end
local first = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local final = first + n - 1
if final <= last then
  return refuse(0, last, n)
end
if first > last + 1 and ARGV[3] ~= '1' then
  return refuse(-1, last, 0)
end
if first <= last then
  return refuse(-4, last, last - first + 1)
end
local dropped = 0
if ARGV[3] == '1' and first > last + 1 then dropped = first - last - 1 end
local before = redis.call('HGET', KEYS[3], ARGV[4])
local prior = {}
if before then
  local ok, decoded = pcall(cjson.decode, before)
  if ok and type(decoded) == 'table' then prior = decoded end
end
local prior_dropped = tonumber(prior.dropped or 0) or 0
local eplen = tonumber(prior.len or 0) or 0
local len = eplen + n
if ARGV[8] == '1' then
  -- The stored length is the truth: a summary may count the steps the spool dropped, no more.
  local claimed = tonumber(cjson.decode(ARGV[14]).num_steps)
  if claimed < len or claimed > len + prior_dropped + dropped then
    return refuse(-3, len, prior_dropped + dropped)
  end
end
local number = tonumber(prior.n)
local new_episode = number == nil
if new_episode then number = redis.call('LLEN', KEYS[8]) end
if eplen ~= tonumber(ARGV[12]) or number ~= tonumber(ARGV[17]) then
  return refuse(-5, last, 0, number, eplen)
end
if new_episode then redis.call('RPUSH', KEYS[8], ARGV[4] .. '|' .. ARGV[5]) end
if ARGV[18] ~= '' then redis.call('RPUSH', KEYS[4], ARGV[18]) end
redis.call('SET', KEYS[1], final)
local ninter = tonumber(ARGV[13])
local nbytes = tonumber(ARGV[15])
local entry = {task = ARGV[5], len = len, chunks = (tonumber(prior.chunks or 0) or 0) + 1, source = ARGV[6],
               eval = (ARGV[7] == '1'), ended = (ARGV[8] == '1'), success = (ARGV[9] == '1'),
               version = tonumber(ARGV[10]), updated_s = tonumber(ARGV[11]),
               first_s = tonumber(prior.first_s or ARGV[11]), dropped = prior_dropped + dropped, n = number,
               interventions = (tonumber(prior.interventions or 0) or 0) + ninter,
               redis_bytes = (tonumber(prior.redis_bytes or 0) or 0) + nbytes,
               blob_bytes = (tonumber(prior.blob_bytes or 0) or 0) + tonumber(ARGV[16])}
redis.call('HSET', KEYS[3], ARGV[4], cjson.encode(entry))
redis.call('HINCRBY', KEYS[6], 'steps', n)
redis.call('HINCRBY', KEYS[6], 'intervention_steps', ninter)
redis.call('HINCRBY', KEYS[6], 'chunks', 1)
redis.call('HINCRBY', KEYS[6], 'bytes', nbytes)
redis.call('HINCRBY', KEYS[6], 'blob_bytes', tonumber(ARGV[16]))
if dropped > 0 then
  redis.call('HINCRBY', KEYS[6], 'dropped_steps', dropped)
end
if ARGV[8] == '1' then
  redis.call('HINCRBY', KEYS[6], 'episodes', 1)
  if ARGV[9] == '1' then redis.call('HINCRBY', KEYS[6], 'successes', 1) end
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', '10000', '*', 'episode', ARGV[4], 'task', ARGV[5],
             'summary', ARGV[14], 'ts', ARGV[11], 'len', len)
end
return {1, final, 0, number, len}
"""

# KEYS: 1 episode list, 2 catalog, 3 evicted, 4 stats. ARGV: 1 episode id.
# Replies {redis bytes, blob bytes, steps} of the deleted episode, or {-1, 0, 0} if it is not stored.
DELETE_EPISODE_LUA = r"""
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return {-1, 0, 0} end
local ok, entry = pcall(cjson.decode, raw)
if not ok or type(entry) ~= 'table' then entry = {} end
local bytes = tonumber(entry.redis_bytes or 0) or 0
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'evicted_episodes', 1)
redis.call('HINCRBY', KEYS[4], 'evicted_bytes', bytes)
return {bytes, tonumber(entry.blob_bytes or 0) or 0, tonumber(entry.len or 0) or 0}
"""


def label_runs(labels: np.ndarray) -> np.ndarray:
    """``[k, 2]`` (start, end) of every run of True in ``labels`` (vectorised: no per-step Python). The changes
    of the zero-padded flags alternate start, end, start, ...: one comparison and one search (~2.5 us for 500
    steps with 100 runs, against ~10 us for a diff and a search per kind of change)."""
    padded = np.zeros(len(labels) + 2, np.int8)
    padded[1:-1] = labels
    return np.flatnonzero(padded[1:] != padded[:-1]).reshape(-1, 2)


@dataclass(frozen=True)
class ChunkWrite:
    """Everything the atomic write needs, already encoded: the element (its first_index set to
    ``first_index``) and its label runs ``[k, 2]`` relative to the chunk."""

    robot_id: str
    episode_id: str
    task: str
    first_seq: int
    n: int
    element: bytes
    runs: np.ndarray
    intervention_steps: int
    gap_declared: bool = False
    evaluation: bool = False
    episode_end: EpisodeSummary | None = None
    policy_version: int = 0
    source: str = SOURCE_ONLINE
    blob_bytes: int = 0
    first_index: int = 0
    number: int = 0
    """Where the episode stands as the writer believes (the script refuses the write if it does not)."""
    after: int | None = None
    """Store only if the robot's last stored seq is this (a batch's chunk after the first: the one before it)."""

    def keys_and_args(self, now_s: float) -> tuple[list[str], list]:
        k = RobotKeys(self.robot_id)
        end = self.episode_end
        summary = "" if end is None else json.dumps({
            "success": end.success, "num_steps": end.num_steps, "intervention_steps": end.intervention_steps,
            "interventions": end.interventions, "evaluation": end.evaluation, "policy_version": end.policy_version,
            "robot_id": self.robot_id, "task": self.task, "ts": now_s})
        keys = [k.seq, k.episode(self.episode_id), k.catalog, k.labeled, k.events, k.stats, k.registered,
                k.episode_ids]
        args = [self.first_seq, self.n, int(self.gap_declared), self.episode_id, self.task, self.source,
                int(self.evaluation), int(end is not None), int(bool(end and end.success)), self.policy_version,
                f"{now_s:.3f}", self.first_index, self.intervention_steps, summary, len(self.element),
                self.blob_bytes, self.number]
        runs = np.asarray(self.runs, np.int64).ravel()
        labeled = "|".join(map(str, [self.number, *(runs + self.first_index).tolist()])) if len(runs) else ""
        return keys, args + [labeled, "" if self.after is None else self.after]  # one labeled entry per chunk


@dataclass(frozen=True)
class ChunkToWrite:
    """One chunk of a batch for :meth:`BufferWriter.write_many` (what :meth:`BufferWriter.write` takes)."""

    episode_id: str
    task: str
    cols: Columns
    schema: Schema
    labels: np.ndarray
    gap_declared: bool = False
    evaluation: bool = False
    episode_end: EpisodeSummary | None = None


@dataclass(frozen=True)
class WriteResult:
    stored_steps: int
    duplicate_steps: int
    acked_seq: int


@dataclass(frozen=True)
class EvictedEpisode:
    """What deleting an episode freed; the caller deletes ``blob_keys`` from the blob store."""

    redis_bytes: int
    blob_bytes: int
    steps: int
    blob_keys: list[str]


class BufferWriter:
    """The gateway's writes over an asyncio Redis client; camera frames go to ``blobs`` (a
    ``cloud.blobstore.BlobStore``) when given, else inline in the Redis element."""

    def __init__(self, redis, blobs=None, codec: str = "zstd"):
        self._redis = redis
        self._blobs = blobs
        self._codec = codec
        self._episodes: dict[tuple[str, str], tuple[int, int]] = {}  # (robot, episode) -> (number, len)
        self._numbers: dict[str, int] = {}  # robot -> the number its next new episode gets
        self._delete = redis.register_script(DELETE_EPISODE_LUA)

    # --- registrations and robot state ----------------------------------------------------------------------------
    async def register(self, robot_id: str, record_json: str, registered_s: float) -> None:
        await self._redis.hset(ROBOTS_KEY, robot_id, record_json)
        await self._redis.set(RobotKeys(robot_id).registered, f"{registered_s:.3f}")

    async def registration(self, robot_id: str) -> bytes | None:
        """The robot's registration JSON, or None."""
        return await self._redis.hget(ROBOTS_KEY, robot_id)

    async def take_schema_change_allowance(self, robot_id: str) -> bool:
        """Whether an operator allowed a schema change (``fleet robots allow-schema-change``); uses it up."""
        return await self._redis.getdel(RobotKeys(robot_id).allow_schema_change) is not None

    async def last_seq(self, robot_id: str) -> int:
        return int(await self._redis.get(RobotKeys(robot_id).seq) or 0)

    async def set_status(self, robot_id: str, fields: dict) -> None:
        """The robot's last heartbeat / delivery state (``fleet status`` reads it)."""
        await self._redis.hset(RobotKeys(robot_id).status, mapping=fields)

    async def heartbeat(self, robot_id: str, fields: dict, thumbnail: bytes = b"") -> bytes | None:
        """One heartbeat in one round trip: the status fields, the thumbnail (if any, expiring), and the robot's
        entry in the operator assignments (raw JSON, or None: no operator)."""
        keys = RobotKeys(robot_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(keys.status, mapping=fields)
        if thumbnail:
            pipe.set(keys.thumb, thumbnail, ex=THUMBNAIL_TTL_S)
        pipe.hget(OPS_ASSIGNMENTS_KEY, robot_id)
        replies = await pipe.execute()
        return replies[-1]

    async def write(self, robot_id: str, episode_id: str, task: str, cols: Columns, schema: Schema, *, source: str,
                    labels: np.ndarray, gap_declared: bool, evaluation: bool, episode_end: EpisodeSummary | None,
                    now_s: float) -> WriteResult:
        """Store ``cols`` exactly once; returns once every frame object and the Redis write are durable."""
        skipped, stale, element = 0, 0, None
        episode = (robot_id, episode_id)
        while True:
            if element is None:
                blob_bytes = await self._put_frames(robot_id, episode_id, cols, schema)
                element = encode_element(cols, schema, self._codec, frames_inline=self._blobs is None)
            number, first_index = self._episodes.get(episode) or (self._numbers.get(robot_id, 0), 0)
            write = ChunkWrite(
                robot_id, episode_id, task, cols.first_seq, cols.n, set_first_index(element, first_index),
                label_runs(labels[skipped:]), int(np.count_nonzero(cols.intervention)), gap_declared, evaluation,
                episode_end, int(cols.policy_version[-1]), source, blob_bytes, first_index, number)
            keys, args = write.keys_and_args(now_s)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(keys[1], write.element)
                pipe.eval(WRITE_CHUNK_LUA, len(keys), *keys, *args)
                _, reply = await pipe.execute()
            status, acked, extra, number, length = (int(x) for x in reply)
            if status == 1:
                self._remember(robot_id, episode_id, number, length, episode_end is not None)
            if status == -5 and stale < 3:  # our idea of the episode was stale: the reply says how it stands
                self._episodes[episode] = (number, length)
                stale += 1
                continue
            if status != -4:
                return interpret(status, acked, extra, write, skipped)
            skipped += extra  # the stored part of an overlapping resend: store the rest as its own element
            cols, element = cols.tail(extra), None

    async def write_many(self, robot_id: str, chunks: list[ChunkToWrite], *, source: str,
                         now_s: float) -> tuple[list[WriteResult], Exception | None]:
        """Store consecutive chunks of one robot (one message's) exactly once, in one MULTI/EXEC: one Redis
        round trip instead of one per chunk. Each chunk after the first is stored only if the one before it
        was (the script's ``after`` check), so the batch stores a prefix; from the first chunk the batch did
        not store on, the chunks go one by one through :meth:`write` (retries, overlaps, precise errors).
        Returns the results of the chunks stored or acked (in order) and the error that stopped the rest, if
        any: the caller acks the ones before it."""
        writes, episodes, numbers, after = [], {}, {}, None
        for c in chunks:
            blob_bytes = await self._put_frames(robot_id, c.episode_id, c.cols, c.schema)
            element = encode_element(c.cols, c.schema, self._codec, frames_inline=self._blobs is None)
            episode = (robot_id, c.episode_id)
            number, first_index = episodes.get(episode) or self._episodes.get(episode) or (
                numbers.get(robot_id, self._numbers.get(robot_id, 0)), 0)
            writes.append(ChunkWrite(
                robot_id, c.episode_id, c.task, c.cols.first_seq, c.cols.n, set_first_index(element, first_index),
                label_runs(c.labels), int(np.count_nonzero(c.cols.intervention)), c.gap_declared, c.evaluation,
                c.episode_end, int(c.cols.policy_version[-1]), source, blob_bytes, first_index, number, after))
            # Where the episode stands once this chunk is stored: what the next chunk of the batch assumes.
            episodes[episode] = (number, first_index + c.cols.n)
            numbers[robot_id] = max(numbers.get(robot_id, 0), self._numbers.get(robot_id, 0), number + 1)
            after = c.cols.first_seq + c.cols.n - 1
        async with self._redis.pipeline(transaction=True) as pipe:
            for w in writes:
                keys, args = w.keys_and_args(now_s)
                pipe.rpush(keys[1], w.element)
                pipe.eval(WRITE_CHUNK_LUA, len(keys), *keys, *args)
            replies = (await pipe.execute())[1::2]
        results: list[WriteResult] = []
        for c, w, reply in zip(chunks, writes, replies):
            status, acked, extra, number, length = (int(x) for x in reply)
            if status != 1:
                break
            self._remember(robot_id, c.episode_id, number, length, c.episode_end is not None)
            results.append(interpret(status, acked, extra, w))
        for c in chunks[len(results):]:
            try:
                results.append(await self.write(
                    robot_id, c.episode_id, c.task, c.cols, c.schema, source=source, labels=c.labels,
                    gap_declared=c.gap_declared, evaluation=c.evaluation, episode_end=c.episode_end, now_s=now_s))
            except Exception as exc:  # the caller acks what was stored before it, then reports it
                return results, exc
        return results, None

    def _remember(self, robot_id: str, episode_id: str, number: int, length: int, ended: bool) -> None:
        """Where an episode stands after a write (the next chunk's first_index and runs follow from it)."""
        if len(self._episodes) > 100_000:  # a bound, not a policy: a forgotten episode costs one refused try
            self._episodes.clear()
        if ended:
            self._episodes.pop((robot_id, episode_id), None)
        else:
            self._episodes[(robot_id, episode_id)] = (number, length)
        if number + 1 > self._numbers.get(robot_id, 0):
            self._numbers[robot_id] = number + 1

    async def _schema(self, robot_id: str) -> Schema | None:
        return await _registered_schema(self._redis, robot_id)

    async def _put_frames(self, robot_id: str, episode_id: str, cols: Columns, schema: Schema) -> int:
        if self._blobs is None or not cameras(schema):
            return 0
        objects = {frames_key(robot_id, episode_id, cols.first_seq, name): pack_frames(cols.frames[name])
                   for name in cameras(schema)}
        await asyncio.gather(*(asyncio.to_thread(self._blobs.put, key, data) for key, data in objects.items()))
        return sum(len(d) for d in objects.values())

    async def delete_episode(self, robot_id: str, episode_id: str, schema: Schema | None = None) -> EvictedEpisode:
        """Remove one episode from Redis atomically (catalog entry, chunk list) and record the eviction
        (``evicted`` list: the index drops it). Its label runs stay (a few bytes each; the index ignores
        them). The caller deletes ``blob_keys`` (frame objects) from the blob store afterwards."""
        k = RobotKeys(robot_id)
        blob_keys = []
        if schema is None:
            schema = await self._schema(robot_id)
        if schema is not None and cameras(schema):
            from fleet.columns import decode_element

            for raw in await self._redis.lrange(k.episode(episode_id), 0, -1):
                try:
                    element = decode_element(raw, schema)
                except InvalidInput:
                    continue
                if element.frames_where == FRAMES_BLOB:
                    blob_keys += [frames_key(robot_id, episode_id, element.columns.first_seq, c)
                                  for c in cameras(schema)]
        redis_bytes, blob_bytes, steps = (int(x) for x in await self._delete(
            keys=[k.episode(episode_id), k.catalog, k.evicted, k.stats], args=[episode_id]))
        if redis_bytes < 0:
            return EvictedEpisode(0, 0, 0, [])
        return EvictedEpisode(redis_bytes, blob_bytes, steps, blob_keys)


async def _registered_schema(redis, robot_id: str) -> Schema | None:
    raw = await redis.hget(ROBOTS_KEY, robot_id)
    try:
        return schema_from_dict(json.loads(raw)["schema"]) if raw else None
    except (ValueError, KeyError, TypeError):
        return None


def write_operator_state(redis, assignments: dict[str, str], operators: dict[str, str], ttl_s: float = 0.0) -> None:
    """Replace the operator assignments (robot id -> JSON) and the operators (operator id -> JSON) with these,
    each hash in one MULTI (the gateway never reads a half-written one), expiring after ``ttl_s`` unless written
    again (0 = never). Synchronous: the operators service's client; only that service writes these keys."""
    for key, mapping in ((OPS_ASSIGNMENTS_KEY, assignments), (OPS_OPERATORS_KEY, operators)):
        pipe = redis.pipeline(transaction=True)
        pipe.delete(key)
        if mapping:
            pipe.hset(key, mapping=mapping)
            if ttl_s > 0:
                pipe.pexpire(key, int(ttl_s * 1000))
        pipe.execute()


def assignment_from_json(raw: bytes | str) -> OperatorAssignment:
    """An entry of ``fleet:ops:assignments`` (JSON {"operator", "since_s", "manual"}); ValueError if malformed."""
    entry = json.loads(raw)
    if not isinstance(entry, dict):
        raise ValueError(f"not a JSON object: {shown(str(raw))}")
    operator, since_s, manual = entry.get("operator"), entry.get("since_s", 0.0), entry.get("manual", False)
    if not isinstance(operator, str) or not is_id(operator):
        raise ValueError(f"operator {operator!r} is not an id")
    if isinstance(since_s, bool) or not isinstance(since_s, (int, float)) or not math.isfinite(since_s):
        raise ValueError(f"since_s {since_s!r} is not a finite number")
    if not isinstance(manual, bool):
        raise ValueError(f"manual {manual!r} is not a boolean")
    return OperatorAssignment(operator_id=operator, manual=manual, since_s=float(since_s))


def interpret(status: int, acked: int, extra: int, write: ChunkWrite, skipped: int = 0) -> WriteResult:
    """Turn the script's reply into a WriteResult, or raise SequenceGap / UnknownRobot / InvalidInput."""
    if status == -2:
        raise UnknownRobot(f"robot {write.robot_id!r} is not registered in the buffer (was Redis wiped?); "
                           f"call Register again")
    if status == -1:
        raise SequenceGap(
            f"robot {write.robot_id!r}: chunk starts at seq {write.first_seq} but the last stored seq is {acked}; "
            f"resend from seq {acked + 1} (or declare a spool drop with gap_declared)", last_acked_seq=acked)
    if status == -5:
        raise BackendUnavailable(f"robot {write.robot_id!r} episode {write.episode_id!r}: the episode changed "
                                 "under three writes in a row (other gateways writing it?); nothing was stored, "
                                 "resend", retry_after_s=1.0)
    if status == -3:
        claimed = write.episode_end.num_steps if write.episode_end else 0
        raise InvalidInput(f"robot {write.robot_id!r} episode {write.episode_id!r}: the episode_end claims "
                           f"{claimed} steps but {acked} are stored ({extra} declared dropped); nothing was stored")
    if status == 0:
        return WriteResult(stored_steps=0, duplicate_steps=write.n + skipped, acked_seq=acked)
    return WriteResult(stored_steps=write.n, duplicate_steps=skipped, acked_seq=acked)
