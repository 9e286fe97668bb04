"""One robot's edge agent config (``fleet edge``): parsed and checked before anything heavy (torch, the policy,
the robot) is imported, so a bad config exits 2 at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge.help import HelpConfig
from edge.loop import LoopConfig
from edge.operator import OperatorConfig
from edge.robots.config import BackendConfig, MetaWorldConfig
from edge.safety import SafetyConfig
from edge.spool import SpoolConfig
from edge.streamer import StreamerConfig
from fleet.config import DEFAULT_TASKS, require
from fleet.gateway_config import ClientSecurity
from fleet.netaddr import is_loopback


@dataclass(frozen=True)
class EdgeConfig:
    """One robot's edge agent: robot -> control loop -> spool -> streamer -> gateway, updater -> hot-swap."""

    robot_id: str = "robot-0"
    """Unique id of this robot in the fleet."""
    gateway: str = "127.0.0.1:50051"
    """host:port of the cloud gateway (or its load balancer)."""
    backend: BackendConfig = field(default_factory=MetaWorldConfig)
    """The robot: --backend.type=metaworld (simulation), lerobot (LeRobot's --backend.robot.* and
    --backend.teleop.*) or ros2 (topics, joints, cameras: a config file), each with its own fields (docs/robots.md)."""
    image_encoding: str = "jpeg"
    """How camera frames travel and are stored: jpeg (small, lossy) or png (lossless)."""
    tasks: tuple[str, ...] = DEFAULT_TASKS
    """Tasks this robot does (language instructions, or MetaWorld env names)."""
    state_dir: str = "runs/default/edge/robot-0"
    """Where the spool and the last good policy live on the robot's disk."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """The control loop: rate, episode length, evaluation episodes, task order."""
    recorder_max_steps: int = 64
    """Steps the control loop may hand over before they are encoded and spooled (about 2 s at 30 Hz; raw frames
    in memory: 64 x 0.9 MB per 480x640 camera); when full, the oldest non-intervention step is dropped (a gap)."""
    interventions: bool = True
    """Interventions on: the simulated operator (metaworld) or the teleoperator / intervention topic."""
    operator: OperatorConfig = field(default_factory=OperatorConfig)
    """Who may take over (allocation: own or allocated, and the hold while waiting) and the gating rule of the
    simulated operator (backend metaworld)."""
    help_signal: HelpConfig = field(default_factory=HelpConfig)
    """The need-for-help score (threshold, weights) and the heartbeat interval while help is wanted or an operator
    is assigned (docs/operators.md)."""
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    """The on-disk spool of steps not yet acked by the cloud."""
    streamer: StreamerConfig = field(default_factory=StreamerConfig)
    """How the spool is streamed to the gateway (window, chunk size, ack timeout, backoff)."""
    duration_s: float = 0.0
    """Stop after this many seconds (0 = run until SIGINT/SIGTERM)."""
    first_policy_timeout_s: float = 600.0
    """How long to wait for a first policy when none is on local disk."""
    heartbeat_interval_s: float = 2.0
    """Seconds between heartbeats to the gateway."""
    metrics_port: int = 0
    """Port for Prometheus /metrics (0 = off)."""
    torch_threads: int = 1
    """torch.set_num_threads for policy inference."""
    policy_max_bytes: int = 2 * 1024**3
    """Largest policy version accepted (dtype size x shape of every tensor), checked before allocating anything."""
    policy_architecture_file: str = ""
    """JSON pin of the policy architecture; "" = pin the first accepted version's in state_dir (docs/policy-distribution.md)."""
    security: ClientSecurity = field(default_factory=ClientSecurity)
    """TLS/mutual TLS files and the robot's token file (see docs/deploy.md)."""
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    """Limits on every action sent to the robot (policy, operator, teleoperator): docs/robots.md."""
    insecure: bool = False
    """Talk to a non-loopback gateway without TLS (plaintext: trusted networks and development only)."""

    MOVED_KEYS = {"lerobot": 'backend, with "type: lerobot" and its robot/teleop (docs/robots.md)',
                  "ros2": 'backend, with "type: ros2" and its topics (docs/robots.md)',
                  "seed": "backend.seed (backend.type=metaworld)"}
    """Keys of older config files and where their content lives now (named in the error)."""

    def __post_init__(self) -> None:
        require(bool(self.robot_id), "robot_id must not be empty")
        require(":" in self.gateway, f"gateway must be host:port, got {self.gateway!r}")
        require(isinstance(self.backend, BackendConfig),
                f"backend must be a backend config (--backend.type=...), got {self.backend!r}")
        require(self.image_encoding in ("jpeg", "png"),
                 f"image_encoding must be jpeg or png, got {self.image_encoding!r}")
        require(self.recorder_max_steps >= 1, f"recorder_max_steps ({self.recorder_max_steps}) must be >= 1")
        require(self.duration_s >= 0, f"duration_s ({self.duration_s}) must be >= 0")
        require(self.policy_max_bytes > 0, f"policy_max_bytes ({self.policy_max_bytes}) must be > 0")


TLS_FLAGS = ("--security.ca_file", "--security.cert_file", "--security.key_file", "--security.token_file")
"""What an edge talking to a gateway beyond loopback uses (TLS at least: ca_file), unless ``--insecure``."""


def plaintext_refusal(cfg: EdgeConfig) -> str | None:
    """The one-line reason to refuse ``cfg`` (a non-loopback gateway without TLS), else None: the robot's
    token and its experience would cross the network in the clear (the gateway's protected mode, mirrored)."""
    if is_loopback(cfg.gateway) or cfg.security.ca_file:
        return None
    return (f"refusing to connect to the gateway {cfg.gateway} (not loopback) without TLS: set {TLS_FLAGS[0]} "
            f"(and {', '.join(TLS_FLAGS[1:])} for mutual TLS and a robot token), or pass --insecure to talk "
            "plaintext anyway (development only)")
