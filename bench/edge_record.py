"""What recording a step costs the edge's control thread: the synchronous path against the recorder.

The real ControlLoop at 30 Hz (zero policy, no operator) drives a synthetic robot that returns fresh
arrays every tick: ``low-dim`` (39-d state, 4-d action, as MetaWorld) or ``camera`` (the same plus one
480x640 RGB frame, bench/capacity.py's synthetic camera). Its sink is, in the same run:

    sync      ImageEncodingSink -> Spool: JPEG encoding, protobuf, SQLite insert on the control thread
              (how edge/agent.py composed it before the recorder)
    recorder  Recorder -> ImageEncodingSink -> Spool: the control thread only queues the step

A thread acks what is spooled every 100 ms, as the streamer would. Columns:

    record ms   the control thread's time inside sink.record() (p50 / p99 / max)
    jitter ms   |interval between successive robot.act() calls - 1/30 s| (p50 / p99 / max)
    overruns    ticks whose work ran past the next tick's deadline
    dropped     steps the recorder dropped (its queue full); spooled = steps in the spool

Targets (issue 14): record p99 <= 0.3 ms low-dim, <= 1 ms with one 480x640 camera.

    python bench/edge_record.py --quick --json bench/results/edge_record.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.capacity import camera_frame  # noqa: E402
from bench.report import write_json  # noqa: E402

from edge.hotswap import PolicySlot  # noqa: E402
from edge.images import ImageEncodingSink  # noqa: E402
from edge.loop import ControlLoop, LoopConfig  # noqa: E402
from edge.operator import NoOperator  # noqa: E402
from edge.recorder import Recorder  # noqa: E402
from edge.robots.base import Observation, Robot  # noqa: E402
from edge.spool import Spool  # noqa: E402
from fleet.policies.base import NullPolicy  # noqa: E402
from fleet.types import FeatureSpec, Schema  # noqa: E402

HZ = 30.0
HEIGHT, WIDTH = 480, 640
TARGET_P99_MS = {"low-dim": 0.3, "camera": 1.0}
WARMUP_STEPS = 30


class SyntheticRobot(Robot):
    """Fresh arrays every tick, like a real backend; act() times are kept for the jitter."""

    embodiment = "bench"
    tasks = ("bench",)

    def __init__(self, camera: bool):
        images = (FeatureSpec("cam", "uint8", (HEIGHT, WIDTH, 3), is_image=True),) if camera else ()
        self.schema = Schema((FeatureSpec("state", "float32", (39,)), *images), FeatureSpec("action", "float32", (4,)))
        rng = np.random.default_rng(0)
        self._frames = [camera_frame(HEIGHT, WIDTH, t, 0, rng) for t in range(30)] if camera else []
        self._rng = rng
        self.t = 0
        self.act_times: list[float] = []

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def observe(self) -> Observation:
        self.t += 1
        features = {"state": self._rng.normal(size=39).astype(np.float32)}
        if self._frames:
            features["cam"] = self._frames[self.t % len(self._frames)].copy()  # a new frame from the camera
        return Observation(features)

    def reset(self, task: str) -> Observation:
        return self.observe()

    def act(self, action: np.ndarray) -> Observation:
        self.act_times.append(time.perf_counter())
        return self.observe()


class TimedSink:
    """Times each record() call on the caller's (control) thread; sets ``done`` after ``steps`` calls."""

    def __init__(self, inner, steps: int):
        self.inner, self.steps = inner, steps
        self.durations: list[float] = []
        self.done = threading.Event()

    def record(self, *args) -> None:
        t0 = time.perf_counter()
        self.inner.record(*args)
        self.durations.append(time.perf_counter() - t0)
        if len(self.durations) >= self.steps:
            self.done.set()


def acker(spool: Spool, stop: threading.Event) -> None:
    while not stop.wait(0.1):
        seq = spool.last_seq()
        if seq:
            spool.ack(seq)


