"""What ``fleet demo`` shows while it runs: a live table on a terminal (rich), progress lines otherwise.

One row per robot (policy version, episodes, autonomous success so far and over the last
``RECENT_S`` seconds, operator take-overs and the operator's share of recent steps, spool
backlog, steps/s) and the learner's row (optimizer step, loss, versions published, steps in the
buffer, samples/s). Every number comes from ``cloud.status.fleet_status`` (registrations,
heartbeats, stored counters and the trainer's status, all in Redis) and the robots' episode-end
events the demo already reads. On a terminal the table is redrawn about twice a second; when
stdout is not one (CI, a pipe), a progress line is printed every ``progress_interval_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cloud.status import CONNECTED_WITHIN_S, online_robots

RECENT_S = 120.0
"""Window of the "recent" columns, seconds."""
LIVE_REFRESH_S = 0.5
"""Seconds between redraws of the live table."""


@dataclass
class Snapshot:
    """Everything one frame shows."""

    status: dict
    """``fleet_status`` (robots, trainer, latest policy version)."""
    episodes: list[dict]
    """Episode-end summaries so far (robot_id, evaluation, success, num_steps, intervention_steps, ts)."""
    now_s: float
    elapsed_s: float | None = None
    """Seconds since the fleet started acting (None: still waiting for the first policy)."""
    duration_s: float = 0.0


@dataclass
class RobotRow:
    robot_id: str
    policy_version: int
    episodes: int
    eval_successes: int
    eval_episodes: int
    recent_success: float | None
    recent_eval_episodes: int
    interventions: int
    """Operator take-overs so far."""
    recent_intervention_rate: float | None
    """Share of the last RECENT_S seconds' supervised steps the operator drove."""
    spool_steps: int
    steps_per_s: float
    connected: bool


@dataclass
class LearnerRow:
    step: int
    loss: float | None
    versions_published: int
    buffer_steps: int
    """Steps stored in Redis, all sources (the seeded demonstrations included)."""
    samples_per_s: float


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def robot_rows(snap: Snapshot, recent_s: float = RECENT_S) -> list[RobotRow]:
    by_robot: dict[str, list[dict]] = {}
    for e in snap.episodes:
        by_robot.setdefault(e.get("robot_id", ""), []).append(e)
    rows = []
    for r in online_robots(snap.status):
        eps = by_robot.get(r["robot_id"], [])
        ev = [e for e in eps if e["evaluation"]]
        recent = [e for e in eps if e["ts"] >= snap.now_s - recent_s]
        recent_ev = [e for e in recent if e["evaluation"]]
        recent_op = [e for e in recent if not e["evaluation"]]
        rows.append(RobotRow(
            robot_id=r["robot_id"], policy_version=r["policy_version"], episodes=r["episodes"],
            eval_successes=sum(bool(e["success"]) for e in ev), eval_episodes=len(ev),
            recent_success=_ratio(sum(bool(e["success"]) for e in recent_ev), len(recent_ev)),
            recent_eval_episodes=len(recent_ev), interventions=sum(int(e.get("interventions", 0)) for e in eps),
            recent_intervention_rate=_ratio(sum(e["intervention_steps"] for e in recent_op),
                                            sum(e["num_steps"] for e in recent_op)),
            spool_steps=r["spool_steps"], steps_per_s=r["steps_per_s"], connected=r["connected"]))
    return rows


def learner_row(status: dict) -> LearnerRow:
    t = status.get("trainer") or {}
    loss = float(t["loss"]) if t.get("loss") not in (None, "") else None
    return LearnerRow(step=int(float(t.get("step") or 0)), loss=loss if loss is None or np.isfinite(loss) else None,
                      versions_published=status["latest_policy_version"],
                      buffer_steps=sum(r["steps_stored"] for r in status["robots"]),
                      samples_per_s=float(t.get("samples_per_s") or 0.0))


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _header(snap: Snapshot) -> str:
    if snap.elapsed_s is None:
        return f"waiting for the first policy (seed BC) | latest v{snap.status['latest_policy_version']}"
    return f"{snap.elapsed_s:.0f}s of {snap.duration_s:.0f}s | latest v{snap.status['latest_policy_version']}"


