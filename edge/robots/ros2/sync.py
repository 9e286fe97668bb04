"""Approximate-time synchronisation of several stamped topics (as ROS message_filters does).

Each input keeps its last ``queue_size`` messages by stamp. When a message arrives, the
synchroniser looks for one message per input, the new one included, whose stamps lie within
``slop_ns`` of each other (the candidates nearest to the new stamp first). On a match it
emits the set and drops every queued message at or before the matched stamp of its input,
so each message is used at most once and the output stamps only move forward. Messages
older than an input's last matched stamp are ignored.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.errors import ConfigError


@dataclass(frozen=True)
class Matched:
    """One synchronised set: input name -> (stamp_ns, message), and the newest stamp of the set."""

    messages: dict[str, tuple[int, Any]]
    stamp_ns: int


class ApproximateTimeSync:
    """Calls ``on_match(Matched)`` for every synchronised set (on the thread that called ``add``)."""

    def __init__(self, inputs: Sequence[str], slop_ns: int, queue_size: int, on_match: Callable[[Matched], None]):
        if not inputs or len(set(inputs)) != len(inputs):
            raise ConfigError(f"sync inputs ({list(inputs)!r}) must be non-empty and distinct")
        if slop_ns < 0 or queue_size < 1:
            raise ConfigError(f"sync slop_ns ({slop_ns}) must be >= 0 and queue_size ({queue_size}) >= 1")
        self.inputs = tuple(inputs)
        self.slop_ns = int(slop_ns)
        self.queue_size = int(queue_size)
        self.on_match = on_match
        self._queues: dict[str, OrderedDict[int, Any]] = {name: OrderedDict() for name in self.inputs}
        self._floor: dict[str, int] = dict.fromkeys(self.inputs, -1)
        self._lock = threading.Lock()
        self.dropped = 0
        """Messages ignored because they were older than what was already matched."""

    def add(self, name: str, stamp_ns: int, msg: Any) -> Matched | None:
        """Queue one message; returns (and reports) the set it completed, if any."""
        if name not in self._queues:
            raise KeyError(f"unknown sync input {name!r}; inputs: {self.inputs}")
        with self._lock:
            matched = self._add_locked(name, int(stamp_ns), msg)
        if matched is not None:
            self.on_match(matched)
        return matched

    def _add_locked(self, name: str, stamp: int, msg: Any) -> Matched | None:
        if stamp <= self._floor[name]:
            self.dropped += 1
            return None
        queue = self._queues[name]
        newest = next(reversed(queue), None)
        queue[stamp] = msg
        if newest is not None and stamp < newest:  # arrived out of order: keep stamps sorted
            self._queues[name] = queue = OrderedDict(sorted(queue.items()))
        while len(queue) > self.queue_size:
            queue.popitem(last=False)
        others = [n for n in self.inputs if n != name]
        candidates = []
        for other in others:
            near = sorted((s for s in self._queues[other] if abs(s - stamp) <= self.slop_ns),
                          key=lambda s: abs(s - stamp))
            if not near:
                return None
            candidates.append(near)
        for combo in itertools.product(*candidates):
            stamps = (stamp, *combo)
            if max(stamps) - min(stamps) <= self.slop_ns:
                chosen = dict(zip([name, *others], stamps))
                return self._emit(chosen)
        return None

    def _emit(self, chosen: dict[str, int]) -> Matched:
        messages = {}
        for name in self.inputs:
            stamp = chosen[name]
            queue = self._queues[name]
            messages[name] = (stamp, queue[stamp])
            for s in [s for s in queue if s <= stamp]:
                del queue[s]
            self._floor[name] = stamp
        return Matched(messages=messages, stamp_ns=max(chosen.values()))
