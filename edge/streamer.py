"""Send spooled steps to the gateway and delete them once acked.

One thread. A *session* is Register (deadline; says which seq the cloud has
durably, so the spool drops everything up to it) followed by one bidi stream
that sends chunks after that seq, with a window of unacked chunks in flight.
Acks are cumulative. When the stream ends, the status decides what happens:

==================  ====================================================================
status              what the edge does
==================  ====================================================================
INVALID_ARGUMENT    the first unacked chunk is poisoned: its rows (only the step named in
                    ``fleet-bad-step-seq`` when the gateway names one) go to the spool's
                    quarantine, never resent; sending resumes at once, declaring the gap
NOT_FOUND           re-register at once (the cloud forgot the robot, e.g. Redis was
                    wiped); the same chunk refused this way ``not_found_quarantine`` times
                    in a row is quarantined
FAILED_PRECONDITION a sequence gap: resume right after ``fleet-last-acked-seq``
RESOURCE_EXHAUSTED  wait ``fleet-retry-after-s`` (plus jitter); without that hint the
                    message was too large: halve the chunk size (a single step that is
                    still too large is quarantined)
anything else       exponential backoff with full jitter (at least ``fleet-retry-after-s``
                    when the gateway sent one), re-register, resume
==================  ====================================================================

Resending after a reconnect is safe: the gateway recognises steps it already
stored and acks them without a second copy. A stream with chunks in flight and
no ack for ``ack_timeout_s`` is cancelled and reopened (a stalled gateway).
The control loop never waits on any of this: it only appends to the spool.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import grpc

from edge.client import FleetClient, trailing_metadata
from fleet.columns import schema_hash
from fleet.convert import columns_wire, message_wire
from edge.spool import Spool
from fleet import metrics
from fleet.errors import ConfigError
from fleet.malloc import keep_freed_memory
from fleet.rows import RowLayout, RowMismatch
from fleet.types import RobotInfo
from fleet.worker import Worker

log = logging.getLogger(__name__)

MIN_CHUNK_BYTES = 16 * 1024


@dataclass(frozen=True)
class StreamerConfig:
    """How the streamer sends the spool: window of unacked chunks, chunk size, ack timeout, reconnect backoff."""

    window_chunks: int = 8
    """Chunks sent and not yet acked at once (more in flight: more throughput over long round trips)."""
    max_chunk_steps: int = 1024
    """Steps per chunk at most (a chunk never spans episodes; the gateway accepts up to 1024)."""
    max_chunk_bytes: int = 4 * 1024 * 1024
    """Encoded bytes per message at most (stay well below the gateway's max_message_bytes)."""
    chunks_per_message: int = 4
    """Whole chunks of a backlog (short episodes) sent in one message, if the gateway reads that many:
    one message's gRPC work on both sides instead of several."""
    flush_interval_s: float = 0.2
    """A partial chunk is sent after this long without filling up, seconds."""
    ack_timeout_s: float = 60.0
    """An unacked chunk older than this ends the stream, which reconnects and resends, seconds."""
    backoff_base_s: float = 0.2
    """First reconnect delay (full jitter, doubling per failed attempt), seconds."""
    backoff_max_s: float = 10.0
    """Longest reconnect delay, seconds."""

    def __post_init__(self) -> None:
        for name in ("window_chunks", "max_chunk_steps", "max_chunk_bytes", "chunks_per_message"):
            if getattr(self, name) < 1:
                raise ConfigError(f"streamer.{name} ({getattr(self, name)}) must be >= 1")
        for name in ("flush_interval_s", "ack_timeout_s", "backoff_base_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"streamer.{name} ({getattr(self, name)}) must be > 0")

class Backoff:
    """Exponential backoff with full jitter."""

    def __init__(self, base_s: float = StreamerConfig.backoff_base_s, max_s: float = StreamerConfig.backoff_max_s,
                 seed: int | None = None):
        self.base_s, self.max_s = base_s, max_s
        self._attempt = 0
        self._rng = random.Random(seed)

    def next_delay(self) -> float:
        delay = self._rng.uniform(0, min(self.max_s, self.base_s * 2.0 ** min(self._attempt, 60)))
        self._attempt += 1
        return delay

    def reset(self) -> None:
        self._attempt = 0


@dataclass(frozen=True)
class _Sent:
    """One chunk in flight."""

    first_seq: int
    last_seq: int
    sent_s: float


@dataclass
class _Session:
    """One stream: its chunks in flight, whether it ended, the call."""

    inflight: deque[_Sent] = field(default_factory=deque)
    broken: threading.Event = field(default_factory=threading.Event)
    call: object | None = None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Streamer:
    """Streams one robot's spool to the gateway (see the module docstring for the error policy)."""

    def __init__(self, info: RobotInfo, spool: Spool, client: FleetClient,
                 window_chunks: int = StreamerConfig.window_chunks, max_chunk_steps: int = StreamerConfig.max_chunk_steps,
                 flush_interval_s: float = StreamerConfig.flush_interval_s,
                 max_chunk_bytes: int = StreamerConfig.max_chunk_bytes, ack_timeout_s: float = StreamerConfig.ack_timeout_s,
                 not_found_quarantine: int = 3, backoff: Backoff | None = None,
                 chunks_per_message: int = StreamerConfig.chunks_per_message):
        keep_freed_memory()  # each message is a few hundred kB: reuse freed blocks (fleet/malloc.py)
        self.info = info
        self._schema_hash = schema_hash(info.schema)
        self._layout = RowLayout(info.schema)
        self._quarantined_seen = spool.quarantined_steps
        self.spool = spool
        self.client = client
        self.window_chunks = window_chunks
        self.max_chunk_steps = max_chunk_steps
        self.flush_interval_s = flush_interval_s
        self.max_chunk_bytes = max_chunk_bytes
        self.ack_timeout_s = ack_timeout_s
        self.not_found_quarantine = not_found_quarantine
        self._backoff = backoff or Backoff()
        self._worker = Worker(f"streamer-{info.robot_id}", self._run)
        self._state_lock = threading.Condition()
        self.acked_seq = 0
        self.connected = threading.Event()
        self.last_ack_s = 0.0
        self.registration = None
        self.sessions = 0
        """Streams opened so far (reconnects + 1)."""
        self._call = None
        self._inflight: deque[_Sent] = deque()
        self._inflight_lock = threading.Condition()
        self._chunk_bytes = max_chunk_bytes
        self.chunks_per_message = chunks_per_message
        self._chunks_per_message = 1  # what the gateway reads (Register says), at most chunks_per_message
        self._resume_after: int | None = None  # set: skip Register and resume after this seq
        self._not_found: tuple[int, int] = (0, 0)  # (first seq of the refused chunk, times in a row)
        self._in_stream = False  # the current session got past Register
        self._last_ack_mono = 0.0

    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._worker.stopping.set()
        call = self._call
        if call is not None:
            call.cancel()
        with self.spool.changed:
            self.spool.changed.notify_all()
        with self._inflight_lock:
            self._inflight_lock.notify_all()
        self._worker.stop(timeout_s)

    def wait_acked(self, seq: int, timeout_s: float) -> bool:
        """Block until everything up to ``seq`` is acked (tests, graceful drain)."""
        with self._state_lock:
            return self._state_lock.wait_for(lambda: self.acked_seq >= seq, timeout_s)

    # --- the session loop -----------------------------------------------------------

    def _run(self) -> None:
        robot = self.info.robot_id
        while not self._worker.stopping.is_set():
            error = None
            try:
                self._session()
                delay = self._backoff.next_delay()  # the gateway closed the stream cleanly (shutting down)
            except grpc.RpcError as exc:
                if self._worker.stopping.is_set():
                    break
                error = exc
                try:
                    delay = self._after_error(exc)
                except Exception:  # this thread must never die: the robot's data would stop flowing
                    log.exception("robot %s: streamer error while handling %s", robot, exc)
                    delay = self._backoff.next_delay()
            except Exception:  # keep the robot's data flowing whatever happened; log loudly
                log.exception("robot %s: streamer error", robot)
                delay = self._backoff.next_delay()
            self.connected.clear()
            metrics.EDGE_CONNECTED.labels(robot=robot).set(0)
            if self.client.wait_retry(delay, self._worker.stopping, error):
                break

    def _after_error(self, exc: grpc.RpcError) -> float:
        """Act on a failed session; returns how long to wait before the next one."""
        robot = self.info.robot_id
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        md = trailing_metadata(exc)
        metrics.EDGE_STREAM_ERRORS.labels(robot=robot, code=code.name).inc()
        with self._inflight_lock:
            culprit = self._inflight[0] if self._inflight else None
            self._inflight.clear()
        in_stream, self._in_stream = self._in_stream, False
        if code == grpc.StatusCode.INVALID_ARGUMENT and culprit is not None:
            bad = _int(md.get("fleet-bad-step-seq"))
            first, last = (bad, bad) if bad is not None and culprit.first_seq <= bad <= culprit.last_seq \
                else (culprit.first_seq, culprit.last_seq)
            self._quarantine(first, last, code, details)
            self._resume_after = self.acked_seq
            return 0.0
        if code == grpc.StatusCode.NOT_FOUND:
            if culprit is not None:
                seq, times = self._not_found
                times = times + 1 if seq == culprit.first_seq else 1
                self._not_found = (culprit.first_seq, times)
                if times >= self.not_found_quarantine:
                    self._quarantine(culprit.first_seq, culprit.last_seq, code, details)
                    self._not_found = (0, 0)
            log.warning("robot %s: gateway does not know this robot (%s); registering again", robot, details)
            self._resume_after = None
            return 0.0 if self._not_found[1] <= 1 else self._backoff.next_delay()
        if code == grpc.StatusCode.FAILED_PRECONDITION and in_stream and "fleet-last-acked-seq" in md:
            last = _int(md["fleet-last-acked-seq"]) or 0
            log.warning("robot %s: gateway has steps up to seq %d only (%s); resuming after it", robot, last, details)
            self._resume_after = last
            return 0.0
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            retry_s = _float(md.get("fleet-retry-after-s"))
            if retry_s is not None:
                log.info("robot %s: gateway busy (%s); retrying in %.1fs", robot, details, retry_s)
                self._resume_after = self.acked_seq if in_stream else None
                return retry_s * random.uniform(1.0, 1.5)
            if culprit is not None:  # no hint: grpc's message size limit
                if culprit.first_seq == culprit.last_seq and self._chunks_per_message == 1:
                    self._quarantine(culprit.first_seq, culprit.last_seq, code, details)
                else:  # one chunk a message from now on (until the next Register), and smaller chunks
                    self._chunks_per_message = 1
                    self._chunk_bytes = max(MIN_CHUNK_BYTES, self._chunk_bytes // 2)
                    log.warning("robot %s: chunk too large for the gateway (%s); chunks now <= %d bytes", robot,
                                details, self._chunk_bytes)
                self._resume_after = self.acked_seq
                return 0.0
        self._resume_after = None
        delay = self._backoff.next_delay()
        hint_s = _float(md.get("fleet-retry-after-s"))  # e.g. UNAVAILABLE while the gateway's Redis is down
        if hint_s is not None:
            delay = max(delay, hint_s * random.uniform(1.0, 1.5))
        log.warning("robot %s: experience stream ended (%s: %s); reconnecting in %.2fs", robot, code.name,
                    details, delay)
        return delay

    def _quarantine(self, first: int, last: int, code: grpc.StatusCode | str, details: str) -> None:
        self.spool.quarantine(first, last, code if isinstance(code, str) else code.name, details)
        self._update_gauges()

    # --- one session ------------------------------------------------------------------

    def _session(self) -> None:
        robot = self.info.robot_id
        self._in_stream = False
        if self._resume_after is None:
            reg = self.client.register(self.info)
            self.registration = reg
            self._chunks_per_message = max(1, min(self.chunks_per_message, reg.max_chunks_per_message))
            start = reg.last_acked_seq
            self.spool.ensure_after(start)
        else:
            start, self._resume_after = self._resume_after, None
        self.spool.ack(start)
        self._set_acked(start)
        self.sessions += 1
        session = _Session()
        with self._inflight_lock:
            self._inflight = session.inflight
        session.call = self._call = self.client.stream_experience(self._requests(start, session))
        self._in_stream = True
        self.connected.set()
        metrics.EDGE_CONNECTED.labels(robot=robot).set(1)
        log.info("robot %s: streaming to %s from seq %d", robot, self.client.target, start + 1)
        try:
            for ack in session.call:
                self._backoff.reset()
                self.spool.ack(ack.acked_seq)
                self._set_acked(ack.acked_seq)
                with self._inflight_lock:
                    while session.inflight and session.inflight[0].last_seq <= ack.acked_seq:
                        session.inflight.popleft()
                    self._inflight_lock.notify_all()
                self._not_found = (0, 0)
                self._update_gauges()
        finally:
            session.broken.set()
            with self._inflight_lock:
                self._inflight_lock.notify_all()
            self._call = None

    def _requests(self, start: int, session: _Session):
        """Chunks after ``start`` for one stream (runs on a gRPC thread; ends with its session)."""
        sent = start
        robot = self.info.robot_id
        inflight, broken = session.inflight, session.broken
        while not self._worker.stopping.is_set() and not broken.is_set():
            with self._inflight_lock:
                self._inflight_lock.wait_for(lambda: len(inflight) < self.window_chunks or broken.is_set()
                                             or self._worker.stopping.is_set() or self._stalled(inflight), timeout=1.0)
                stalled = self._stalled(inflight)
                full = len(inflight) >= self.window_chunks
            if broken.is_set() or self._worker.stopping.is_set():
                return
            if stalled:
                log.warning("robot %s: no ack for %.0fs with chunks in flight; reconnecting", robot,
                            self.ack_timeout_s)
                if session.call is not None:
                    session.call.cancel()
                return
            if full or not self.spool.wait_for_data_after(sent, timeout_s=1.0):
                continue
            batch = self.spool.read_after(sent, max_steps=self.max_chunk_steps, max_bytes=self._chunk_bytes)
            if batch is None:  # rows after ``sent`` vanished (quarantined/dropped): look again shortly
                self._worker.stopping.wait(0.05)
                continue
            if (batch.end_blob is None and batch.n < self.max_chunk_steps
                    and batch.nbytes < self._chunk_bytes // 2):
                # Let a few more steps accumulate: fewer, larger chunks.
                if self._worker.stopping.wait(self.flush_interval_s):
                    return
                batch = self.spool.read_after(sent, max_steps=self.max_chunk_steps,
                                              max_bytes=self._chunk_bytes) or batch
            try:
                chunks = [self._message(batch, sent)]
            except RowMismatch as exc:  # a row written under another schema: never sendable
                bad = batch.first_seq + exc.index
                self._quarantine(bad, bad, "SCHEMA_MISMATCH", str(exc))
                continue
            batches = [batch]
            room = self._chunk_bytes - batch.nbytes
            while len(batches) < self._chunks_per_message and self._complete(batches[-1]) and room > 0:
                # A backlog of short episodes: more whole chunks in the same message (acked together).
                more = self.spool.read_after(batches[-1].last_seq, max_steps=self.max_chunk_steps, max_bytes=room)
                if more is None or more.nbytes > room or not self._complete(more):
                    break
                try:
                    chunks.append(self._message(more, batches[-1].last_seq))
                except RowMismatch:  # sent on its own next time round, and quarantined there
                    break
                batches.append(more)
                room -= more.nbytes
            with self._inflight_lock:
                if broken.is_set():
                    return
                now = time.monotonic()
                inflight.extend(_Sent(b.first_seq, b.last_seq, now) for b in batches)
            sent = batches[-1].last_seq
            yield message_wire(chunks)  # the ColumnChunk's bytes (the client sends them as they are)

    def _message(self, batch, after: int) -> list:
        """One chunk's wire parts (fleet.convert.columns_wire)."""
        return columns_wire(self.info.robot_id, batch.episode_id, batch.task, self._layout, self._schema_hash,
                               batch.parts, batch.first_seq, batch.evaluation, gap_declared=batch.first_seq > after + 1,
                               end_blob=batch.end_blob)

    def _complete(self, batch) -> bool:
        """A chunk that will not grow: its episode ended, or it is as long as a chunk gets."""
        return batch.end_blob is not None or batch.n >= self.max_chunk_steps

    def _stalled(self, inflight: deque[_Sent]) -> bool:
        """Chunks in flight and no ack for ``ack_timeout_s`` (call with ``_inflight_lock`` held)."""
        if not inflight:
            return False
        since = max(inflight[0].sent_s, self._last_ack_mono)
        return time.monotonic() - since > self.ack_timeout_s

    def _set_acked(self, seq: int) -> None:
        with self._state_lock:
            if seq > self.acked_seq:
                self.acked_seq = seq
            self.last_ack_s = time.time()
            self._last_ack_mono = time.monotonic()
            self._state_lock.notify_all()
        metrics.EDGE_LAST_ACK.labels(robot=self.info.robot_id).set(self.last_ack_s)

    def _update_gauges(self) -> None:
        robot = self.info.robot_id
        steps, nbytes = self.spool.backlog()
        metrics.EDGE_SPOOL_STEPS.labels(robot=robot).set(steps)
        metrics.EDGE_SPOOL_BYTES.labels(robot=robot).set(nbytes)
        quarantined = self.spool.quarantined_steps  # also the steps the spool quarantined when recorded
        if quarantined > self._quarantined_seen:
            metrics.EDGE_SPOOL_QUARANTINED.labels(robot=robot).inc(quarantined - self._quarantined_seen)
            self._quarantined_seen = quarantined
