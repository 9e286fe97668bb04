"""The gateway's configuration and the security settings of both ends of the robot link.

``GatewayConfig`` (with its ``GatewaySecurity`` and ``RetentionConfig``) is what ``fleet gateway`` parses;
``ClientSecurity`` is the robot's half of the same TLS / token / signed-policy setup. Shared core: the
edge and the cloud both import it; it imports neither. Conventions: ``fleet/config.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fleet.config import require
from fleet.errors import ConfigError


@dataclass(frozen=True)
class GatewaySecurity:
    """TLS, mutual TLS, robot tokens and per-robot limits on the gateway (see docs/deploy.md)."""

    tls_cert_file: str = ""
    """PEM certificate chain the gateway presents (TLS on when set, with tls_key_file)."""
    tls_key_file: str = ""
    """PEM private key of tls_cert_file."""
    client_ca_file: str = ""
    """PEM CA bundle robot certificates must chain to; when set, mutual TLS is required."""
    token_key_file: str = ""
    """Hex secret that signs robot tokens (`fleet certs`); when set, every call needs a valid token."""
    revocation_refresh_s: float = 5.0
    """How often the set of revoked token ids is re-read from Redis, seconds."""
    robot_max_streams: int = 2
    """Experience streams one robot may hold open at once on one gateway (0 = unlimited)."""
    robot_max_steps_per_s: float = 10_000.0
    """Steps per second accepted from one robot before its stream is slowed down (0 = unlimited; the default
    lets a 30 Hz robot catch up on an hour of spool in about 11 s)."""
    robot_max_bytes_per_s: float = 64e6
    """Step bytes per second accepted from one robot before its stream is slowed down (0 = unlimited)."""
    robot_max_policy_streams: int = 2
    """WatchPolicy streams one robot may hold open at once on one gateway (0 = unlimited)."""

    def __post_init__(self) -> None:
        require(bool(self.tls_cert_file) == bool(self.tls_key_file),
                 f"tls_cert_file ({self.tls_cert_file!r}) and tls_key_file ({self.tls_key_file!r}) go together")
        require(not self.client_ca_file or bool(self.tls_cert_file),
                 f"client_ca_file ({self.client_ca_file!r}) needs tls_cert_file: mutual TLS is TLS first")
        require(self.revocation_refresh_s > 0, f"revocation_refresh_s ({self.revocation_refresh_s}) must be > 0")
        require(self.robot_max_streams >= 0, f"robot_max_streams ({self.robot_max_streams}) must be >= 0")
        require(self.robot_max_policy_streams >= 0,
                 f"robot_max_policy_streams ({self.robot_max_policy_streams}) must be >= 0")
        require(self.robot_max_steps_per_s >= 0, f"robot_max_steps_per_s ({self.robot_max_steps_per_s}) must be >= 0")
        require(self.robot_max_bytes_per_s >= 0, f"robot_max_bytes_per_s ({self.robot_max_bytes_per_s}) must be >= 0")


@dataclass(frozen=True)
class ClientSecurity:
    """How a robot proves who it is to the gateway and which policies it trusts (all empty = plaintext, no
    token, unauthenticated policies: development only)."""

    ca_file: str = ""
    """PEM CA bundle that verifies the gateway's certificate (TLS on when set)."""
    cert_file: str = ""
    """PEM certificate of this robot (mutual TLS), with key_file."""
    key_file: str = ""
    """PEM private key of cert_file."""
    token_file: str = ""
    """File holding this robot's token (e.g. a systemd credential); sent on every call."""
    server_name: str = ""
    """Expected name in the gateway's certificate when it differs from the gateway host."""
    policy_public_key_files: tuple[str, ...] = ()
    """PEM files of the publisher's Ed25519 public keys (two during a rotation); when set, unsigned versions are refused."""

    def __post_init__(self) -> None:
        keys = self.policy_public_key_files
        if isinstance(keys, str):  # a config file's "a.pub" or "a.pub,b.pub"
            keys = tuple(p for p in keys.split(",") if p)
        require(isinstance(keys, (list, tuple)) and all(isinstance(p, str) and p for p in keys),
                 f"policy_public_key_files must be a list of file names, got {self.policy_public_key_files!r}")
        object.__setattr__(self, "policy_public_key_files", tuple(keys))
        require(bool(self.cert_file) == bool(self.key_file),
                 f"cert_file ({self.cert_file!r}) and key_file ({self.key_file!r}) go together")
        require(not self.cert_file or bool(self.ca_file), "cert_file needs ca_file: mutual TLS is TLS first")


