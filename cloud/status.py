"""The fleet as seen from Redis: one row per robot and one window summary per task.

What ``fleet status`` prints and what the trainer exports as fleet-level Prometheus
metrics (``cloud/fleet_metrics.py``). Everything comes from Redis alone:

- robots: the registration (``fleet:robots``), the last heartbeat (``fleet:{r:R}:status``,
  written by the gateway) and the stored-data counters (``fleet:{r:R}:stats``, written by
  the ingest Lua script in the same atomic step as the data);
- tasks: the episode-end events (``fleet:{r:R}:events``) of the last ``window_s`` seconds,
  read by stream id (a millisecond timestamp), so the cost is bounded by the window.

Per task over the window: autonomous success ratio (evaluation episodes, no operator),
intervention ratio (operator-driven share of the steps of supervised episodes), human
effort (intervention steps) and Return on Human Effort, successes / (1 + intervention
steps) as in Fleet-DAgger (the 1 keeps it finite when nobody intervened).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from cloud.buffer import POLICY_LATEST_KEY, SOURCE_ONLINE
from cloud.buffer.reader import BufferReader, status_number as _num
from fleet.types import EpisodeCounts

CONNECTED_WITHIN_S = 10.0
"""A robot whose last heartbeat is older than this is shown as disconnected."""
WINDOW_S = 600.0
"""Default window of the per-task summary, seconds."""
TRAINER_STATUS_KEY = "fleet:trainer:status"


def _dec(d: dict) -> dict:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in d.items()}


@dataclass
class TaskWindow(EpisodeCounts):
    """Episode outcomes of one task over the window (online robots only; offline demos excluded)."""

    task: str = ""
    steps: int = 0
    """Steps of supervised (non-evaluation) episodes."""
    intervention_steps: int = 0
    """Human effort: steps the operator drove."""
    interventions: int = 0

    def add(self, summary: dict) -> None:
        evaluation = bool(summary.get("evaluation"))
        self.count_episode(bool(summary.get("success")), evaluation)
        if not evaluation:
            self.steps += int(summary.get("num_steps", 0))
            self.intervention_steps += int(summary.get("intervention_steps", 0))
            self.interventions += int(summary.get("interventions", 0))

    @property
    def intervention_ratio(self) -> float | None:
        return self.intervention_steps / self.steps if self.steps else None

    @property
    def return_on_human_effort(self) -> float:
        """Successes (all episodes) per intervention step: successes / (1 + intervention steps)."""
        return self.successes / (1 + self.intervention_steps)

    def to_dict(self) -> dict:
        return {**asdict(self), "autonomous_success_ratio": self.autonomous_success_ratio,
                "supervised_success_ratio": self.supervised_success_ratio,
                "intervention_ratio": self.intervention_ratio,
                "return_on_human_effort": self.return_on_human_effort}


def task_windows(redis, robot_ids: list[str], window_s: float, now_s: float) -> dict[str, TaskWindow]:
    """Per task, the episodes that ended in the last ``window_s`` seconds on ``robot_ids``."""
    start_id = f"{max(int((now_s - window_s) * 1000), 0)}-0"
    pipe, reader = redis.pipeline(transaction=False), BufferReader(redis)
    for rid in robot_ids:
        reader.queue_events(pipe, rid, start_id)
    out: dict[str, TaskWindow] = {}
    for entries in pipe.execute() if robot_ids else []:
        for _, fields in entries:
            fields = _dec(fields)
            try:
                summary = json.loads(fields.get("summary") or "{}")
            except json.JSONDecodeError:
                continue
            task = summary.get("task") or fields.get("task", "")
            out.setdefault(task, TaskWindow(task=task)).add(summary)
    return out


def fleet_status(redis, window_s: float = WINDOW_S, now_s: float | None = None) -> dict:
    """{"latest_policy_version", "trainer", "robots": [...], "tasks": {...}, "window_s"} from Redis alone."""
    latest = int(redis.get(POLICY_LATEST_KEY) or 0)
    robots = []
    now = time.time() if now_s is None else now_s
    registrations = {(k.decode() if isinstance(k, bytes) else k): json.loads(v)
                     for k, v in BufferReader(redis).registrations_raw().items()}
    pipe, reader = redis.pipeline(transaction=False), BufferReader(redis)
    ids = sorted(registrations)
    for rid in ids:
        reader.queue_robot_state(pipe, rid)
    replies = pipe.execute() if ids else []
    for i, rid in enumerate(ids):
        reg = registrations[rid]
        status, stats, seq = _dec(replies[3 * i]), _dec(replies[3 * i + 1]), replies[3 * i + 2]
        last_seen = _num(status.get("last_seen_s"))
        version = int(_num(status.get("policy_version")))
        robots.append({
            "robot_id": rid,
            "source": reg.get("source", SOURCE_ONLINE),
            "embodiment": reg.get("embodiment", ""),
            "task": status.get("task", ""),
            "state": status.get("state", ""),
            "connected": bool(last_seen) and now - last_seen < CONNECTED_WITHIN_S,
            "last_seen_s": last_seen,
            "policy_version": version,
            "version_lag": max(latest - version, 0) if last_seen else None,
            "steps_per_s": _num(status.get("steps_per_s")),
            "intervention_rate": _num(status.get("intervention_rate")),
            "spool_steps": int(_num(status.get("spool_steps"))),
            "spool_bytes": int(_num(status.get("spool_bytes"))),
            "steps_stored": int(stats.get("steps", 0)),
            "intervention_steps_stored": int(stats.get("intervention_steps", 0)),
            "bytes_stored": int(stats.get("bytes", 0)),
            "dropped_steps": int(stats.get("dropped_steps", 0)),
            "episodes": int(stats.get("episodes", 0)),
            "successes": int(stats.get("successes", 0)),
            "last_acked_seq": int(seq or 0),
        })
    online = [r["robot_id"] for r in robots if r["source"] == SOURCE_ONLINE]
    tasks = task_windows(redis, online, window_s, now)
    trainer = _dec(redis.hgetall(TRAINER_STATUS_KEY))
    return {"latest_policy_version": latest, "trainer": trainer, "robots": robots, "window_s": window_s,
            "tasks": {t: w.to_dict() for t, w in sorted(tasks.items())}}


def online_robots(status: dict) -> list[dict]:
    """The fleet's robots (offline-data sources such as seeded demonstrations left out)."""
    return [r for r in status["robots"] if r["source"] == SOURCE_ONLINE]


