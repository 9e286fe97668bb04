"""The operators service's configuration (``fleet operators``; conventions: fleet/config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from cloud.operators.allocator import POLICIES
from cloud.operators.console import console_refusal
from fleet.config import require
from fleet.names import is_id

OPERATOR_KINDS = ("human", "sim")


def operator_ids(spec: str) -> list[str]:
    """``"3"`` -> operator-1..operator-3; ``"alice,bob"`` -> those names (ValueError if neither)."""
    spec = spec.strip()
    if spec.isdigit():
        return [f"operator-{i + 1}" for i in range(int(spec))]
    names = [n.strip() for n in spec.split(",")]
    bad = [n for n in names if not is_id(n)]
    if bad:
        raise ValueError(f"operator names must be ids (letters, digits, '._:-'), got {bad!r}")
    return names


@dataclass(frozen=True)
class OperatorsConfig:
    """M human operators (or simulated stand-ins) shared by the fleet's robots: who helps which robot now."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the robots' heartbeats (their help signal) and the assignments."""
    operators: str = "1"
    """How many operators (M: operator-1..operator-M), or their names, comma-separated ("alice,bob")."""
    kind: str = "human"
    """What the operators are: human (at the console) or sim (scripted stand-ins on the robots, the demo's)."""
    policy: str = "priority"
    """Who gets an operator: priority (Fleet-DAgger: holding, then risk, then need score), round_robin or random."""
    min_hold_s: float = 5.0
    """An automatic assignment lasts at least this long, seconds (control does not flap)."""
    period_s: float = 0.25
    """How often the needs are read and the operators (re)assigned, seconds."""
    stale_after_s: float = 10.0
    """Robots whose last heartbeat is older than this get no operator (and lose an automatic one), seconds."""
    wait_alert_s: float = 60.0
    """A robot wanting help this long without an operator fires FleetRobotWaitingForOperator, seconds."""
    seed: int = 0
    """Seed of the random policy."""
    console_listen: str = ""
    """host:port of the operator console (web page; "127.0.0.1:0" = a free port); "" = no console."""
    console_insecure: bool = False
    """Let the console listen beyond loopback (plain HTTP; take-over moves robots): trusted networks only."""
    console_token_file: str = ""
    """File holding a bearer token every console API call must carry ("" = none; the page reads #token=...)."""
    metrics_port: int = 0
    """Port for Prometheus /metrics (0 = off)."""

    def operator_ids(self) -> list[str]:
        return operator_ids(self.operators)

    def __post_init__(self) -> None:
        try:
            ids = self.operator_ids()
        except ValueError as exc:
            require(False, f"operators ({self.operators!r}): {exc}")
        require(len(ids) >= 1, f"operators ({self.operators!r}) must be a count >= 1 or names")
        require(len(set(ids)) == len(ids), f"operators ({self.operators!r}) must not repeat a name")
        require(self.kind in OPERATOR_KINDS, f"kind must be one of {', '.join(OPERATOR_KINDS)}, got {self.kind!r}")
        require(self.policy in POLICIES, f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        require(self.min_hold_s >= 0, f"min_hold_s ({self.min_hold_s}) must be >= 0")
        require(self.period_s > 0, f"period_s ({self.period_s}) must be > 0")
        require(self.stale_after_s > 0, f"stale_after_s ({self.stale_after_s}) must be > 0")
        require(self.wait_alert_s > 0, f"wait_alert_s ({self.wait_alert_s}) must be > 0")
        require(0 <= self.metrics_port <= 65535, f"metrics_port ({self.metrics_port}) must be in [0, 65535]")
        if self.console_listen:  # a bad address or a non-loopback one without console_insecure: exit 2 up front
            refusal = console_refusal(self.console_listen, self.console_insecure)
            require(refusal is None, refusal or "")
