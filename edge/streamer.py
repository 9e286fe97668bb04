"""Send spooled steps to the gateway and delete them once acked.

One thread. Per connection: Register (deadline) tells the last seq the cloud has
durably; the spool drops everything up to it and sending resumes after it. A
window of unacked chunks keeps the link busy. Any error -> exponential backoff
with full jitter, reconnect, resume from the last ack: a resent chunk is
recognised by the gateway and not stored twice. The control loop never waits
on any of this: it only appends to the spool.
"""

from __future__ import annotations

import logging
import random
import threading
import time

import grpc

from edge.client import FleetClient
from edge.spool import Spool
from fleet import metrics
from fleet.convert import chunk_message
from fleet.types import RobotInfo

log = logging.getLogger(__name__)


class Backoff:
    """Exponential backoff with full jitter."""

    def __init__(self, base_s: float = 0.2, max_s: float = 10.0, seed: int | None = None):
        self.base_s, self.max_s = base_s, max_s
        self._attempt = 0
        self._rng = random.Random(seed)

    def next_delay(self) -> float:
        delay = self._rng.uniform(0, min(self.max_s, self.base_s * (2 ** self._attempt)))
        self._attempt += 1
        return delay

    def reset(self) -> None:
        self._attempt = 0


class Streamer:
    def __init__(self, info: RobotInfo, spool: Spool, client: FleetClient, window_chunks: int = 8,
                 max_chunk_steps: int = 64, flush_interval_s: float = 0.2):
        self.info = info
        self.spool = spool
        self.client = client
        self.window_chunks = window_chunks
        self.max_chunk_steps = max_chunk_steps
        self.flush_interval_s = flush_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Condition()
        self.acked_seq = 0
        self.connected = threading.Event()
        self.last_ack_s = 0.0
        self.registration = None
        self._call = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"streamer-{self.info.robot_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        with self.spool.changed:
            self.spool.changed.notify_all()
        if self._thread:
            self._thread.join(timeout_s)

    def wait_acked(self, seq: int, timeout_s: float) -> bool:
        """Block until everything up to ``seq`` is acked (tests, graceful drain)."""
        with self._state_lock:
            return self._state_lock.wait_for(lambda: self.acked_seq >= seq, timeout_s)

    def _run(self) -> None:
        backoff = Backoff()
        robot = self.info.robot_id
        while not self._stop.is_set():
            try:
                self._session(backoff)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if not self._stop.is_set():
                    log.warning("robot %s: experience stream ended (%s: %s)", robot, code,
                                exc.details() if hasattr(exc, "details") else exc)
            except Exception:  # keep the robot's data flowing whatever happened; log loudly
                log.exception("robot %s: streamer error", robot)
            self.connected.clear()
            metrics.EDGE_CONNECTED.labels(robot=robot).set(0)
            if self._stop.wait(backoff.next_delay()):
                break

    def _session(self, backoff: Backoff) -> None:
        robot = self.info.robot_id
        reg = self.client.register(self.info)
        self.registration = reg
        self.spool.ensure_after(reg.last_acked_seq)
        self.spool.ack(reg.last_acked_seq)
        self._set_acked(reg.last_acked_seq)
        sent = reg.last_acked_seq
        inflight: list[int] = []  # last seq of each unacked chunk
        lock = threading.Condition()
        broken = threading.Event()

        def requests():
            nonlocal sent
            while not self._stop.is_set() and not broken.is_set():
                with lock:
                    if not lock.wait_for(lambda: len(inflight) < self.window_chunks or broken.is_set()
                                         or self._stop.is_set(), timeout=1.0):
                        continue
                if broken.is_set() or self._stop.is_set():
                    return
                if not self.spool.wait_for_data_after(sent, timeout_s=1.0):
                    continue
                batch = self.spool.read_after(sent, max_steps=self.max_chunk_steps)
                if batch is None:
                    continue
                if batch.end_blob is None and len(batch.step_blobs) < self.max_chunk_steps:
                    # Let a few more steps accumulate: fewer, larger chunks.
                    if self._stop.wait(self.flush_interval_s):
                        return
                    batch = self.spool.read_after(sent, max_steps=self.max_chunk_steps) or batch
                msg = chunk_message(robot, batch.episode_id, batch.task, batch.step_blobs, batch.evaluation,
                                    gap_declared=batch.first_seq > sent + 1, end_blob=batch.end_blob)
                with lock:
                    inflight.append(batch.last_seq)
                sent = batch.last_seq
                yield msg

        call = self.client.stream_experience(requests())
        self._call = call
        self.connected.set()
        metrics.EDGE_CONNECTED.labels(robot=robot).set(1)
        log.info("robot %s: streaming to %s from seq %d", robot, reg.gateway_id, sent + 1)
        try:
            for ack in call:
                backoff.reset()
                self.spool.ack(ack.acked_seq)
                self._set_acked(ack.acked_seq)
                with lock:
                    while inflight and inflight[0] <= ack.acked_seq:
                        inflight.pop(0)
                    lock.notify_all()
                steps, nbytes = self.spool.backlog()
                metrics.EDGE_SPOOL_STEPS.labels(robot=robot).set(steps)
                metrics.EDGE_SPOOL_BYTES.labels(robot=robot).set(nbytes)
        finally:
            broken.set()
            with lock:
                lock.notify_all()
            self._call = None

    def _set_acked(self, seq: int) -> None:
        with self._state_lock:
            if seq > self.acked_seq:
                self.acked_seq = seq
            self.last_ack_s = time.time()
            self._state_lock.notify_all()
        metrics.EDGE_LAST_ACK.labels(robot=self.info.robot_id).set(self.last_ack_s)
