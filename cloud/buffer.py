"""The persistent experience buffer in Redis (AOF on): layout and the one atomic write.

Layout (every per-robot key carries the hash tag ``{r:<robot_id>}``, so that all
keys one write touches live in one Redis Cluster slot and the write stays a
single atomic Lua script; the same code runs on a single Redis):

==================================  ======  ===================================================
key                                 type    holds
==================================  ======  ===================================================
fleet:robots                        HASH    robot_id -> JSON registration (embodiment, schema, tasks)
fleet:{r:R}:seq                     STRING  last durable step sequence number of robot R
fleet:{r:R}:registered              STRING  time R last registered; chunks of a robot without it are
                                            refused (NOT_FOUND: Redis was wiped, register again)
fleet:{r:R}:ep:E                    LIST    the steps of episode E, in order (``fleet.v1.Step`` bytes)
fleet:{r:R}:catalog                 HASH    E -> JSON {task, len, source, eval, ended, success, version,
                                            n (E's number), dropped (steps the spool declared dropped)}
fleet:{r:R}:episode_ids             LIST    entry n: "E|task" of the robot's n-th episode (id and task
                                            stored once per episode; E cannot contain "|")
fleet:{r:R}:labeled                 LIST    "n|index" for every step usable as a supervised label
                                            (operator-driven steps and offline demonstrations);
                                            append-only, so samplers mirror it incrementally (buffers
                                            written before episode numbers hold "E|index|task")
fleet:{r:R}:events                  STREAM  one entry per finished episode (capped)
fleet:{r:R}:stats                   HASH    counters: steps, intervention_steps, episodes, successes...
fleet:{r:R}:status                  HASH    last heartbeat (policy version, spool backlog, ...)
fleet:policy:latest                 STRING  newest published policy version (see cloud/policy_store.py)
fleet:policy:{E}:latest             STRING  the same for the policy line of embodiment E (``--embodiment``)
==================================  ======  ===================================================

Exactly-once: a chunk carries steps with contiguous sequence numbers. The script
compares them with ``fleet:{r:R}:seq``: steps at or below it are duplicates (acked,
not stored again), a chunk starting after ``seq + 1`` is a gap (refused unless the
edge declares that its spool dropped those steps), the rest is appended and
``seq`` advanced in the same atomic step. State lives in Redis only, so this holds
across gateway restarts and any number of gateway replicas.

A robot without its ``registered`` key (Redis was wiped or restored without it) gets
NOT_FOUND, registers again and declares the gap. A chunk refused at ``maxmemory``
left nothing behind: Redis checks memory before a script's first write.

Durability, i.e. what an ack means: the gateway acks a chunk only after this script
returned, and Redis replies only after the write is in its append-only file buffer.

* ``appendfsync always``: Redis write()s *and* fsyncs the AOF before it replies. An
  acked step survives a crash or SIGKILL of Redis or of the gateway, and a power loss
  or kernel crash of the Redis machine.
* ``appendfsync everysec`` (the default of ``fleet.redis_server.start_redis``): Redis
  write()s the AOF to the kernel before it replies and fsyncs once a second in the
  background. An acked step survives a crash or SIGKILL of the Redis process (the
  kernel holds the bytes and writes them out), but a power loss or kernel crash loses
  up to ~1 s of acked steps. One exception even for a process crash: when the disk
  is so slow that a background fsync is still running, Redis postpones its write()
  for up to 2 s while still replying ("Asynchronous AOF fsync is taking too long" in
  its log); a SIGKILL in that window loses those acked steps.
* Lost acked steps are gone for good (the edge deleted them from its spool on the
  ack): the robot's next chunk meets a sequence gap, which the edge then declares, and
  the gateway counts them in ``stats.dropped_steps``.

Configure it where Redis starts: ``start_redis(appendfsync=...)``, ``fleet demo
--redis_appendfsync always``, or ``appendfsync always`` in an external Redis's
redis.conf (``CONFIG SET appendfsync always`` at runtime). ``always`` costs one
fsync per write; docs/experience-path.md has numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fleet.errors import InvalidInput, SequenceGap, UnknownRobot
from fleet.types import EpisodeSummary

ROBOTS_KEY = "fleet:robots"
POLICY_LATEST_KEY = "fleet:policy:latest"
POLICY_CHANNEL = "fleet:policy:published"
POLICY_COUNTER_KEY = "fleet:policy:counter"


@dataclass(frozen=True)
class PolicyKeys:
    """Redis keys of one policy line: the shared one, or one embodiment's (one trainer each)."""

    latest: str
    channel: str
    counter: str