TIERS = ("online", "intervention", "offline")
"""Retention tiers: plain online episodes, online episodes with operator steps, offline demonstrations."""


@dataclass(frozen=True)
class RetentionConfig:
    """Retention of the experience buffer (cloud/retention.py, docs/storage.md). Every limit: 0 = none."""

    max_bytes: int = 0
    """Whole buffer: Redis bytes + blob-store bytes of every episode."""
    redis_max_bytes: int = 0
    """Redis bytes of every episode (Redis memory is the scarce, expensive part; Redis's used_memory when known)."""
    robot_max_bytes: int = 0
    """Each robot's episodes (Redis + blob bytes)."""
    task_max_bytes: int = 0
    """Each task's episodes (Redis + blob bytes)."""
    online_max_age_s: float = 0.0
    """Online episodes without operator steps are evicted this long after their last write."""
    intervention_max_age_s: float = 0.0
    """Online episodes with operator steps are evicted this long after their last write."""
    offline_max_age_s: float = 0.0
    """Offline demonstrations are evicted this long after their last write."""
    eviction_order: tuple[str, ...] = TIERS
    """Tiers in the order byte budgets evict them (every tier once; the last is kept longest)."""
    low_watermark: float = 0.9
    """Over a byte budget, evict down to this fraction of it (batches instead of one episode per write)."""
    open_episode_grace_s: float = 3600.0
    """An unfinished episode is kept while written within this; after it, it counts as abandoned."""
    archive_dir: str = ""
    """Write evicted episodes to a LeRobotDataset v3 under this directory before deleting them ("" = no)."""
    archive_tiers: tuple[str, ...] = TIERS
    """Tiers whose evicted episodes are archived (with archive_dir)."""
    interval_s: float = 30.0
    """Seconds between retention passes."""

    def __post_init__(self) -> None:
        for name in ("max_bytes", "redis_max_bytes", "robot_max_bytes", "task_max_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"retention.{name} ({value!r}) must be a whole number of bytes >= 0 (0 = no limit)")
        for name in ("online_max_age_s", "intervention_max_age_s", "offline_max_age_s", "open_episode_grace_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"retention.{name} ({value!r}) must be a finite number of seconds >= 0")
        if sorted(self.eviction_order) != sorted(TIERS):
            raise ConfigError(f"retention.eviction_order ({list(self.eviction_order)}) must name each of "
                              f"{list(TIERS)} once")
        unknown = set(self.archive_tiers) - set(TIERS)
        if unknown:
            raise ConfigError(f"retention.archive_tiers: unknown tier(s) {sorted(unknown)}; tiers: {list(TIERS)}")
        if not 0.0 < self.low_watermark <= 1.0:
            raise ConfigError(f"retention.low_watermark ({self.low_watermark}) must be in (0, 1]")
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise ConfigError(f"retention.interval_s ({self.interval_s}) must be > 0")

    def max_age_s(self, tier: str) -> float:
        return getattr(self, f"{tier}_max_age_s")

    @property
    def enabled(self) -> bool:
        """Whether any budget is set (else retention keeps everything and need not run)."""
        return any((self.max_bytes, self.redis_max_bytes, self.robot_max_bytes, self.task_max_bytes,
                    self.online_max_age_s, self.intervention_max_age_s, self.offline_max_age_s))


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway: gRPC in front of the Redis buffer and the policy store."""

    listen: str = "127.0.0.1:50051"
    """host:port to listen on ("[::]:50051" for all interfaces; port 0 picks a free one)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the buffer (AOF on)."""
    blob_url: str = ""
    """Blob store for camera frames (file:///abs/dir, a path, or s3://bucket/prefix?endpoint=...); "" = frames
    ride inline in Redis (tests, tiny demos). The trainer's blob_url must name the same store."""
    buffer_codec: str = "zstd"
    """Compression of the low-dim columns in Redis: zstd, lz4 or raw (used for a chunk only when it saves at least a tenth)."""
    policy_dir: str = "runs/default/policies"
    """Policy store directory (shared with the trainer: local disk or a shared volume)."""
    embodiment: str = ""
    """Serve the policy line of this embodiment (its trainer's --embodiment); "" = the shared line."""
    metrics_port: int = 0
    """Port for Prometheus /metrics (0 = off)."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest gRPC message accepted or sent, bytes."""
    max_connection_age_s: int = 600
    """Connections are recycled after this long so load balancers can rebalance long-lived streams."""
    redis_timeout_s: float = 10.0
    """Socket timeout for Redis calls."""
    shutdown_grace_s: float = 5.0
    """On SIGTERM, in-flight RPCs get this long to finish."""
    max_inflight_bytes: int = 256 * 1024 * 1024
    """Chunk bytes held in flight (received, not yet acked) over all robots; more waits, then RESOURCE_EXHAUSTED."""
    robot_max_inflight_bytes: int = 32 * 1024 * 1024
    """Chunk bytes held in flight for one robot (over all its streams)."""
    max_experience_streams: int = 2048
    """Experience streams open at once on this gateway; more get RESOURCE_EXHAUSTED (bounds memory)."""
    inflight_wait_s: float = 5.0
    """How long a chunk waits for in-flight room (the sender is slowed meanwhile) before RESOURCE_EXHAUSTED."""
    retry_after_s: float = 1.0
    """Retry hint (trailing metadata fleet-retry-after-s) sent with RESOURCE_EXHAUSTED and UNAVAILABLE."""
    redis_full_retry_after_s: float = 10.0
    """Retry hint when Redis refuses writes at maxmemory (noeviction): nothing is dropped, robots spool meanwhile."""
    health_listen: str = ""
    """Extra plaintext host:port serving only grpc.health.v1 (for kubelet probes when TLS is on; "" = off)."""
    policy_cache_bytes: int = 4 * 1024**3
    """Encoded policy transfers (full and delta) kept for robots, bytes (the newest is kept whatever its size)."""
    weights_listen: str = ""
    """host:port of the weight side channel (plaintext TCP + sendfile for WatchPolicy ticket holders; port 0 = a
    free one; "" = off; refused with TLS; docs/policy-distribution.md)."""
    weights_ticket_s: float = 30.0
    """How long a side-channel ticket stays valid, seconds (each is single use)."""
    security: GatewaySecurity = field(default_factory=GatewaySecurity)
    """TLS, mutual TLS, robot tokens and per-robot limits."""
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    """Byte and age budgets of the buffer; with any budget set this gateway runs retention passes (one gateway
    at a time holds the lease)."""
    insecure: bool = False
    """Serve a non-loopback listen without TLS and robot tokens (protected mode off; development only)."""

    def __post_init__(self) -> None:
        require(":" in self.listen, f"listen must be host:port, got {self.listen!r}")
        require(self.max_message_bytes >= 1 << 20, f"max_message_bytes ({self.max_message_bytes}) must be >= 1 MiB")
        require(self.max_connection_age_s > 0, f"max_connection_age_s ({self.max_connection_age_s}) must be > 0")
        require(0 < self.robot_max_inflight_bytes <= self.max_inflight_bytes,
                 f"robot_max_inflight_bytes ({self.robot_max_inflight_bytes}) must be in (0, max_inflight_bytes "
                 f"({self.max_inflight_bytes})]")
        require(self.max_experience_streams > 0, f"max_experience_streams ({self.max_experience_streams}) must be > 0")
        require(self.policy_cache_bytes >= 0, f"policy_cache_bytes ({self.policy_cache_bytes}) must be >= 0")
        require(self.inflight_wait_s >= 0, f"inflight_wait_s ({self.inflight_wait_s}) must be >= 0")
        require(self.retry_after_s > 0, f"retry_after_s ({self.retry_after_s}) must be > 0")
        require(self.redis_full_retry_after_s > 0,
                 f"redis_full_retry_after_s ({self.redis_full_retry_after_s}) must be > 0")
        require(self.buffer_codec in ("zstd", "lz4", "raw"),
                f"buffer_codec ({self.buffer_codec!r}) must be zstd, lz4 or raw")
        require(not self.weights_listen or ":" in self.weights_listen,
                 f"weights_listen must be host:port or empty, got {self.weights_listen!r}")
        require(not (self.weights_listen and self.security.tls_cert_file),
                 f"weights_listen ({self.weights_listen!r}) serves plaintext TCP and this gateway uses TLS: the "
                 "weights would leave the encrypted channel. Unset weights_listen (they then go over gRPC with TLS)")
        require(self.weights_ticket_s > 0, f"weights_ticket_s ({self.weights_ticket_s}) must be > 0")
        require(not self.health_listen or ":" in self.health_listen,
                 f"health_listen must be host:port or empty, got {self.health_listen!r}")
