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
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from functools import lru_cache

from fleet.errors import ConfigError
from fleet.policies.lerobot_adapter import PolicyConfig

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
class GatewayConfig:
    """The gateway: gRPC in front of the Redis buffer and the policy store."""

    listen: str = "127.0.0.1:50051"
    """host:port to listen on ("[::]:50051" for all interfaces; port 0 picks a free one)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the buffer (AOF on)."""
    policy_dir: str = "runs/default/policies"
    """Policy store directory (shared with the trainer: local disk or a shared volume)."""
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

    def __post_init__(self) -> None:
        _require(":" in self.listen, f"listen must be host:port, got {self.listen!r}")
        _require(self.max_message_bytes >= 1 << 20, f"max_message_bytes ({self.max_message_bytes}) must be >= 1 MiB")
        _require(self.max_connection_age_s > 0, f"max_connection_age_s ({self.max_connection_age_s}) must be > 0")


@dataclass(frozen=True)
class TrainerConfig:
    """The trainer: samples from Redis, trains, publishes versions."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the buffer."""
    policy_dir: str = "runs/default/policies"
    """Policy store directory (the gateway serves from it)."""
    algorithm: str = "hg_dagger"
    """Learning algorithm (hg_dagger)."""
    tasks: tuple[str, ...] = DEFAULT_TASKS
    """Language instructions the shared policy is conditioned on (fixed at the policy's creation)."""
    batch_size: int = 64
    """Samples per optimizer step."""
    online_fraction: float = 0.5
    """Share of each batch drawn from online intervention data once there is some (rest: offline demos)."""
    publish_every_steps: int = 100
    """Publish a new policy version every this many optimizer steps."""
    publish_every_s: float = 0.0
    """Also publish when this many seconds passed since the last version (0 = by steps only)."""
    refresh_interval_s: float = 1.0
    """How often the sampler pulls newly arrived steps from Redis, seconds."""
    seed_bc_steps: int = 300
    """Behaviour-cloning steps on offline data before the first version is published (0 = none)."""
    min_labeled_steps: int = 32
    """Do not train before the buffer holds this many labeled steps."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run until stopped)."""
    metrics_port: int = 0
    """Port for Prometheus /metrics (0 = off)."""
    torch_threads: int = 1
    """torch.set_num_threads for the trainer."""
    seed: int = 0
    """Seed for the policy's initial weights and the sampler."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The LeRobot policy to train (type and size)."""

    def __post_init__(self) -> None:
        _require(self.algorithm in ("hg_dagger",), f"algorithm must be hg_dagger, got {self.algorithm!r}")
        _require(self.batch_size > 0, f"batch_size ({self.batch_size}) must be > 0")
        _require(0.0 <= self.online_fraction <= 1.0, f"online_fraction ({self.online_fraction}) must be in [0, 1]")
        _require(self.publish_every_steps > 0, f"publish_every_steps ({self.publish_every_steps}) must be > 0")
        _require(len(self.tasks) > 0, "tasks must not be empty")
        _require(self.torch_threads > 0, f"torch_threads ({self.torch_threads}) must be > 0")


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
                            help=f"{docs.get(f.name, '')} (default: {shown})")


def _metavar(annotation) -> str:
    if typing.get_origin(annotation) is tuple:
        return "A,B,..."
    return getattr(annotation, "__name__", "VALUE").upper()


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


__all__ = ["GatewayConfig", "TrainerConfig", "add_dataclass_args", "build_config", "field", "DEFAULT_TASKS"]
