"""Bound what the gateway holds in memory for experience: streams and in-flight bytes.

A chunk is *in flight* from the moment its message is taken off the stream until
its ack is sent (decode, validate, the Redis write). Each stream handles its
chunks one at a time, so while a chunk waits here the gateway reads nothing more
from that stream: gRPC/HTTP2 flow control stops the robot's sender, whose
window fills and whose spool holds the rest. That is how a slow or full Redis
slows senders down. A chunk that cannot get room within ``wait_s`` ends its
stream with RESOURCE_EXHAUSTED and a retry hint; nothing is dropped (the edge
resends from its spool) and nothing acked is at risk (acks follow writes).

Memory held for experience is thus at most ``max_streams`` messages of
``max_message_bytes`` waiting, plus ``max_bytes`` in flight (a lone chunk may
exceed a bound when nothing else holds it, so a large chunk cannot starve).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fleet import metrics
from fleet.errors import Overloaded

log = logging.getLogger(__name__)


class InflightLimiter:
    """Byte budget per robot and over all robots, plus a cap on open streams (one event loop)."""

    def __init__(self, max_bytes: int, robot_max_bytes: int, max_streams: int, wait_s: float,
                 retry_after_s: float):
        self.max_bytes = max_bytes
        self.robot_max_bytes = robot_max_bytes
        self.max_streams = max_streams
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s
        self.total_bytes = 0
        self.streams = 0
        self._robot_bytes: dict[str, int] = {}
        self._room = asyncio.Condition()

    # --- streams ------------------------------------------------------------------------

    def open_stream(self) -> None:
        if self.streams >= self.max_streams:
            metrics.GATEWAY_BACKPRESSURE.labels(reason="streams", outcome="refused").inc()
            raise Overloaded(f"gateway already holds {self.streams} experience streams (max_experience_streams "
                             f"{self.max_streams}); retry later or use another replica",
                             retry_after_s=self.retry_after_s)
        self.streams += 1

    def close_stream(self) -> None:
        self.streams -= 1

    # --- bytes --------------------------------------------------------------------------

    def _blocked_by(self, robot_id: str, nbytes: int) -> str:
        """Which bound a chunk would break ("" = none). A chunk alone always fits."""
        held = self._robot_bytes.get(robot_id, 0)
        if held and held + nbytes > self.robot_max_bytes:
            return "robot_bytes"
        if self.total_bytes and self.total_bytes + nbytes > self.max_bytes:
            return "global_bytes"
        return ""

    @contextlib.asynccontextmanager
    async def hold(self, robot_id: str, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` for ``robot_id`` while the body runs; wait for room, or raise Overloaded."""
        reason = self._blocked_by(robot_id, nbytes)
        if reason:
            try:
                async with self._room:
                    await asyncio.wait_for(self._room.wait_for(lambda: not self._blocked_by(robot_id, nbytes)),
                                           self.wait_s)
            except TimeoutError:
                metrics.GATEWAY_BACKPRESSURE.labels(reason=reason, outcome="refused").inc()
                limit = self.robot_max_bytes if reason == "robot_bytes" else self.max_bytes
                held = self._robot_bytes.get(robot_id, 0) if reason == "robot_bytes" else self.total_bytes
                scope = f"robot {robot_id!r}" if reason == "robot_bytes" else "all robots"
                raise Overloaded(f"{held} bytes already in flight for {scope} (limit {limit}); a chunk of "
                                 f"{nbytes} bytes waited {self.wait_s:.1f}s for room", self.retry_after_s) from None
            metrics.GATEWAY_BACKPRESSURE.labels(reason=reason, outcome="waited").inc()
        self._add(robot_id, nbytes)
        try:
            yield
        finally:
            self._add(robot_id, -nbytes)
            async with self._room:
                self._room.notify_all()

    def _add(self, robot_id: str, nbytes: int) -> None:
        held = self._robot_bytes.get(robot_id, 0) + nbytes
        if held:
            self._robot_bytes[robot_id] = held
        else:
            self._robot_bytes.pop(robot_id, None)
        self.total_bytes += nbytes