def _bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f}B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f}{unit}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def format_table(status: dict) -> str:
    """The terminal table: a header line, one row per robot, one row per task."""
    cols = [("robot", "robot_id", "{}"), ("embodiment", "embodiment", "{}"), ("task", "task", "{}"),
            ("conn", "connected", "{}"), ("ver", "policy_version", "{}"), ("lag", "version_lag", "{}"),
            ("steps/s", "steps_per_s", "{:.1f}"), ("interv", "intervention_rate", "{:.2f}"),
            ("spool", "spool_steps", "{}"), ("spool_bytes", "spool_bytes", None), ("stored", "steps_stored", "{}"),
            ("eps", "episodes", "{}")]
    rows = [[h for h, _, _ in cols]]
    for r in online_robots(status):
        rows.append([("-" if r[k] is None else _bytes(r[k]) if f is None else f.format(r[k])) for _, k, f in cols])
    t = status.get("trainer") or {}
    head = f"latest policy v{status['latest_policy_version']}"
    if t:
        head += f" | trainer step {t.get('step', '?')} loss {_num(t.get('loss'), float('nan')):.4f}"
    lines = [head, *_grid(rows)]
    tasks = status.get("tasks") or {}
    if tasks:
        trows = [["task", "episodes", "autonomous_success", "intervention_ratio", "human_effort_steps", "rohe"]]
        for name, w in tasks.items():
            trows.append([name, str(w["episodes"]), _ratio(w["autonomous_success_ratio"]),
                          _ratio(w["intervention_ratio"]), str(w["intervention_steps"]),
                          f"{w['return_on_human_effort']:.4f}"])
        lines += ["", f"last {status['window_s']:.0f}s by task (rohe: successes per intervention step)",
                  *_grid(trows)]
    return "\n".join(lines)


def run_status(redis, as_json: bool, watch: bool, interval_s: float, window_s: float, stop: threading.Event,
               write: Callable[[str], None]) -> int:
    """Write the table (or the JSON list of robots) once, or every ``interval_s`` until ``stop``; returns frames."""
    frames = 0
    while True:
        status = fleet_status(redis, window_s)
        if as_json:
            write(json.dumps(online_robots(status)))
        else:
            write(("\033[2J\033[H" if watch else "") + format_table(status))
        frames += 1
        if not watch or stop.wait(interval_s):
            return frames
