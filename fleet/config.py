"""Typed configuration, one dataclass per process, and the CLI built from them.

Every field has a one-line docstring right under it (CleanRL style); that line
becomes its ``--help`` text. Nested dataclasses flatten with dots
(``--policy.chunk-size 10``); dashes and underscores are interchangeable.
Values are validated in ``__post_init__`` with the bad value in the message.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass, field
from functools import lru_cache

from fleet.errors import ConfigError

ALGORITHM_NAMES = ("hg_dagger", "recap")
DEFAULT_TASKS = ("reach the goal", "press the button from the top", "close the drawer")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (parsed from the class source)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


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
        _require(bool(self.tls_cert_file) == bool(self.tls_key_file),
                 f"tls_cert_file ({self.tls_cert_file!r}) and tls_key_file ({self.tls_key_file!r}) go together")
        _require(not self.client_ca_file or bool(self.tls_cert_file),
                 f"client_ca_file ({self.client_ca_file!r}) needs tls_cert_file: mutual TLS is TLS first")
        _require(self.revocation_refresh_s > 0, f"revocation_refresh_s ({self.revocation_refresh_s}) must be > 0")
        _require(self.robot_max_streams >= 0, f"robot_max_streams ({self.robot_max_streams}) must be >= 0")
        _require(self.robot_max_policy_streams >= 0,
                 f"robot_max_policy_streams ({self.robot_max_policy_streams}) must be >= 0")
        _require(self.robot_max_steps_per_s >= 0, f"robot_max_steps_per_s ({self.robot_max_steps_per_s}) must be >= 0")
        _require(self.robot_max_bytes_per_s >= 0, f"robot_max_bytes_per_s ({self.robot_max_bytes_per_s}) must be >= 0")


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
        _require(isinstance(keys, (list, tuple)) and all(isinstance(p, str) and p for p in keys),
                 f"policy_public_key_files must be a list of file names, got {self.policy_public_key_files!r}")
        object.__setattr__(self, "policy_public_key_files", tuple(keys))
        _require(bool(self.cert_file) == bool(self.key_file),
                 f"cert_file ({self.cert_file!r}) and key_file ({self.key_file!r}) go together")
        _require(not self.cert_file or bool(self.ca_file), "cert_file needs ca_file: mutual TLS is TLS first")


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
    security: GatewaySecurity = field(default_factory=GatewaySecurity)
    """TLS, mutual TLS, robot tokens and per-robot limits."""
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    """Byte and age budgets of the buffer; with any budget set this gateway runs retention passes (one gateway
    at a time holds the lease)."""

    def __post_init__(self) -> None:
        _require(":" in self.listen, f"listen must be host:port, got {self.listen!r}")
        _require(self.max_message_bytes >= 1 << 20, f"max_message_bytes ({self.max_message_bytes}) must be >= 1 MiB")
        _require(self.max_connection_age_s > 0, f"max_connection_age_s ({self.max_connection_age_s}) must be > 0")
        _require(0 < self.robot_max_inflight_bytes <= self.max_inflight_bytes,
                 f"robot_max_inflight_bytes ({self.robot_max_inflight_bytes}) must be in (0, max_inflight_bytes "
                 f"({self.max_inflight_bytes})]")
        _require(self.max_experience_streams > 0, f"max_experience_streams ({self.max_experience_streams}) must be > 0")
        _require(self.policy_cache_bytes >= 0, f"policy_cache_bytes ({self.policy_cache_bytes}) must be >= 0")
        _require(self.inflight_wait_s >= 0, f"inflight_wait_s ({self.inflight_wait_s}) must be >= 0")
        _require(self.retry_after_s > 0, f"retry_after_s ({self.retry_after_s}) must be > 0")
        _require(self.redis_full_retry_after_s > 0,
                 f"redis_full_retry_after_s ({self.redis_full_retry_after_s}) must be > 0")
        _require(self.buffer_codec in ("zstd", "lz4", "raw"),
                 f"buffer_codec ({self.buffer_codec!r}) must be zstd, lz4 or raw")
        _require(not self.health_listen or ":" in self.health_listen,
                 f"health_listen must be host:port or empty, got {self.health_listen!r}")


def _parse_value(text: str, annotation: typing.Any):
    origin = typing.get_origin(annotation)
    if annotation is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    if origin is tuple:
        return tuple(s.strip() for s in text.split(",") if s.strip())
    if annotation in (int, float, str):
        return annotation(text)
    return text


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                       renames: dict[str, str] | None = None) -> None:
    """Add one ``--option`` per field of ``cls`` (recursively for nested dataclasses)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    renames = renames or {}
    for f in dataclasses.fields(cls):
        ann = hints[f.name]
        dest = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(ann):
            add_dataclass_args(parser, ann, prefix=f"{dest}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(default) if isinstance(default, tuple) else default
        flag = renames.get(f.name, dest.replace("_", "-"))
        names = {f"--{flag}", f"--{dest}"}
        parser.add_argument(*sorted(names, key=len, reverse=True), dest=dest, default=argparse.SUPPRESS,
                            type=lambda s, a=ann: _parse_value(s, a), metavar=_metavar(ann),
                            help=f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%"))  # argparse formats help


def _metavar(annotation) -> str:
    if typing.get_origin(annotation) is tuple:
        return "A,B,..."
    return getattr(annotation, "__name__", "VALUE").upper()


def suggest(word: str, choices, quote: str = "") -> str:
    """`` (did you mean X?)`` with the closest of ``choices`` (difflib), or ""."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {quote}{close[0]}{quote}?)" if close else ""


def check_keys(cls: type, data: typing.Any, source: str, prefix: str = "") -> None:
    """Raise ConfigError naming the first key of ``data`` (a config file's object, nested
    objects for nested dataclasses, dotted keys allowed) that is no field of ``cls``, with
    the closest valid key. Dashes and underscores are interchangeable, as on the command line."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        what = f'key "{prefix[:-1]}"' if prefix else "the file"
        raise ConfigError(f"{where}{what} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for raw, value in data.items():
        raw_head, dot, rest = str(raw).partition(".")
        head = raw_head.replace("-", "_")
        if head not in names:
            full = f"{prefix}{raw}"
            close = difflib.get_close_matches(head, names, n=1, cutoff=0.6)  # bare names: a shared prefix is no match
            hint = f' (did you mean "{prefix}{close[0]}"?)' if close else f" (not a {cls.__name__} field)"
            raise ConfigError(f'{where}unknown key "{full}"{hint}')
        if dataclasses.is_dataclass(hints[head]):
            check_keys(hints[head], {rest: value} if dot else value, source, f"{prefix}{head}.")
        elif dot:
            raise ConfigError(f'{where}unknown key "{prefix}{raw}" ("{prefix}{head}" has no sub-keys)')


def build_config(cls: type, values: dict[str, typing.Any], prefix: str = ""):
    """Instantiate ``cls`` from flat dotted argparse values, raising ConfigError on bad values."""
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build_config(hints[f.name], values, prefix=f"{key}.")
        elif key in values:
            kwargs[f.name] = values[key]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def __getattr__(name: str):
    """``TrainerConfig`` lives with the trainer (it embeds the algorithms' and LeRobot's
    configs, which import torch); importing it from here still works, lazily, so that
    processes which never train (gateway, status) stay light."""
    if name == "TrainerConfig":
        from cloud.trainer_config import TrainerConfig

        return TrainerConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ClientSecurity", "GatewayConfig", "GatewaySecurity", "TrainerConfig", "add_dataclass_args", "build_config", "check_keys", "suggest", "field", "DEFAULT_TASKS"]
