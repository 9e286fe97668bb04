"""The recorder: the control thread hands each step over and goes on; a background thread records it.

Encoding camera frames (JPEG/PNG) and appending to the spool (protobuf + SQLite insert) take
milliseconds per step with a 480x640 camera; the control thread must not pay them. The
:class:`Recorder` is the control loop's :class:`~edge.loop.StepSink`: ``record`` appends the step as
it is (references to its arrays, no copies: backends return fresh arrays, see
:class:`~edge.robots.base.Observation`) to a bounded in-memory queue and returns; one thread takes
steps in order and hands them to ``inner`` (an :class:`~edge.images.ImageEncodingSink` in front of
the :class:`~edge.spool.Spool`).

Queue full (the recorder fell behind, e.g. the disk stalls): ``record`` never blocks. The step to
lose is chosen as the spool chooses when it is full: the oldest step that is not an operator
intervention (and not an episode's last step, which carries the summary); failing that, the oldest
that does not end an episode; failing that, the oldest. It is counted
(``fleet_edge_recorder_dropped_steps_total{reason="queue_full"}``) and leaves an unused sequence
number in the spool at its place (:meth:`~edge.spool.Spool.skip`), so the streamer declares the gap
(``gap_declared``) exactly as it does for steps the spool itself dropped. A step whose frames cannot
be encoded is dropped the same way (``reason="unencodable"``) instead of stopping the robot.

Shutdown: :meth:`stop` (after the control loop stopped) records what is queued, for at most
``drain_timeout_s``; steps still queued then are dropped (``reason="shutdown"``) and logged.

The hand-off takes no lock the recorder thread also holds while it works (an atomic ``deque.append``
and a ``SimpleQueue`` doorbell): a recorder thread descheduled mid-step cannot stall the control
thread. Only a full queue takes the lock, to drop a step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from edge.loop import StepSink
from fleet import metrics
from fleet.errors import ConfigError
from fleet.types import EpisodeSummary, Step

log = logging.getLogger(__name__)


@dataclass
class _Queued:
    episode_id: str
    task: str
    evaluation: bool
    step: Step
    episode_end: EpisodeSummary | None
    skipped: int = 0
    """Steps dropped just before this one: sequence numbers to leave unused before recording it."""

    @property
    def rank(self) -> int:
        """Drop order when the queue is full: 0 first (plain steps), then interventions, then episode ends."""
        return 2 if self.episode_end is not None else int(self.step.is_intervention)


class Recorder:
    """A StepSink that returns at once; ``inner`` gets the steps, in order, on the recorder's thread.

    ``skip_seqs(n)`` leaves ``n`` sequence numbers unused for dropped steps (``Spool.skip``)."""

    def __init__(self, inner: StepSink, skip_seqs: Callable[[int], None], robot_id: str, max_steps: int = 64):
        if max_steps < 1:
            raise ConfigError(f"recorder max_steps ({max_steps}) must be >= 1")
        self.inner = inner
        self.max_steps = max_steps
        self._skip_seqs = skip_seqs
        self._robot_id = robot_id
        self._queue: deque[_Queued] = deque()  # appended by the control thread only, without a lock
        self._bell: queue.SimpleQueue[None] = queue.SimpleQueue()  # one ring per step queued (and on stop)
        self._lock = threading.Lock()  # taken by the control thread only to drop; by the recorder thread to take
        self._idle = threading.Condition()  # notified when the thread has nothing queued or in hand
        self._in_hand = False
        self._carry = 0  # steps dropped after the newest queued one (they precede the next step recorded)
        self._stopping = False
        self.dropped: dict[str, int] = dict.fromkeys(metrics.RECORDER_DROP_REASONS, 0)
        self._dropped = {r: metrics.EDGE_RECORDER_DROPPED.labels(robot=robot_id, reason=r)
                         for r in metrics.RECORDER_DROP_REASONS}
        self._depth = metrics.EDGE_RECORDER_QUEUE.labels(robot=robot_id)
        self.thread = threading.Thread(target=self._run, name=f"recorder-{robot_id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # --- control thread -------------------------------------------------------------

    def record(self, episode_id: str, task: str, evaluation: bool, step: Step,
               episode_end: EpisodeSummary | None) -> None:
        """Queue the step (StepSink); drops one step per the policy above if the queue is full."""
        if self._stopping:
            self._drop("shutdown", 1)
            return
        item = _Queued(episode_id, task, evaluation, step, episode_end, self._carry)
        self._carry = 0
        self._queue.append(item)
        if len(self._queue) > self.max_steps:
            with self._lock:
                if len(self._queue) > self.max_steps:
                    self._drop_one_locked()
        self._bell.put(None)

    def _drop_one_locked(self) -> None:
        q = self._queue
        victim = min(range(len(q)), key=lambda i: (q[i].rank, i))
        lost = q[victim]
        del q[victim]
        if victim < len(q):
            q[victim].skipped += lost.skipped + 1
        else:
            self._carry += lost.skipped + 1
        self._drop("queue_full", 1)

    def _drop(self, reason: str, n: int) -> None:
        with self._idle:
            self.dropped[reason] += n
            total = self.dropped[reason]
        self._dropped[reason].inc(n)
        if total - n < 1 <= total or total // 1000 > (total - n) // 1000:
            log.warning("recorder %s: dropped %d step(s) (%s); %d so far", self._robot_id, n, reason, total)

    # --- recorder thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._bell.get()
            while True:
                with self._lock:
                    self._in_hand = True  # before the pop: wait_idle must never see neither queued nor in hand
                    item = self._queue.popleft() if self._queue else None
                if item is None:
                    break
                self._depth.set(len(self._queue))
                self._record(item)
            with self._idle:
                self._in_hand = False
                self._idle.notify_all()
            if self._stopping:
                return

    def _record(self, item: _Queued) -> None:
        if item.skipped:
            self._skip_seqs(item.skipped)
        try:
            self.inner.record(item.episode_id, item.task, item.evaluation, item.step, item.episode_end)
        except Exception:  # noqa: BLE001 - a bad frame must not stop recording; the robot keeps running
            log.exception("recorder %s: cannot record step %d of episode %s; dropped", self._robot_id,
                          item.step.index, item.episode_id)
            self._skip_seqs(1)  # this thread assigns the order: the gap is exactly here
            self._drop("unencodable", 1)

    # --- lifecycle --------------------------------------------------------------------

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every queued step has been handed to ``inner``; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._queue and not self._in_hand, timeout_s)

    def backlog(self) -> int:
        """Steps queued, not yet handed to ``inner``."""
        return len(self._queue)

    def stop(self, drain_timeout_s: float = 5.0) -> bool:
        """Record what is queued (at most ``drain_timeout_s``), drop the rest, end the thread; True if drained.

        Call it after the control loop stopped; later ``record`` calls are dropped (``reason="shutdown"``)."""
        deadline = time.monotonic() + drain_timeout_s
        alive = self.thread.is_alive()
        drained = self.wait_idle(drain_timeout_s) if alive else not self._queue
        self._stopping = True
        with self._lock:
            left = len(self._queue)
            self._queue.clear()
        if left:
            self._drop("shutdown", left)
            log.warning("recorder %s: %d step(s) not recorded within %.1f s of stopping", self._robot_id, left,
                        drain_timeout_s)
        if alive:
            self._bell.put(None)
            self.thread.join(max(deadline - time.monotonic(), 0.0) + 0.5)
        self._depth.set(0)
        return drained and not left and not self.thread.is_alive()