def run(kind: str, path: str, steps: int, workdir: Path) -> dict:
    robot = SyntheticRobot(camera=kind == "camera")
    spool = Spool(workdir / f"{kind}-{path}.db", robot.schema)
    encoder = ImageEncodingSink(spool, robot.schema, "jpeg")
    recorder = Recorder(encoder, spool.skip, f"bench-{kind}") if path == "recorder" else None
    sink = TimedSink(recorder or encoder, steps)
    loop = ControlLoop(f"bench-{kind}", robot, PolicySlot(NullPolicy((4,), "float32")), NoOperator(), sink,
                       LoopConfig(control_hz=HZ, max_episode_steps=10 * steps))
    stop = threading.Event()
    acks = threading.Thread(target=acker, args=(spool, stop), daemon=True)
    acks.start()
    if recorder:
        recorder.start()
    loop.start()
    assert sink.done.wait(steps / HZ * 3 + 30), f"{kind}/{path}: the loop did not reach {steps} steps"
    loop.stop()
    drained = recorder.stop(10.0) if recorder else True
    stats = loop.stats()
    stop.set()
    acks.join()
    spooled = spool.assigned_seq() - (sum(recorder.dropped.values()) if recorder else 0)
    spool.close()
    record_ms = 1e3 * np.array(sink.durations[WARMUP_STEPS:])
    jitter_ms = 1e3 * np.abs(np.diff(robot.act_times[WARMUP_STEPS:]) - 1.0 / HZ)
    return {"record_ms": {q: float(np.percentile(record_ms, p)) for q, p in (("p50", 50), ("p99", 99))}
            | {"max": float(record_ms.max())},
            "jitter_ms": {q: float(np.percentile(jitter_ms, p)) for q, p in (("p50", 50), ("p99", 99))}
            | {"max": float(jitter_ms.max())},
            "overruns": stats.tick_overruns, "steps": len(sink.durations),
            "dropped": sum(recorder.dropped.values()) if recorder else 0, "spooled": spooled, "drained": drained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 s per configuration instead of 30")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    steps = int(HZ * (10 if args.quick else 30))
    load = os.getloadavg()[0]
    results: dict = {"hz": HZ, "camera": f"{HEIGHT}x{WIDTH}x3 JPEG q90", "steps_per_run": steps,
                     "cpus": os.cpu_count(), "load_average_1m": load, "targets_p99_ms": TARGET_P99_MS, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("low-dim", "camera"):
            for path in ("sync", "recorder"):
                results["runs"][f"{kind}/{path}"] = run(kind, path, steps, Path(tmp))
    for kind in ("low-dim", "camera"):
        before, after = results["runs"][f"{kind}/sync"], results["runs"][f"{kind}/recorder"]
        results[f"{kind}_p99_sync_over_recorder"] = before["record_ms"]["p99"] / after["record_ms"]["p99"]
        results[f"{kind}_target_met"] = after["record_ms"]["p99"] <= TARGET_P99_MS[kind]

    print(f"{'run':18} {'record ms p50/p99/max':>24} {'target p99':>10} {'jitter ms p50/p99/max':>24} "
          f"{'overruns':>8} {'dropped':>7} {'spooled':>7}")
    for name, r in results["runs"].items():
        rec, jit = r["record_ms"], r["jitter_ms"]
        target = TARGET_P99_MS[name.split("/")[0]]
        print(f"{name:18} {rec['p50']:>7.3f} {rec['p99']:>7.3f} {rec['max']:>8.2f} {target:>10.1f} "
              f"{jit['p50']:>7.3f} {jit['p99']:>7.3f} {jit['max']:>8.2f} {r['overruns']:>8} {r['dropped']:>7} "
              f"{r['spooled']:>7}")
    for kind in ("low-dim", "camera"):
        print(f"{kind}: record p99 sync / recorder = {results[f'{kind}_p99_sync_over_recorder']:.1f}x, "
              f"target {'met' if results[f'{kind}_target_met'] else 'NOT met'}")
    print(f"{os.cpu_count()} CPUs, load average {load:.1f} at the start: the machine is shared with other jobs, so "
          "tails (p99, max, jitter) are pessimistic; compare runs of the same table.")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
