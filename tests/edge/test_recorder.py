"""edge/recorder.py with a real spool: order kept, nothing lost on a graceful stop, the full-queue policy with
declared gaps, and the control thread never encoding."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import edge.images
from edge.hotswap import PolicySlot
from edge.images import ImageEncodingSink
from edge.loop import ControlLoop, LoopConfig
from edge.operator import NoOperator
from edge.recorder import Recorder
from edge.robots.base import Observation, Robot
from edge.spool import Spool
from fleet import metrics
from fleet.errors import ConfigError
from fleet.policies.base import NullPolicy
from fleet.types import EpisodeSummary, FeatureSpec, Schema, Step

pytestmark = pytest.mark.timeout(60)

SCHEMA = Schema((FeatureSpec("state", "float32", (4,)), FeatureSpec("cam", "uint8", (24, 32, 3), is_image=True)),
                FeatureSpec("action", "float32", (2,)))


def make_step(index: int, intervention: bool = False) -> Step:
    frame = np.full((24, 32, 3), index % 256, np.uint8)
    return Step(seq=0, index=index, observation={"state": np.full(4, index, np.float32), "cam": frame},
                policy_action=np.zeros(2, np.float32), action=np.zeros(2, np.float32), is_intervention=intervention,
                reward=0.0, success=False, done=False, policy_version=1, timestamp_s=float(index))


def spooled(spool: Spool, ends: list[int] | None = None) -> list[tuple[int, Step]]:
    """(seq, step) of everything in the spool, in order; the seqs carrying an episode end go to ``ends``."""
    out, seq = [], 0
    while (batch := spool.read_after(seq)) is not None:
        out += [(s.seq, s) for s in spool.steps(batch)]
        seq = batch.last_seq
        if batch.end_blob is not None and ends is not None:
            ends.append(seq)
    return out


class Gate:
    """A StepSink in front of ``inner`` that holds the recorder thread until ``open`` is set."""

    def __init__(self, inner):
        self.inner, self.open, self.waiting = inner, threading.Event(), threading.Event()

    def record(self, *args) -> None:
        self.waiting.set()
        assert self.open.wait(30)
        self.inner.record(*args)


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool.db", SCHEMA)
    yield s
    s.close()


def dropped_metric(robot: str, reason: str) -> float:
    return metrics.EDGE_RECORDER_DROPPED.labels(robot=robot, reason=reason)._value.get()


def test_order_kept_and_nothing_lost_on_graceful_stop(spool):
    recorder = Recorder(ImageEncodingSink(spool, SCHEMA), spool.skip, "rec-order", max_steps=8)
    recorder.start()
    summary = EpisodeSummary(success=True, num_steps=50, intervention_steps=0, interventions=0, evaluation=False,
                             policy_version=1)
    for episode in ("e1", "e2"):
        for t in range(50):  # faster than the thread can encode+insert: the queue fills, and must not drop...
            recorder.record(episode, "task", False, make_step(t), summary if t == 49 else None)
            if recorder.backlog() >= 7:  # ...so this test keeps below the bound (the drop policy is tested below)
                recorder.wait_idle(10)
    assert recorder.stop(drain_timeout_s=10)
    ends: list[int] = []
    rows = spooled(spool, ends)
    assert [seq for seq, _ in rows] == list(range(1, 101))
    assert [s.index for _, s in rows] == list(range(50)) * 2
    assert all(set(s.images) == {"cam"} and set(s.observation) == {"state"} for _, s in rows)
    assert ends == [50, 100]
    assert recorder.dropped == {"queue_full": 0, "unencodable": 0, "shutdown": 0}


def test_full_queue_drops_oldest_plain_step_and_declares_the_gap(spool):
    gate = Gate(ImageEncodingSink(spool, SCHEMA))
    recorder = Recorder(gate, spool.skip, "rec-full", max_steps=3)
    recorder.start()
    end = EpisodeSummary(success=False, num_steps=7, intervention_steps=1, interventions=1, evaluation=False,
                         policy_version=1)
    recorder.record("e", "task", False, make_step(0), None)
    assert gate.waiting.wait(10)  # step 0 is in the thread's hands; steps 1.. queue up behind it
    for t in range(1, 7):
        recorder.record("e", "task", False, make_step(t, intervention=t == 2), end if t == 6 else None)
    # queue of 3: 4 pushes out 1, 5 pushes out 3, 6 (the episode end) pushes out 4; intervention 2 stays
    assert recorder.dropped["queue_full"] == 3 and dropped_metric("rec-full", "queue_full") == 3
    gate.open.set()
    assert recorder.stop(drain_timeout_s=10)
    rows = spooled(spool)
    assert [(seq, s.index) for seq, s in rows] == [(1, 0), (3, 2), (6, 5), (7, 6)]  # seqs 2, 4, 5 left unused
    assert rows[1][1].is_intervention
    first = spool.read_after(0)
    assert (first.first_seq, first.last_seq) == (1, 1)  # a batch stops at a gap: the streamer declares it
    assert spool.read_after(1).first_seq == 3


def test_queue_of_interventions_drops_the_newest_plain_step_then_the_oldest(spool):
    gate = Gate(ImageEncodingSink(spool, SCHEMA))
    recorder = Recorder(gate, spool.skip, "rec-interv", max_steps=2)
    recorder.start()
    recorder.record("e", "task", False, make_step(0), None)
    assert gate.waiting.wait(10)
    for t, intervention in ((1, True), (2, True), (3, False), (4, True)):
        recorder.record("e", "task", False, make_step(t, intervention), None)
    gate.open.set()
    assert recorder.stop(drain_timeout_s=10)
    assert [(seq, s.index) for seq, s in spooled(spool)] == [(1, 0), (3, 2), (5, 4)]
    assert recorder.dropped["queue_full"] == 2


def test_unencodable_step_is_dropped_with_a_gap_and_recording_goes_on(spool):
    recorder = Recorder(ImageEncodingSink(spool, SCHEMA), spool.skip, "rec-bad")
    recorder.start()
    bad = make_step(1)
    bad.observation["cam"] = np.zeros((24, 32, 3), np.float32)  # not uint8: encode_image refuses it
    for step in (make_step(0), bad, make_step(2)):
        recorder.record("e", "task", False, step, None)
    assert recorder.stop(drain_timeout_s=10)
    assert [(seq, s.index) for seq, s in spooled(spool)] == [(1, 0), (3, 2)]
    assert recorder.dropped["unencodable"] == 1 and dropped_metric("rec-bad", "unencodable") == 1


def test_stop_gives_up_after_its_deadline_and_counts_what_it_dropped(spool):
    gate = Gate(ImageEncodingSink(spool, SCHEMA))
    recorder = Recorder(gate, spool.skip, "rec-stop")
    recorder.start()
    for t in range(4):
        recorder.record("e", "task", False, make_step(t), None)
    assert gate.waiting.wait(10)
    assert not recorder.stop(drain_timeout_s=0.2)  # step 0 stuck in the sink, 1..3 queued
    assert recorder.dropped["shutdown"] == 3
    recorder.record("e", "task", False, make_step(4), None)  # after stop: counted, never raised
    assert recorder.dropped["shutdown"] == 4 and dropped_metric("rec-stop", "shutdown") == 4
    gate.open.set()
    recorder.thread.join(10)
    assert [s.index for _, s in spooled(spool)] == [0]


def test_bad_bound_is_refused(spool):
    with pytest.raises(ConfigError, match="max_steps"):
        Recorder(ImageEncodingSink(spool, SCHEMA), spool.skip, "rec-cfg", max_steps=0)


class CameraRobot(Robot):
    """A robot with one camera that returns fresh arrays every tick."""

    embodiment = "camera-toy"
    schema = SCHEMA
    tasks = ("look",)

    def __init__(self):
        self.t = 0

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def observe(self) -> Observation:
        self.t += 1
        return Observation({"state": np.full(4, self.t, np.float32),
                            "cam": np.full((24, 32, 3), self.t % 256, np.uint8)})

    def reset(self, task: str) -> Observation:
        return self.observe()

    def act(self, action: np.ndarray) -> Observation:
        return self.observe()


def test_the_control_thread_never_encodes_nor_spools(spool, monkeypatch):
    """A real control loop: every frame is encoded, and every step spooled, on the recorder's thread."""
    encoders: set[int] = set()
    spoolers: set[int] = set()
    real_encode, real_record = edge.images.encode_image, spool.record

    def encode(*args, **kwargs):
        encoders.add(threading.get_ident())
        return real_encode(*args, **kwargs)

    def record(*args):
        spoolers.add(threading.get_ident())
        return real_record(*args)

    monkeypatch.setattr(edge.images, "encode_image", encode)
    monkeypatch.setattr(spool, "record", record)
    recorder = Recorder(ImageEncodingSink(spool, SCHEMA), spool.skip, "rec-thread", max_steps=1000)
    recorder.start()
    loop = ControlLoop("rec-thread", CameraRobot(), PolicySlot(NullPolicy((2,), "float32")), NoOperator(), recorder,
                       LoopConfig(realtime=False, max_episode_steps=10, max_episodes=3))
    loop.start()
    assert loop.wait_episodes(3, timeout_s=30)
    loop.stop()
    assert recorder.stop(drain_timeout_s=10)
    rows = spooled(spool)
    assert len(rows) == 30 and all("cam" in s.images for _, s in rows)
    assert encoders == spoolers == {recorder.thread.ident}
    assert loop._worker.thread.ident not in encoders