def render(snap: Snapshot, footer: str = ""):
    """The frame: a header line, the robots' table, the learner's table (rich renderables)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    recent = f"last {RECENT_S / 60:.0f}m"

    def table(*columns: str, caption: str = "") -> Table:
        t = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), header_style="bold",
                  caption=caption or None, caption_justify="left")
        for i, name in enumerate(columns):
            t.add_column(name, justify="right" if i else "left", no_wrap=True)
        return t

    robots = table("robot", "policy", "episodes", "success", f"success\n{recent}", "take-\novers",
                   f"operator\n{recent}", "spool", "steps/s", caption=(
                       "success: autonomous, on evaluation episodes; take-overs: operator interventions; operator: "
                       "share of the supervised steps the operator drove; spool: steps not yet acked; a robot in red: "
                       f"no heartbeat for {CONNECTED_WITHIN_S:.0f}s"))
    for row in robot_rows(snap):
        robots.add_row(
            Text(row.robot_id, style="" if row.connected else "red"), f"v{row.policy_version}",
            str(row.episodes), _fmt(_ratio(row.eval_successes, row.eval_episodes)),
            f"{_fmt(row.recent_success)} n={row.recent_eval_episodes}", str(row.interventions),
            _fmt(row.recent_intervention_rate), str(row.spool_steps), f"{row.steps_per_s:.1f}")
    lr = learner_row(snap.status)
    learner = table("learner", "step", "loss", "versions\npublished", "buffer\nsteps", "samples/s")
    learner.add_row("trainer", str(lr.step), _fmt(lr.loss, ".4f"), str(lr.versions_published),
                    str(lr.buffer_steps), f"{lr.samples_per_s:.0f}")
    parts = [Text(_header(snap), style="bold"), robots, learner]
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


def progress_line(snap: Snapshot) -> str:
    """One line for a log or a pipe: the fleet's recent success, take-overs, rates and the learner."""
    rows, lr = robot_rows(snap), learner_row(snap.status)
    recent = [e for e in snap.episodes if e["ts"] >= snap.now_s - RECENT_S]
    ev = [e for e in recent if e["evaluation"]]
    op = [e for e in recent if not e["evaluation"]]
    success = _ratio(sum(bool(e["success"]) for e in ev), len(ev))
    operator = _ratio(sum(e["intervention_steps"] for e in op), sum(e["num_steps"] for e in op))
    versions = " ".join(f"{r.robot_id.rsplit('-', 1)[-1]}:v{r.policy_version}" for r in rows)
    return (f"[{snap.elapsed_s or 0:5.0f}s] latest v{lr.versions_published} | robots {versions} | "
            f"success({RECENT_S / 60:.0f}min) {_fmt(success)} (n={len(ev)}) | operator share {_fmt(operator)} | "
            f"{sum(r.steps_per_s for r in rows):.0f} steps/s | spool {sum(r.spool_steps for r in rows)} | "
            f"{lr.buffer_steps} steps stored | trainer step {lr.step} loss {_fmt(lr.loss, '.4f')}")


@dataclass
class DemoView:
    """Shows snapshots: a rich Live table when ``live``, else a progress line every ``progress_interval_s``.

    ``echo`` prints a line above the table (or as a plain line). Use as a context manager around
    the part of the run that shows frames."""

    live: bool
    progress_interval_s: float = 10.0
    write: Callable[[str], None] = field(default=lambda text: print(text, flush=True))
    footer: str = ""
    """A dim line under the table (where the logs and Prometheus are)."""
    _console: object = None
    _live: object = None
    _last_line_s: float = float("-inf")

    @classmethod
    def for_stdout(cls, progress_interval_s: float) -> DemoView:
        """Live when stdout is a terminal (not a dumb one), plain lines otherwise."""
        from rich.console import Console

        console = Console()
        view = cls(live=console.is_terminal and not console.is_dumb_terminal, progress_interval_s=progress_interval_s)
        view._console = console
        return view

    @property
    def poll_s(self) -> float:
        """How often the caller should take a snapshot."""
        return LIVE_REFRESH_S if self.live else self.progress_interval_s

    def echo(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.write(text)

    def show(self, snap: Snapshot) -> None:
        if self._live is not None:
            self._live.update(render(snap, self.footer), refresh=True)
        elif not self.live and snap.elapsed_s is not None and (
                time.monotonic() - self._last_line_s >= self.progress_interval_s - 1e-3):
            self._last_line_s = time.monotonic()
            self.write(progress_line(snap))

    def __enter__(self) -> DemoView:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._console = self._console or Console()
            self._live = Live(console=self._console, auto_refresh=False, transient=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
