"""Typed configuration: one draccus dataclass per process, nested the way the process is built.

Conventions (as in LeRobot, whose configs we embed):

- Every field has a one-line docstring right under it; that line is its ``--help`` text.
  Adding a knob is one field plus its docstring, in the config of the part that uses it,
  e.g. ``retention_max_bytes: int = 0`` + ``\"\"\"Bytes kept ...\"\"\"``; the flag
  (``--retention_max_bytes``), the config-file key and the help follow. Its one default lives there.
- Nested dataclasses are nested flags (``--spool.max_bytes=1e9``); one spelling per flag, the
  field's own name with underscores.
- A ``draccus.ChoiceRegistry`` field picks a class with ``--<field>.type=<name>`` and takes only
  that class's fields (``--policy.type=act --policy.dim_model=256``; ``--algorithm.type=recap``).
- ``--config_path=file.yaml`` (or .json) sets any of these; flags override the file.
- Values are YAML scalars or lists: ``--tasks='["reach the goal, carefully", "close the drawer"]'``;
  a bare string is one element (its commas are kept).
- Values are validated in ``__post_init__`` with the bad value in the message. Unknown keys, bad
  types and bad values end the process with status 2 and one line naming the key (``parse``).

This module is shared core: it imports neither ``edge`` nor ``cloud``; each process's config
lives next to the code that runs it, and ``fleet/cli.py`` composes them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import math
import sys
import textwrap
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fleet.errors import ConfigError

T = TypeVar("T")

DEFAULT_TASKS = ("reach the goal", "press the button from the top", "close the drawer")
"""The MetaWorld tasks of the demo, the simulated fleet and the trainer's default task list."""


