"""The persistent experience buffer in Redis (AOF on) and the blob store: its key layout, in one place.

This module is the only place that builds Redis keys or blob keys; :mod:`cloud.buffer.writer`
(the gateway side) and :mod:`cloud.buffer.reader` (sampler, status, export, metrics, retention)
use it.

Every per-robot key carries the hash tag ``{r:<robot_id>}``, so that all keys one write touches
live in one Redis Cluster slot and the write stays a single atomic Lua script; the same code runs
on a single Redis.

==================================  ======  ===================================================
key                                 type    holds
==================================  ======  ===================================================
fleet:robots                        HASH    robot_id -> JSON registration (embodiment, schema, tasks)
fleet:{r:R}:seq                     STRING  last durable step sequence number of robot R
fleet:{r:R}:registered              STRING  time R last registered; chunks of a robot without it are
                                            refused (NOT_FOUND: Redis was wiped, register again)
fleet:{r:R}:ep:E                    LIST    episode E, ONE element per chunk (the element format below)
fleet:{r:R}:catalog                 HASH    E -> JSON {task, len, chunks, source, eval, ended, success,
                                            version, n (E's number), dropped, interventions (steps),
                                            redis_bytes, blob_bytes, first_s, updated_s}
fleet:{r:R}:episode_ids             LIST    entry n: "E|task" of the robot's n-th episode (id and task
                                            stored once per episode; E cannot contain "|")
fleet:{r:R}:labeled                 LIST    label runs "n|start|end[|start|end...]", one entry per chunk:
                                            steps [start, end) of episode n
                                            are supervised labels (an operator drove them, or they are
                                            offline demonstrations); append-only, so samplers mirror it
                                            incrementally; consecutive runs of one episode join up
fleet:{r:R}:evicted                 LIST    "E" per episode deleted by retention (append-only; the index
                                            drops it and ignores its label runs)
fleet:{r:R}:events                  STREAM  one entry per finished episode (capped)
fleet:{r:R}:stats                   HASH    counters: steps, intervention_steps, episodes, successes,
                                            chunks, bytes (Redis element bytes), blob_bytes...
fleet:{r:R}:status                  HASH    last heartbeat (policy version, spool backlog, ...) and the
                                            robot's help signal: help_score, help_uncertainty, help_stall,
                                            help_risk (floats), help_wanted, holding, intervening ("1"/"0"),
                                            wanted_for_s (float), operator (the operator id the edge acts on)
fleet:{r:R}:thumb                   STRING  last JPEG thumbnail of R's first camera, from its heartbeat (EX 60 s)
fleet:ops:assignments               HASH    robot_id -> JSON {"operator": str, "since_s": float, "manual": bool},
                                            written only by the operators service; no entry = no operator
fleet:retention:lease               STRING  id of the gateway running retention passes (expires; cloud/retention.py)
fleet:policy:latest                 STRING  newest published policy version (see cloud/policy_store.py)
fleet:policy:{E}:latest             STRING  the same for the policy line of embodiment E (``--embodiment``)
==================================  ======  ===================================================

Blob store (``cloud/blobstore.py``): camera frames, one object per (chunk, camera) at
:func:`frames_key` ``frames/<R>/<E>/<first seq, 20 digits>/<camera>``, holding the chunk's ``n``
encoded frames in the frames container of :mod:`fleet.columns` (``u32 n``, ``n`` x ``u32`` end
offsets, the frame bytes). Without a blob store (``--blob_url`` empty) the frames ride inline in
the Redis element instead (small demos, tests).

The chunk element (:func:`fleet.columns.encode_element`), little-endian::

    u32  first_index   step index of the chunk's first step in its episode (set by the Lua write)
    3s   magic "FC3" (with the help score column), "FC2" (without: chunks of edges that predate it)
    u8   codec         0 raw, 1 zstd, 2 lz4: the body is compressed only when that saves >= 10 %
    u8   frames        0 no cameras, 1 inline (after the body), 2 in the blob store (frames_key)
    u32  n             steps in the chunk
    u64  first_seq     sequence number of its first step
    u32  raw_len       body bytes before compression
    u32  body_len      then the body: the columns back to back, each [n, *shape] of the registered
                       dtype, in schema order: low-dim observation features, action, policy action,
                       reward f32, timestamp f64, policy version u64, help score f32 (FC3 only), then
                       3 bit planes of ceil(n/8) bytes (intervention, success, done)
    per camera (frames = 1 only), in schema order: u8 len + encoding, u32 len + frames container

No dtype or shape is stored: they are the robot's registration's, so a low-dim step costs its raw
array bytes plus 24 (reward, timestamp, version, help score) plus the ~30-byte header and Redis's per-element
overhead amortised over the chunk.

Exactly-once: a chunk carries steps with contiguous sequence numbers. The script
compares them with ``fleet:{r:R}:seq``: a chunk at or below it is a duplicate (acked,
not stored again), a chunk starting after ``seq + 1`` is a gap (refused unless the
edge declares that its spool dropped those steps), a chunk that overlaps it is answered
"resend the tail" and the writer sends the steps after ``seq`` again as one element;
the rest is appended and ``seq`` advanced in the same atomic step. State lives in Redis
only, so this holds across gateway restarts and any number of gateway replicas.

A robot without its ``registered`` key (Redis was wiped or restored without it) gets
NOT_FOUND, registers again and declares the gap. A chunk refused at ``maxmemory``
left nothing behind: Redis checks memory before a script's first write.

Durability, i.e. what an ack means: the gateway acks a chunk only after its camera frames'
blob puts returned (a local directory fsyncs the file and the directory; S3 answered) and
then this script returned; Redis replies only after the write is in its append-only file
buffer. A frame object without its Redis element (the gateway died between the two) is an
orphan, harmless and overwritten by the resend.

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

from dataclasses import dataclass

ROBOTS_KEY = "fleet:robots"
RETENTION_LEASE_KEY = "fleet:retention:lease"
POLICY_LATEST_KEY = "fleet:policy:latest"
POLICY_CHANNEL = "fleet:policy:published"
POLICY_COUNTER_KEY = "fleet:policy:counter"
OPS_ASSIGNMENTS_KEY = "fleet:ops:assignments"
"""HASH robot_id -> JSON {"operator", "since_s", "manual"}: who operates which robot (docs/operators.md)."""
THUMBNAIL_TTL_S = 60


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
    def evicted(self) -> str:
        """List: "<episode id>" of every episode retention deleted (append-only)."""
        return f"{self.prefix}:evicted"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"

    @property
    def status(self) -> str:
        return f"{self.prefix}:status"

    @property
    def thumb(self) -> str:
        """STRING: the last JPEG thumbnail the robot's heartbeat carried (expires after THUMBNAIL_TTL_S)."""
        return f"{self.prefix}:thumb"




def frames_key(robot_id: str, episode_id: str, first_seq: int, camera: str) -> str:
    """Blob key of one chunk's frames of one camera."""
    return f"{frames_prefix(robot_id, episode_id)}{first_seq:020d}/{camera}"


def frames_prefix(robot_id: str, episode_id: str) -> str:
    """Blob key prefix of every frame object of one episode."""
    return f"frames/{robot_id}/{episode_id}/"


OPS_OPERATORS_KEY = "fleet:ops:operators"
"""HASH operator_id -> JSON {"kind": "sim"|"human", "since_s"}: the operators the service shares (docs/operators.md)."""