def policy_keys(embodiment: str = "") -> PolicyKeys:
    """Keys of the policy line of ``embodiment`` ("" = the shared line every robot follows by default)."""
    if not embodiment:
        return PolicyKeys(POLICY_LATEST_KEY, POLICY_CHANNEL, POLICY_COUNTER_KEY)
    prefix = f"fleet:policy:{{{embodiment}}}"
    return PolicyKeys(f"{prefix}:latest", f"{prefix}:published", f"{prefix}:counter")
EVENTS_MAXLEN = 10000
SOURCE_ONLINE = "online"
SOURCE_OFFLINE = "offline"


def robot_prefix(robot_id: str) -> str:
    return f"fleet:{{r:{robot_id}}}"


@dataclass(frozen=True)
class RobotKeys:
    robot_id: str

    @property
    def prefix(self) -> str:
        return robot_prefix(self.robot_id)

    @property
    def seq(self) -> str:
        return f"{self.prefix}:seq"

    @property
    def registered(self) -> str:
        return f"{self.prefix}:registered"

    def episode(self, episode_id: str) -> str:
        return f"{self.prefix}:ep:{episode_id}"

    @property
    def allow_schema_change(self) -> str:
        """Set by an operator (``fleet robots allow-schema-change``); the next Register with a new schema takes it."""
        return f"{self.prefix}:allow_schema_change"

    @property
    def catalog(self) -> str:
        return f"{self.prefix}:catalog"

    @property
    def episode_ids(self) -> str:
        """List: entry n is "<episode id>|<task>" of the robot's n-th episode (labeled entries name n)."""
        return f"{self.prefix}:episode_ids"

    @property
    def labeled(self) -> str:
        return f"{self.prefix}:labeled"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"

    @property
    def status(self) -> str:
        return f"{self.prefix}:status"


# KEYS: 1 seq, 2 episode list, 3 catalog, 4 labeled, 5 events, 6 stats, 7 registered, 8 episode_ids
# ARGV: 1 first_seq, 2 n, 3 gap_declared, 4 episode_id, 5 task, 6 source, 7 evaluation,
#       8 ends_episode, 9 success, 10 policy_version, 11 now_s, 12 label flags ("0"/"1" per step),
#       13 intervention flags, 14 episode summary JSON (or ""), 15 payload bytes, 16.. step blobs
WRITE_CHUNK_LUA = r"""
if redis.call('EXISTS', KEYS[7]) == 0 then
  return {-2, 0, 0}
end
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local first = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local final = first + n - 1
if final <= last then
  return {0, last, n}
end
if first > last + 1 and ARGV[3] ~= '1' then
  return {-1, last, 0}
end
local skip = 0
if first <= last then skip = last - first + 1 end
local dropped = 0
if ARGV[3] == '1' and first > last + 1 then dropped = first - last - 1 end
local before = redis.call('HGET', KEYS[3], ARGV[4])
local prior = {}
if before then
  local ok, decoded = pcall(cjson.decode, before)
  if ok and type(decoded) == 'table' then prior = decoded end
end
local prior_dropped = tonumber(prior.dropped or 0) or 0
if ARGV[8] == '1' then
  -- The stored length is the truth: a summary may count the steps the spool dropped, no more.
  local stored = redis.call('LLEN', KEYS[2]) + n - skip
  local claimed = tonumber(cjson.decode(ARGV[14]).num_steps)
  if claimed < stored or claimed > stored + prior_dropped + dropped then
    return {-3, stored, prior_dropped + dropped}
  end
end
-- The episode's number: its id and task are stored once, in the episode_ids list ("<id>|<task>");
-- each labeled step is then "<number>|<position>" (a few bytes, whatever the id and task).
local number = tonumber(prior.n)
if number == nil then number = redis.call('RPUSH', KEYS[8], ARGV[4] .. '|' .. ARGV[5]) - 1 end
local blobs = {}
local ninter = 0
local eplen = redis.call('LLEN', KEYS[2])
local labeled = {}
for i = skip + 1, n do
  blobs[#blobs + 1] = ARGV[15 + i]
  if string.sub(ARGV[13], i, i) == '1' then ninter = ninter + 1 end
  if string.sub(ARGV[12], i, i) == '1' then
    labeled[#labeled + 1] = tostring(number) .. '|' .. tostring(eplen + #blobs - 1)
  end
end
local len = redis.call('RPUSH', KEYS[2], unpack(blobs))
if #labeled > 0 then redis.call('RPUSH', KEYS[4], unpack(labeled)) end
redis.call('SET', KEYS[1], final)
local entry = {task = ARGV[5], len = len, source = ARGV[6], eval = (ARGV[7] == '1'),
               ended = (ARGV[8] == '1'), success = (ARGV[9] == '1'), version = tonumber(ARGV[10]),
               updated_s = tonumber(ARGV[11]), dropped = prior_dropped + dropped, n = number}
redis.call('HSET', KEYS[3], ARGV[4], cjson.encode(entry))
redis.call('HINCRBY', KEYS[6], 'steps', n - skip)
redis.call('HINCRBY', KEYS[6], 'intervention_steps', ninter)
redis.call('HINCRBY', KEYS[6], 'chunks', 1)
redis.call('HINCRBY', KEYS[6], 'bytes', tonumber(ARGV[15]))
if ARGV[3] == '1' and first > last + 1 then
  redis.call('HINCRBY', KEYS[6], 'dropped_steps', first - last - 1)
end
if ARGV[8] == '1' then
  redis.call('HINCRBY', KEYS[6], 'episodes', 1)
  if ARGV[9] == '1' then redis.call('HINCRBY', KEYS[6], 'successes', 1) end
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', '10000', '*', 'episode', ARGV[4], 'task', ARGV[5],
             'summary', ARGV[14], 'ts', ARGV[11], 'len', len)
end
return {1, final, skip}
"""