def require(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``cond`` (for ``__post_init__`` validation)."""
    if not cond:
        raise ConfigError(message)


_require = require


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
        require(not self.health_listen or ":" in self.health_listen,
                 f"health_listen must be host:port or empty, got {self.health_listen!r}")




def suggest(word: str, choices, quote: str = "") -> str:
    """`` (did you mean X?)`` with the closest of ``choices`` (difflib), or ""."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {quote}{close[0]}{quote}?)" if close else ""


def flag_spelling(arg: str) -> str:
    """The flag of ``arg`` (``--a-b=1``) spelt as fields are (``--a_b``), to find the closest valid flag."""
    return "--" + arg.split("=", 1)[0][2:].replace("-", "_")


def _is_choice(tp: Any) -> bool:
    import draccus

    return isinstance(tp, type) and issubclass(tp, draccus.ChoiceRegistry)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_FACTORY_DEFAULTS: dict[Any, Any] = {}


def _default_of(f: dataclasses.Field) -> Any:
    """A field's default (a factory is called once: LeRobot's configs log when they pick a device)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    factory = f.default_factory
    if factory is dataclasses.MISSING:  # type: ignore[comparison-overlap]
        return dataclasses.MISSING
    if factory not in _FACTORY_DEFAULTS:
        _FACTORY_DEFAULTS[factory] = factory()  # type: ignore[operator]
    return _FACTORY_DEFAULTS[factory]


def _choice(tp: type, data: Any, default: Any, path: str) -> type:
    """The class a choice field ``tp`` picks: ``data["type"]`` if given, else the default's class."""
    known = tp.get_known_choices()
    name = data.get("type") if isinstance(data, dict) else None
    if name is None:
        if isinstance(default, tp):
            return type(default)
        name = tp.default_choice_name()
        if name is None:
            raise ConfigError(f"{path}.type is required: one of {', '.join(sorted(known))}")
    if name not in known:
        raise ConfigError(f'{path}.type "{name}" is not one of: {", ".join(sorted(known))}'
                          f"{suggest(str(name), known, quote=chr(34))}")
    return known[name]


def _complete(cls: type, data: Any, path: str = "") -> dict:
    """Check ``data`` (a nested mapping) against ``cls``: raise ConfigError naming the first unknown key
    (with the closest valid one) and fill in the ``type`` of choice fields left at their default class."""
    what = f'"{path}"' if path else "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping of {cls.__name__} fields, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key == "type" and _is_choice(cls):
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            prefix = f"{path}." if path else ""
            hint = (f' (did you mean "{prefix}{close[0]}"?)' if close
                    else f" (not a {cls.__name__} field; valid: {', '.join(fields)})")
            raise ConfigError(f'unknown key "{full}"{hint}')
        tp = hints[key]
        if _is_choice(tp):
            sub = _choice(tp, value, _default_of(fields[key]), full)
            inner = {k: v for k, v in value.items() if k != "type"} if isinstance(value, dict) else value
            out[key] = {"type": tp.get_choice_name(sub), **_complete(sub, inner, full)}
        elif _is_config(tp):
            out[key] = _complete(tp, value, full)
        else:
            out[key] = value
    return out


def _overlay(base: Any, over: Any) -> Any:
    """``over`` merged into ``base`` (nested mappings); a choice section whose ``type`` changes is replaced."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        switched = isinstance(value, dict) and isinstance(old, dict) and value.get("type", old.get("type")) != old.get("type")
        out[key] = value if switched or key not in out else _overlay(old, value)
    return out


def load(cls: type[T], data: Any, source: str = "") -> T:
    """An instance of ``cls`` from a nested mapping (a config file's content), or ConfigError naming the key."""
    import draccus
    from draccus.utils import DecodingError, ParsingError

    where = f"{source}: " if source else ""
    try:
        data = _complete(cls, data)
        try:
            defaults = draccus.encode(cls())  # nested defaults set by a parent (a demo's robots) are kept
        except Exception:  # noqa: BLE001 - a config with required fields: decode from what was given
            defaults = {}
        return draccus.decode(cls, _overlay(defaults, data))
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    except DecodingError as e:
        key = ".".join(str(k) for k in e.key_path)
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{where}{cause}") from None
        raise ConfigError(f"{where}{key}: {str(e.message).splitlines()[0]}") from None
    except ParsingError as e:
        cause = e.__cause__
        raise ConfigError(f"{where}{cause if isinstance(cause, ConfigError) else e}") from None


def _field_type(cls: type, parts: Sequence[str], values: dict[str, Any]) -> Any:
    """The annotation of the dotted field ``parts`` of ``cls`` (choice fields resolved from ``values``)."""
    tp: Any = cls
    for i, part in enumerate(parts):
        if _is_choice(tp):
            name = values.get(".".join(parts[:i] + ["type"]))
            tp = tp.get_known_choices().get(name, tp) if name else tp
        if not _is_config(tp):
            return None
        f = {f.name: f for f in dataclasses.fields(tp)}.get(part)
        if f is None:
            return None
        if _is_choice(typing.get_type_hints(tp)[part]) and values.get(".".join(parts[:i + 1] + ["type"])) is None:
            default = _default_of(f)
            tp = type(default) if dataclasses.is_dataclass(default) else typing.get_type_hints(tp)[part]
        else:
            tp = typing.get_type_hints(tp)[part]
    return tp


def cli_value(tp: Any, text: str) -> Any:
    """A flag's text as a value of type ``tp``: strings are kept as typed, other values read as YAML;
    a bare string given for a list is one element (its commas are kept)."""
    from draccus import cfgparsing

    if tp is str:
        return text
    value = cfgparsing.parse_string(text)
    if typing.get_origin(tp) in (tuple, list) and isinstance(value, str):
        return [value]
    return value


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of ``cls`` and its bases (from the class source, with ``ast``:
    draccus' own line scanner mistakes a docstring holding one colon for a field). ``tests/fleet/test_config.py``
    checks that every process config field has one, so a missing source cannot silently empty ``--help``."""
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


def _help_of(cls: type, dest: str) -> str:
    *parents, name = dest.split(".")
    owner = _field_type(cls, parents, {}) if parents else cls
    owners = list(owner.get_known_choices().values()) if _is_choice(owner) else [owner]
    return next((field_docs(o)[name] for o in owners if _is_config(o) and name in field_docs(o)), "")


def parse(cls: type[T], args: Sequence[str], prog: str, description: str | None = None,
          exit_on_error: bool = True) -> T:
    """``cls`` from command-line ``args`` (draccus flags, ``--config_path``); exits 2 with one line naming
    the key on an unknown key, a bad type or a bad value (``exit_on_error=False``: raises ConfigError
    for those found after flag parsing), and 0 after ``--help``."""
    from draccus.argparsing import ArgumentParser
    from draccus.utils import deflatten

    wrapper = ArgumentParser(cls, prog=prog, description=description, preferred_help="below")
    parser = wrapper.parser
    parser.usage = f"{prog} [-h] [--config_path FILE] [--FIELD=VALUE ...]"
    for action in parser._actions:
        if action.dest not in ("help", "config_path") and not action.dest.endswith(".type"):
            action.help = _help_of(cls, action.dest) or action.help
            if _field_type(cls, action.dest.split("."), {}) is bool:  # a bare --flag means true
                action.nargs, action.const = "?", "true"
    args = list(args)
    if "--help" not in args and "-h" not in args:
        for action in parser._actions:  # as draccus does: raw text in, decoding below (defaults are the config's)
            action.default = argparse.SUPPRESS
            action.type = str
    namespace, unknown = parser.parse_known_args(args)
    if unknown:
        options = sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--")})
        parts = [a + (suggest(flag_spelling(a), options) if a.startswith("--") else "") for a in unknown]
        parser.error(f"unrecognized arguments: {' '.join(parts)}")
    values = {k: v for k, v in vars(namespace).items() if v is not None}
    source = values.pop("config_path", None) or ""
    try:
        data: Any = {}
        if source:
            data = _read(source)
        flags: dict[str, Any] = {}
        for key, text in values.items():
            tp = _field_type(cls, key.split("."), values)
            if _is_config(tp) and not key.endswith(".type"):  # draccus: --section=file for one nested section
                flags[key] = _read(text)
            else:
                flags[key] = cli_value(tp, text)
        merged = _overlay(data, deflatten(flags, sep=".")) if isinstance(data, dict) else data
        return load(cls, merged, source)
    except ConfigError as e:
        if not exit_on_error:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _read(path: str) -> Any:
    """A YAML or JSON config file's content, or ConfigError."""
    from draccus import cfgparsing

    try:
        with open(path) as fh:
            return cfgparsing.load_config(fh, file=path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise ConfigError(f"config file {path}: not YAML or JSON: {e}") from None


__all__ = ["ClientSecurity", "DEFAULT_TASKS", "GatewayConfig", "GatewaySecurity", "load", "parse", "require",
           "suggest", "cli_value", "flag_spelling", "field"]
