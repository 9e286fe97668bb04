"""ROS 2 control path: observation -> action latency through DDS, and control-loop jitter.

The edge's real control loop (ControlLoop at 30 Hz, a zero policy so the number is the path and
not a network, the agent's recorder, JPEG-encoding sink and spool) drives, in one run:

* ``ros2``: ``fleet ros2-sim-robot`` as a separate process publishing joint states and one
  480x640 rgb8 camera at 30 Hz, commands as trajectory_msgs/JointTrajectory, through the
  ros2 backend's rclpy node in this process (Fast DDS, localhost). Latency is sensor header
  stamp -> the command computed from it received by the driver process (the driver logs each
  command's header stamp and receive time; the edge remembers which observation each command
  came from); ``edge share`` is stamp -> command published by the edge;
* ``metaworld``: the in-process MetaWorld backend, as a baseline: latency is the observation
  returned by the simulator -> the next action handed to it (no transport).

Jitter is how far each act() call lands from its 30 Hz grid slot (|interval - period|).

    python bench/ros2_latency.py --json bench/results/ros2_latency.json [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.report import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HZ = 30.0
H, W = 480, 640
TASK = "reach the goal"


class TimedRobot:
    """Wraps a Robot: when each act() starts, and when each observation was handed back."""

    def __init__(self, inner):
        self.inner = inner
        self.embodiment, self.schema, self.tasks = inner.embodiment, inner.schema, inner.tasks
        self.act_starts: list[float] = []
        self.obs_ready: list[float] = []
        self.pairs: list[tuple[int, int]] = []  # ros2: (observation stamp, action stamp)
        self.in_episode: list[bool] = []

    def set_evaluation(self, evaluation):
        self.inner.set_evaluation(evaluation)

    def reset(self, task):
        obs = self.inner.reset(task)
        self.obs_ready.append(time.perf_counter())
        self.in_episode.append(False)
        return obs

    def act(self, action):
        self.act_starts.append(time.perf_counter())
        obs = self.inner.act(action)
        self.obs_ready.append(time.perf_counter())
        self.in_episode.append(True)
        if hasattr(self.inner, "last_action_stamp_ns"):
            self.pairs.append((self.inner.last_observation_stamp_ns, self.inner.last_action_stamp_ns))
        return obs

    def observe(self):
        return self.inner.observe()


def percentiles_ms(values) -> dict:
    a = np.asarray(values, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max()), "n": int(a.size)}


def jitter(robot: TimedRobot) -> dict:
    """|interval - period| between consecutive act() starts within an episode."""
    starts = np.asarray(robot.act_starts)
    steps = np.diff(starts)
    steps = steps[(steps < 3 / HZ)]  # leave out the gaps across an episode reset
    return percentiles_ms(np.abs(steps - 1.0 / HZ))


def drive(robot, steps: int, tmp: Path, name: str):
    from edge.hotswap import PolicySlot
    from edge.images import ImageEncodingSink
    from edge.loop import ControlLoop, LoopConfig
    from edge.operator import NoOperator
    from edge.recorder import Recorder
    from edge.spool import Spool
    from fleet.policies.base import NullPolicy

    timed = TimedRobot(robot)
    spool = Spool(tmp / f"{name}.db", robot.schema)
    recorder = Recorder(ImageEncodingSink(spool, robot.schema, "jpeg"), spool.skip, name)  # as edge/agent.py
    recorder.start()
    episode_steps = 150
    loop = ControlLoop(name, timed, PolicySlot(NullPolicy(robot.schema.action.shape, robot.schema.action.dtype)),
                       NoOperator(), recorder,
                       LoopConfig(control_hz=HZ, max_episode_steps=episode_steps,
                                  max_episodes=max(1, steps // episode_steps)))
    loop.start()
    if not loop.wait_episodes(loop.config.max_episodes, timeout_s=steps / HZ * 3 + 60):
        raise RuntimeError(f"{name}: the loop did not finish ({loop.error!r})")
    loop.stop()
    recorder.stop()
    spool.close()
    stats = loop.stats()
    return timed, {"steps": stats.steps, "tick_overruns": stats.tick_overruns,
                   "max_tick_jitter_ms": stats.max_tick_jitter_s * 1e3, "jitter": jitter(timed)}


def run_ros2(steps: int, tmp: Path) -> dict:
    from edge.robots.ros2.robot import Ros2Robot
    from edge.sim.ros2_arm_config import SimArmConfig

    cfg = SimArmConfig(rate_hz=HZ, camera_height=H, camera_width=W, command_type="joint_trajectory",
                       max_episode_steps=100_000)
    stats_path, log_path = tmp / "sim.json", tmp / "sim.log"
    with open(log_path, "wb") as log:
        sim = subprocess.Popen([sys.executable, "-m", "fleet.cli", "ros2-sim-robot", "--rate_hz", str(HZ),
                                "--camera_height", str(H), "--camera_width", str(W), "--command_type",
                                "joint_trajectory", "--max_episode_steps", "100000", "--stats_path", str(stats_path)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        robot = Ros2Robot([TASK], {**cfg.edge_backend_section(), "startup_timeout_s": 60.0, "node_name": "bench_edge"})
        robot.connect()
        try:
            timed, result = drive(robot, steps, tmp, "ros2")
        finally:
            robot.disconnect()
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(30)
    received = dict(json.loads(stats_path.read_text())["command_stamps"])
    e2e = [(received[a] - o) / 1e9 for o, a in timed.pairs if a in received and o > 0]
    edge = [(a - o) / 1e9 for o, a in timed.pairs if o > 0]
    result.update(obs_to_action=percentiles_ms(e2e), edge_share=percentiles_ms(edge),
                  commands_sent=len(timed.pairs), commands_received=len(received))
    return result


def run_metaworld(steps: int, tmp: Path) -> dict:
    from edge.sim.metaworld import MetaWorldRobot

    robot = MetaWorldRobot([TASK], max_episode_steps=150)
    with robot:
        timed, result = drive(robot, steps, tmp, "metaworld")
    # observation handed back -> the next act() with the action chosen from it (same episode)
    ready, starts, latencies, k = timed.obs_ready, timed.act_starts, [], 0
    for i, t in enumerate(ready):
        while k < len(starts) and starts[k] < t:
            k += 1
        if k < len(starts) and i + 1 < len(timed.in_episode) and timed.in_episode[i + 1]:
            latencies.append(starts[k] - t)
    result.update(obs_to_action=percentiles_ms(latencies))
    return result


def print_table(results: dict) -> None:
    rows = [("backend", "obs->action p50", "p99", "jitter p50", "p99", "max", "overruns", "steps")]
    for name in ("ros2", "metaworld"):
        r = results[name]
        rows.append((name, f"{r['obs_to_action']['p50_ms']:.2f} ms", f"{r['obs_to_action']['p99_ms']:.2f} ms",
                     f"{r['jitter']['p50_ms']:.2f} ms", f"{r['jitter']['p99_ms']:.2f} ms",
                     f"{r['jitter']['max_ms']:.2f} ms", str(r["tick_overruns"]), str(r["steps"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    e = results["ros2"]["edge_share"]
    print(f"ros2: stamp -> command published by the edge p50 {e['p50_ms']:.2f} ms, p99 {e['p99_ms']:.2f} ms; "
          f"commands received {results['ros2']['commands_received']}/{results['ros2']['commands_sent']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="control steps per backend (150 per episode)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 200)))
    with tempfile.TemporaryDirectory(prefix="fleet-ros2-bench-") as tmp:
        results = {"control_hz": HZ, "camera": [H, W], "steps": args.steps,
                   "ros2": run_ros2(args.steps, Path(tmp)), "metaworld": run_metaworld(args.steps, Path(tmp)),
                   "hardware": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
                   "rmw": "rmw_fastrtps_cpp (ros-rclpy 7.1.6, Jazzy)"}
    print_table(results)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