@dataclass(frozen=True)
class ChunkWrite:
    """Everything the atomic write needs, already encoded."""

    robot_id: str
    episode_id: str
    task: str
    first_seq: int
    step_blobs: list[bytes]
    interventions: list[bool]
    labels: list[bool]
    gap_declared: bool = False
    evaluation: bool = False
    episode_end: EpisodeSummary | None = None
    policy_version: int = 0
    source: str = SOURCE_ONLINE

    def keys_and_args(self, now_s: float) -> tuple[list[str], list]:
        k = RobotKeys(self.robot_id)
        end = self.episode_end
        summary = "" if end is None else json.dumps({
            "success": end.success, "num_steps": end.num_steps, "intervention_steps": end.intervention_steps,
            "interventions": end.interventions, "evaluation": end.evaluation, "policy_version": end.policy_version,
            "robot_id": self.robot_id, "task": self.task, "ts": now_s})
        keys = [k.seq, k.episode(self.episode_id), k.catalog, k.labeled, k.events, k.stats, k.registered,
                k.episode_ids]
        args = [
            self.first_seq, len(self.step_blobs), int(self.gap_declared), self.episode_id, self.task, self.source,
            int(self.evaluation), int(end is not None), int(bool(end and end.success)), self.policy_version,
            f"{now_s:.3f}", "".join("1" if x else "0" for x in self.labels),
            "".join("1" if x else "0" for x in self.interventions), summary,
            sum(len(b) for b in self.step_blobs), *self.step_blobs,
        ]
        return keys, args


@dataclass(frozen=True)
class WriteResult:
    stored_steps: int
    duplicate_steps: int
    acked_seq: int


def interpret(result: list, write: ChunkWrite) -> WriteResult:
    """Turn the script's reply into a WriteResult or a SequenceGap."""
    status, acked, extra = (int(x) for x in result)
    n = len(write.step_blobs)
    if status == -2:
        raise UnknownRobot(f"robot {write.robot_id!r} is not registered in the buffer (was Redis wiped?); "
                           f"call Register again")
    if status == -1:
        raise SequenceGap(
            f"robot {write.robot_id!r}: chunk starts at seq {write.first_seq} but the last stored seq is {acked}; "
            f"resend from seq {acked + 1} (or declare a spool drop with gap_declared)", last_acked_seq=acked)
    if status == -3:
        claimed = write.episode_end.num_steps if write.episode_end else 0
        raise InvalidInput(f"robot {write.robot_id!r} episode {write.episode_id!r}: the episode_end claims "
                           f"{claimed} steps but {acked} are stored ({extra} declared dropped); nothing was stored")
    if status == 0:
        return WriteResult(stored_steps=0, duplicate_steps=n, acked_seq=acked)
    return WriteResult(stored_steps=n - extra, duplicate_steps=extra, acked_seq=acked)
