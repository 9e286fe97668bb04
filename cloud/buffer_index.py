"""What the buffer holds that an algorithm trains on, mirrored incrementally from Redis.

Each refresh reads only the new entries of every robot's append-only ``labeled``
list and episode-end ``events`` stream (plus, once per robot, its catalog, in
case the capped stream lost old entries). What is usable is chosen by the
algorithm's :class:`DataSpec`: operator-labelled steps (HG-DAgger), the robot's
own successful episodes, every finished episode (RECAP), offline demos.
Usable steps are kept as runs (:class:`Segment`) in per-(task, source) pools (``cloud/pools.py``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from cloud.buffer import SOURCE_OFFLINE, SOURCE_ONLINE
from cloud.buffer.reader import BufferReader, parse_label_runs
from cloud.pools import Pool, PoolSet, Segment
from fleet import metrics
from fleet.convert import schema_from_dict
from fleet.types import Schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSpec:
    """Which stored steps an algorithm trains on (declared by the algorithm)."""

    interventions: bool = True
    """Online steps the operator drove (targets: the operator's actions, while it drove)."""
    successes: bool = False
    """Every step of the robots' own successful autonomous episodes (no step operator-driven: an episode the
    operator rescued holds the policy's mistakes before the takeover, and its operator steps are labels anyway)."""
    episodes: bool = False
    """Every step of every finished online episode, with its outcome (RECAP)."""
    offline: bool = True
    """Offline demonstrations."""
    lookahead_steps: int = 0
    """Also return the observation ``lookahead_steps`` after t (``next/<name>``, ``has_next``)."""


@dataclass
class Position:
    robot_id: str
    episode_id: str
    index: int


@dataclass
class BufferIndex:
    """Local mirror of what the buffer holds that ``spec`` trains on, by (task, source)."""

    spec: DataSpec = field(default_factory=DataSpec)
    pools: dict[tuple[str, str], Pool] = field(default_factory=lambda: defaultdict(Pool))
    robots: dict[str, dict] = field(default_factory=dict)
    online_steps: int = 0
    """Steps the online robots have stored (the rate limiter's inserts)."""
    task_max_len: dict[str, int] = field(default_factory=dict)
    """Longest finished episode seen per task (RECAP's return normalisation)."""
    embodiment: str = ""
    """Only robots registered with this embodiment ("" = all robots that share the first one's schema)."""
    known_tasks: tuple[str, ...] = ()
    """The tasks the trainer's policy knows (records of other tasks are skipped; () = any)."""
    quiet: bool = False
    """Skip without counting in the metric or logging (a throw-away index: the sampler's counts)."""
    skipped: Counter = field(default_factory=Counter)
    """Unusable records skipped so far, by reason (also ``fleet_trainer_skipped_records_total``)."""
    _skipped: set[str] = field(default_factory=set)
    _warned: set[tuple[str, str]] = field(default_factory=set)
    _quarantined: set[tuple[str, str]] = field(default_factory=set)
    _bad_registrations: dict[str, bytes] = field(default_factory=dict)
    _episode_names: dict[str, list[tuple[str | None, str | None]]] = field(default_factory=dict)
    """Per robot, entry n of its episode_ids list: (episode id, task), (None, None) if unreadable."""
    _schema: dict | None = None
    finished: dict[tuple[str, str], int] = field(default_factory=dict)
    """Length of every finished episode, by (robot_id, episode_id)."""
    _seen_labeled: dict[str, int] = field(default_factory=dict)
    _seen_evicted: dict[str, int] = field(default_factory=dict)
    _evicted: set[tuple[str, str]] = field(default_factory=set)
    evicted_episodes: int = 0
    """Episodes retention deleted that this index dropped (also ``fleet_trainer_evicted_episodes_total``)."""
    evicted_steps: int = 0
    """Usable steps those episodes held."""
    _last_event: dict[str, bytes] = field(default_factory=dict)
    _episodes: set[tuple[str, str]] = field(default_factory=set)
    episode_keys: list[tuple[str, str]] = field(default_factory=list)
    """(robot_id, episode_id) of each episode number (``Segment.number``), in order of first sight."""
    _numbers: dict[tuple[str, str], int] = field(default_factory=dict)
    _finished_len: np.ndarray = field(default_factory=lambda: np.zeros(64, np.int64))
    """``finished`` by episode number (0: not finished)."""
    _pool_set: PoolSet | None = None

    def number(self, rid: str, eid: str) -> int:
        """The episode's number (assigned on first sight, never reused)."""
        key = (rid, eid)
        no = self._numbers.get(key)
        if no is None:
            no = self._numbers[key] = len(self.episode_keys)
            self.episode_keys.append(key)
            if no >= len(self._finished_len):
                self._finished_len = np.concatenate([self._finished_len, np.zeros_like(self._finished_len)])
        return no

    def pool_set(self) -> PoolSet:
        """Every pool with steps as one set of arrays (rebuilt when a pool changed)."""
        signature = tuple((key, pool.version) for key, pool in self.pools.items())
        if self._pool_set is None or self._pool_set.signature != signature:
            self._pool_set = PoolSet(self.pools, signature)
        return self._pool_set

    def finished_lengths(self, numbers: np.ndarray) -> np.ndarray:
        """``finished`` of each episode number (0: not finished)."""
        return self._finished_len[numbers]

    def refresh(self, redis) -> int:
        """Pull new entries; returns how many usable steps were added. A record that cannot be used is
        skipped and counted (``skipped``, ``fleet_trainer_skipped_records_total{reason}``), never raised."""
        for rid, reg in sorted(self._registrations(redis).items(), key=lambda kv: kv[1]["registered_s"]):
            if rid in self._skipped:
                continue
            if self.embodiment and reg["embodiment"] != self.embodiment:
                self._skipped.add(rid)  # another embodiment's trainer learns from it
                continue
            if self._schema is None:
                self._schema = reg["schema"]
            if rid not in self.robots and reg["schema"] != self._schema:
                self._skipped.add(rid)
                self._skip(rid, "other_schema", f"another schema than the first robot's (embodiment "
                           f"{reg['embodiment']!r}): not training on it; run a trainer per embodiment (--embodiment)")
                continue
            self.robots[rid] = reg
        order = list(self.robots)
        new = [rid for rid in order if rid not in self._last_event]
        pipe = redis.pipeline(transaction=False)
        reader = BufferReader(redis)
        for rid in order:
            reader.queue_index_reads(pipe, rid, self._seen_labeled.get(rid, 0), len(self._episode_names.get(rid, ())),
                                     self._last_event.get(rid), self._seen_evicted.get(rid, 0))
        for rid in new:  # first sight: the catalog too, in case the capped stream lost old episodes
            reader.queue_catalog(pipe, rid)
        replies = pipe.execute()
        catalogs = dict(zip(new, replies[5 * len(order):]))
        added, online_steps = 0, 0
        for i, rid in enumerate(order):
            labeled, names, events, steps, evicted = replies[5 * i:5 * i + 5]
            reg = self.robots[rid]
            source = reg["source"]
            self._seen_labeled[rid] = self._seen_labeled.get(rid, 0) + len(labeled)
            self._episode_names.setdefault(rid, []).extend(map(_episode_name, names))
            if events:
                self._last_event[rid] = events[-1][0]
            self._last_event.setdefault(rid, b"0-0")
            if source == SOURCE_ONLINE:
                online_steps += _int(steps)
            ended = [e for e in (*self._catalog_entries(rid, catalogs.get(rid)), *map(self._event_entry,
                                                                                   [rid] * len(events), events)) if e]
            if reg["schema"] != self._schema:  # registered again with another schema: its new records do not fit
                self._skip(rid, "schema_changed", "registered again with another schema; its new records are "
                           "skipped until it registers with the trainer's schema again", len(labeled) + len(ended))
                continue
            self._seen_evicted[rid] = self._seen_evicted.get(rid, 0) + len(evicted)
            self._evict(rid, evicted)
            added += self._add_labeled(rid, source, labeled)
            added += sum(self._add_episode(rid, source, *e) for e in ended)
        self.online_steps = online_steps
        return added

    # --- reading records that robots wrote: every one may be unusable ------------------------------------------

    def _skip(self, rid: str, reason: str, detail: str, n: int = 1) -> None:
        """Count ``n`` unusable records; warn once per (robot, reason)."""
        if n <= 0:
            return
        assert reason in metrics.SKIPPED_RECORD_REASONS, reason
        self.skipped[reason] += n
        if self.quiet:
            return
        metrics.TRAINER_SKIPPED_RECORDS.labels(reason=reason).inc(n)
        if (rid, reason) not in self._warned:
            self._warned.add((rid, reason))
            log.warning("robot %s: skipping records (%s): %s (further ones are counted in "
                        "fleet_trainer_skipped_records_total{reason=%r})", rid, reason, detail, reason)

    def _registrations(self, redis) -> dict[str, dict]:
        """The registry, each entry checked: schema parsable, the fields the index reads of the right types."""
        out = {}
        for key, raw in BufferReader(redis).registrations_raw().items():
            rid = key.decode(errors="replace") if isinstance(key, bytes) else key
            try:
                reg = json.loads(raw)
                schema_from_dict(reg["schema"])
                reg["registered_s"] = float(reg.get("registered_s", 0.0))
                reg["embodiment"] = str(reg.get("embodiment", ""))
                reg["source"] = reg.get("source", SOURCE_ONLINE)
                if reg["source"] not in (SOURCE_ONLINE, SOURCE_OFFLINE):
                    raise ValueError(f"source {reg['source']!r}")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                if self._bad_registrations.get(rid) != raw:  # counted once per bad value, not per refresh
                    self._bad_registrations[rid] = raw
                    self._skip(rid, "corrupt_registration", f"its registration cannot be read ({exc!r})")
                continue
            self._bad_registrations.pop(rid, None)
            out[rid] = reg
        return out

    def _catalog_entries(self, rid: str, catalog) -> list[tuple]:
        out = []
        for eid, raw in (catalog or {}).items():
            try:
                entry = json.loads(raw)
                if entry.get("ended"):
                    out.append((eid.decode(), str(entry["task"]), int(entry["len"]), bool(entry["success"]),
                                bool(entry["eval"]), int(entry.get("interventions") or 0)))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self._skip(rid, "corrupt_catalog", f"catalog entry {eid!r} cannot be read ({exc!r})")
        return out

    def _event_entry(self, rid: str, event) -> tuple | None:
        entry_id, fields = event
        try:
            summary = json.loads(fields.get(b"summary") or b"{}")
            length = fields.get(b"len") or summary.get("num_steps", 0)  # the stored length (older events: claimed)
            return (fields[b"episode"].decode(), fields[b"task"].decode(), int(length),
                    bool(summary.get("success")), bool(summary.get("evaluation")),
                    int(summary.get("intervention_steps") or 0))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._skip(rid, "corrupt_event", f"episode event {entry_id!r} cannot be read ({exc!r})")
            return None

    def _known_task(self, rid: str, task: str, n: int) -> bool:
        if not self.known_tasks or task in self.known_tasks:
            return True
        self._skip(rid, "unknown_task", f"task {task[:64]!r} is not one this trainer's policy knows", n)
        return False

    def _add_labeled(self, rid: str, source: str, entries: list[bytes]) -> int:
        use = self.spec.offline and not self.spec.episodes if source == SOURCE_OFFLINE else self.spec.interventions
        if not use:
            return 0
        added, names = 0, self._episode_names.get(rid, [])
        for raw in entries:
            try:  # "<episode number>|<start>|<end>[|<start>|<end>...]": steps [start, end) of that episode
                number, runs = parse_label_runs(raw)
                eid, task = names[number] if 0 <= number < len(names) else (None, None)
                if eid is None:
                    raise ValueError(f"episode number {number} is not in episode_ids")
            except (ValueError, AttributeError) as exc:
                self._skip(rid, "corrupt_labeled", f"labeled entry {raw[:80]!r} cannot be read ({exc!r})")
                continue
            steps = sum(end - start for start, end in runs)
            if ((rid, eid) in self._quarantined or (rid, eid) in self._evicted
                    or not self._known_task(rid, task, steps)):
                continue
            pool, number = self.pools[(task, source)], self.number(rid, eid)
            for start, end in runs:
                pool.add(Segment(rid, eid, start, end - start, labels_all=source == SOURCE_OFFLINE, number=number))
            added += steps
        return added

    def _evict(self, rid: str, evicted: list[bytes]) -> None:
        """Drop episodes retention deleted: never sampled again, counted."""
        for raw in evicted:
            eid = raw.decode(errors="replace")
            if (rid, eid) in self._evicted:
                continue
            self._evicted.add((rid, eid))
            self.finished.pop((rid, eid), None)
            no = self.number(rid, eid)  # first: it may grow _finished_len (a[f()] = x reads a before f())
            self._finished_len[no] = 0
            dropped = sum(pool.drop_episode(rid, eid) for pool in self.pools.values())
            self.evicted_episodes += 1
            self.evicted_steps += dropped
            if not self.quiet:
                metrics.TRAINER_EVICTED_EPISODES.inc()

    def _add_episode(self, rid: str, source: str, eid: str, task: str, length: int, success: bool,
                     evaluation: bool, intervention_steps: int) -> int:
        if (rid, eid) in self._episodes or length <= 0 or (rid, eid) in self._quarantined or (rid, eid) in self._evicted:
            return 0
        self._episodes.add((rid, eid))  # (catalog and event name the same episode: counted once)
        if not self._known_task(rid, task, length):
            return 0
        self.finished[(rid, eid)] = length
        no = self.number(rid, eid)  # first: it may grow _finished_len (a[f()] = x reads a before f())
        self._finished_len[no] = length
        self.task_max_len[task] = max(self.task_max_len.get(task, 0), length)
        if evaluation:  # evaluation episodes measure the policy; they do not train it
            return 0
        if source == SOURCE_OFFLINE:
            use = self.spec.offline and self.spec.episodes
        else:
            use = self.spec.episodes or (self.spec.successes and success and intervention_steps == 0)
        if not use:
            return 0
        self.pools[(task, source)].add(Segment(rid, eid, 0, length, labels_all=True, episode_len=length,
                                               success=success, number=self.number(rid, eid)))
        return length

    def quarantine(self, rid: str, eid: str, reason: str, detail: str) -> None:
        """Stop sampling one stored episode (its steps cannot be decoded or do not fit the schema)."""
        if (rid, eid) in self._quarantined:
            return
        self._quarantined.add((rid, eid))
        dropped = sum(pool.drop_episode(rid, eid) for pool in self.pools.values())
        self._skip(rid, reason, f"episode {eid!r}: {detail}; not sampled any more ({dropped} steps)")

    def count(self, source: str | None = None) -> int:
        return sum(len(p) for (t, s), p in self.pools.items() if source is None or s == source)

    def tasks(self) -> list[str]:
        return sorted({t for (t, _), p in self.pools.items() if len(p)})

    @property
    def positions(self) -> dict[tuple[str, str], list[Position]]:
        """Every usable step as a Position, by (task, source) (for statistics; not for sampling)."""
        return {key: [Position(s.robot_id, s.episode_id, s.start + k) for s in pool.segments for k in range(s.length)]
                for key, pool in self.pools.items()}

    def schema(self) -> Schema | None:
        return None if self._schema is None else schema_from_dict(self._schema)


def _episode_name(raw: bytes) -> tuple[str | None, str | None]:
    """An episode_ids entry "<episode id>|<task>" (ids cannot contain "|"); (None, None) if unreadable."""
    try:
        eid, sep, task = raw.decode().partition("|")
    except UnicodeDecodeError:
        return None, None
    return (eid, task) if sep and eid else (None, None)


def _int(value) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


LabeledIndex = BufferIndex
"""The index's name before it held more than labeled steps."""
