"""Who may call the gateway, as whom, and how much: TLS, mutual TLS, robot tokens, limits.

Every call to ``fleet.v1.FleetService`` goes through :class:`AuthInterceptor`:

1. *Authenticate* (``UNAUTHENTICATED`` on failure). With a token key configured,
   the ``authorization: Bearer <token>`` metadata must verify (``fleet/tokens.py``)
   and its id must not be in the revoked set. With mutual TLS the TLS handshake
   already refused any client without a certificate from the fleet CA; the
   certificate's common name is the robot id.
2. *Authorize* (``PERMISSION_DENIED``): token and certificate must name the same
   robot, and every request message (each chunk of a stream) must carry that
   robot id: a robot registers, heartbeats, writes and watches only as itself.
3. *Limit* (per robot, per gateway): at most ``robot_max_streams`` experience
   streams and ``robot_max_policy_streams`` WatchPolicy streams at once
   (``RESOURCE_EXHAUSTED`` beyond), and steps or bytes per second
   above the configured rates slow the stream down (backpressure through gRPC
   flow control, nothing dropped).

Revocation: ``fleet certs revoke`` adds a token id to the Redis set
``fleet:auth:revoked``; every gateway re-reads it every ``revocation_refresh_s``
and checks it on each call and on each message of open streams, so a revoked
robot is cut off within that interval on every replica.

The health service (``grpc.health.v1``) is left open: probes carry no token.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import grpc

from cloud.gateway.interceptors import MalformedRequests, _responses, _result, abort, request_bytes, status_for
from fleet import metrics
from fleet.gateway_config import GatewaySecurity
from fleet.errors import ConfigError, FleetError, Overloaded, PermissionDenied, Unauthenticated
from fleet.secret_files import read_private
from fleet.tokens import TokenError, load_key, verify

log = logging.getLogger(__name__)

REVOKED_KEY = "fleet:auth:revoked"
DENIED_CERTS_KEY = "fleet:auth:denied_certs"
"""SHA-256 fingerprints (hex, of the DER) of robot certificates refused even though the CA signed them."""
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


_count_rejection = metrics.count_gateway_rejection


# --- TLS ----------------------------------------------------------------------------------


class _CertFiles:
    """The gateway's certificate files, re-read when they change (cert-manager rotates them)."""

    def __init__(self, sec: GatewaySecurity):
        self._paths = [Path(p) for p in (sec.tls_key_file, sec.tls_cert_file, sec.client_ca_file) if p]
        self._sec = sec
        self._stamp = self._mtimes()

    def _mtimes(self) -> tuple[float, ...]:
        return tuple(p.stat().st_mtime_ns for p in self._paths)

    def config(self) -> grpc.ServerCertificateConfiguration:
        sec = self._sec
        key, chain = read_private(sec.tls_key_file, "tls_key_file"), Path(sec.tls_cert_file).read_bytes()
        ca = Path(sec.client_ca_file).read_bytes() if sec.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    def fetch_if_changed(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return None
            config = self.config()
        except (OSError, ConfigError) as exc:  # mid-rotation, or a key left readable: keep the old certificate
            log.warning("could not reload TLS files (%s); keeping the current certificate", exc)
            return None
        self._stamp = stamp
        log.info("reloaded the gateway's TLS certificate")
        return config


def server_credentials(sec: GatewaySecurity) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS with ``client_ca_file``) credentials, or None for plaintext."""
    if not sec.tls_cert_file:
        return None
    files = _CertFiles(sec)
    return grpc.dynamic_ssl_server_credentials(files.config(), files.fetch_if_changed,
                                               require_client_authentication=bool(sec.client_ca_file))


# --- revocation ---------------------------------------------------------------------------


class RevokedTokens:
    """Local copy of the revoked token ids and the denied certificates (SHA-256 fingerprints), refreshed
    from Redis in the background."""

    def __init__(self, redis, refresh_s: float):
        self._redis = redis
        self._refresh_s = refresh_s
        self._ids: frozenset[str] = frozenset()
        self._certs: frozenset[str] = frozenset()
        self._task: asyncio.Task | None = None

    def __contains__(self, token_id: str) -> bool:
        return token_id in self._ids

    def cert_denied(self, fingerprint: str) -> bool:
        return fingerprint in self._certs

    async def refresh(self) -> None:
        ids, certs = await asyncio.gather(self._redis.smembers(REVOKED_KEY), self._redis.smembers(DENIED_CERTS_KEY))
        self._ids = frozenset(x.decode() if isinstance(x, bytes) else x for x in ids)
        self._certs = frozenset(x.decode() if isinstance(x, bytes) else x for x in certs)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # Redis away: keep the last known set
                log.warning("could not refresh revoked tokens: %s", exc)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def revoke(redis, token_id: str) -> bool:
    """Revoke a token id (sync client); returns False if it was already revoked."""
    if not token_id:
        raise ValueError("token_id must not be empty")
    return bool(redis.sadd(REVOKED_KEY, token_id))


def cert_fingerprint(pem: bytes) -> str:
    """SHA-256 of a PEM certificate's DER, hex (what ``fleet certs deny`` stores)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


def deny_cert(redis, pem: bytes) -> tuple[str, bool]:
    """Deny a robot certificate on every gateway (sync client); returns (fingerprint, newly denied)."""
    fingerprint = cert_fingerprint(pem)
    return fingerprint, bool(redis.sadd(DENIED_CERTS_KEY, fingerprint))


# --- limits -------------------------------------------------------------------------------


class TokenBucket:
    """``rate_per_s`` units per second with one second of burst; ``reserve`` says how long to wait."""

    def __init__(self, rate_per_s: float):
        self.rate_per_s = rate_per_s
        self._level = rate_per_s
        self._t = time.monotonic()

    def reserve(self, n: float) -> float:
        now = time.monotonic()
        self._level = min(self.rate_per_s, self._level + (now - self._t) * self.rate_per_s) - n
        self._t = now
        return max(0.0, -self._level / self.rate_per_s)


class _StreamCap:
    """Open streams of one kind per robot, at most ``limit`` each (0 = unlimited)."""

    def __init__(self, limit: int, kind: str):
        self.limit, self.kind = limit, kind
        self._open: dict[str, int] = defaultdict(int)

    def open(self, robot_id: str) -> None:
        if self.limit and self._open[robot_id] >= self.limit:
            raise Overloaded(f"robot {robot_id!r} already has {self._open[robot_id]} {self.kind} streams open "
                             f"(limit {self.limit})", retry_after_s=5.0)
        self._open[robot_id] += 1

    def close(self, robot_id: str) -> None:
        self._open[robot_id] -= 1
        if self._open[robot_id] <= 0:
            del self._open[robot_id]


class RobotLimits:
    """Per-robot stream counts (experience, WatchPolicy) and step/byte rates on this gateway."""

    def __init__(self, max_streams: int = 0, max_steps_per_s: float = 0.0, max_bytes_per_s: float = 0.0,
                 max_policy_streams: int = 0):
        self.max_streams = max_streams
        self.max_policy_streams = max_policy_streams
        self._rates = {"steps": max_steps_per_s, "bytes": max_bytes_per_s}
        self._experience = _StreamCap(max_streams, "experience")
        self._policy = _StreamCap(max_policy_streams, "WatchPolicy")
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self.counts_bytes = bool(max_bytes_per_s)

    def open_stream(self, robot_id: str) -> None:
        self._experience.open(robot_id)

    def close_stream(self, robot_id: str) -> None:
        self._experience.close(robot_id)

    def open_policy_stream(self, robot_id: str) -> None:
        self._policy.open(robot_id)

    def close_policy_stream(self, robot_id: str) -> None:
        self._policy.close(robot_id)

    def delay_s(self, robot_id: str, steps: int, nbytes: int) -> float:
        """How long to hold this chunk so the robot stays within its rates."""
        wait = 0.0
        for kind, amount in (("steps", steps), ("bytes", nbytes)):
            rate = self._rates[kind]
            if rate:
                bucket = self._buckets.setdefault((robot_id, kind), TokenBucket(rate))
                wait = max(wait, bucket.reserve(amount))
        return wait


# --- authentication -----------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    robot_id: str
    token_id: str = ""
    expires_s: float = 0.0
    """The token's expiry (0: none): open streams are cut when it passes."""
    cert_fingerprint: str = ""


class Authenticator:
    """Turns a call's metadata and TLS peer into an Identity (None when auth is off)."""

    def __init__(self, token_key: bytes | None, mutual_tls: bool, revoked: RevokedTokens | None):
        self._key = token_key
        self._mutual_tls = mutual_tls
        self._revoked = revoked

    @property
    def enabled(self) -> bool:
        return self._key is not None or self._mutual_tls

    def identify(self, metadata, auth_context: dict) -> Identity | None:
        if not self.enabled:
            return None
        cert_name, fingerprint = None, ""
        if self._mutual_tls:
            names = auth_context.get("x509_common_name") or []
            if not names:
                raise Unauthenticated("no verified client certificate")
            cert_name = names[0].decode() if isinstance(names[0], bytes) else names[0]
            pems = auth_context.get("x509_pem_cert") or []
            fingerprint = cert_fingerprint(pems[0]) if pems else ""
        if self._key is None:
            identity = Identity(robot_id=cert_name or "", cert_fingerprint=fingerprint)
            self.check_open(identity)
            return identity
        token = _bearer(metadata)
        try:
            claims = verify(self._key, token)
        except TokenError as exc:
            raise Unauthenticated(str(exc)) from None
        if cert_name is not None and cert_name != claims.robot_id:
            raise PermissionDenied(f"token for robot {claims.robot_id!r} presented with the certificate of "
                                   f"{cert_name!r}")
        identity = Identity(robot_id=claims.robot_id, token_id=claims.token_id, expires_s=claims.expires_s,
                            cert_fingerprint=fingerprint)
        self.check_open(identity)
        return identity

    def check_open(self, identity: Identity | None) -> None:
        """Still allowed (checked on every message of open streams, too): not revoked, not expired, not denied."""
        if identity is None:
            return
        if identity.token_id and self._revoked is not None and identity.token_id in self._revoked:
            raise Unauthenticated(f"token {identity.token_id!r} has been revoked")
        if identity.expires_s and time.time() >= identity.expires_s:
            raise Unauthenticated(f"token {identity.token_id!r} of robot {identity.robot_id!r} expired at "
                                  f"{identity.expires_s:.0f}")
        if identity.cert_fingerprint and self._revoked is not None and self._revoked.cert_denied(
                identity.cert_fingerprint):
            raise Unauthenticated(f"the certificate of robot {identity.robot_id!r} is denied "
                                  f"(sha256 {identity.cert_fingerprint[:16]}...)")


def _bearer(metadata) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = (value.decode() if isinstance(value, bytes) else value).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
            return token.strip()
    raise Unauthenticated("no token: send 'authorization: Bearer <token>' metadata")


def authorize(identity: Identity | None, robot_id: str) -> None:
    """The caller may act only as the robot it authenticated as."""
    if identity is not None and robot_id != identity.robot_id:
        raise PermissionDenied(f"authenticated as robot {identity.robot_id!r}, not as {robot_id!r}")


# --- the interceptor ----------------------------------------------------------------------


_IDENTITY: contextvars.ContextVar = contextvars.ContextVar("fleet_identity")
"""The caller's Identity (or None: auth off), set by :class:`Authenticate` before any request is parsed."""


class AuditLog:
    """Every refused call is logged (robot, peer, method, reason); repeats of one (peer, reason) within
    ``window_s`` are counted and summarised instead of flooding the log."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def refused(self, context, method: str, robot_id: str, exc: FleetError) -> None:
        peer = context.peer() if hasattr(context, "peer") else "?"
        key, now = (peer, type(exc).__name__ + str(exc)[:80]), time.monotonic()
        first, repeats = self._last.get(key, (0.0, 0))
        if now - first < self.window_s:
            self._last[key] = (first, repeats + 1)
            return
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[key] = (now, 0)
        extra = f" ({repeats} more like it in the last {self.window_s:.0f} s)" if repeats else ""
        log.warning("auth: refused %s for robot %r from %s: %s: %s%s", method, robot_id or "?", peer,
                    status_for(exc).name, exc, extra)


class Authenticate(grpc.aio.ServerInterceptor):
    """Outermost: who is calling, from the metadata and the TLS peer only, before any request bytes are
    parsed (UNAUTHENTICATED / PERMISSION_DENIED otherwise). :class:`AuthInterceptor` then authorizes."""

    def __init__(self, authenticator: Authenticator, audit: AuditLog):
        self.authenticator = authenticator
        self.audit = audit

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES) or not self.authenticator.enabled:
            return handler
        identify = self._identify

        if handler.request_streaming and handler.response_streaming:
            async def stream_stream(request_iterator, context):
                if await identify(context, method):
                    async for response in _responses(handler.stream_stream(request_iterator, context)):
                        yield response
            return grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer,
                                                         handler.response_serializer)
        if handler.response_streaming:
            async def unary_stream(request, context):
                if await identify(context, method):
                    async for response in _responses(handler.unary_stream(request, context)):
                        yield response
            return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.request_streaming:
            raise NotImplementedError(f"{method}: client streaming is not wrapped")

        async def unary_unary(request, context):
            if await identify(context, method):
                return await _result(handler.unary_unary(request, context))
        return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                   handler.response_serializer)

    async def _identify(self, context, method: str) -> bool:
        try:
            _IDENTITY.set(self.authenticator.identify(context.invocation_metadata(), context.auth_context()))
        except FleetError as exc:
            self.audit.refused(context, method, "", exc)
            await abort(context, exc, _count_rejection)
        return True


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authorize and limit every FleetService call, on the parsed requests (see the module docstring)."""

    def __init__(self, authenticator: Authenticator, limits: RobotLimits, audit: AuditLog | None = None):
        self.authenticator = authenticator
        self.limits = limits
        self.audit = audit or AuditLog()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        method = handler_call_details.method
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_stream(handler.stream_stream, method), handler.request_deserializer,
                handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(handler.unary_stream, method), handler.request_deserializer,
                handler.response_serializer)
        if handler.request_streaming:
            raise NotImplementedError(f"{handler_call_details.method}: client streaming is not wrapped")
        return grpc.unary_unary_rpc_method_handler(
            self._unary_unary(handler.unary_unary, method), handler.request_deserializer,
            handler.response_serializer)

    def _identity(self, context) -> Identity | None:
        """The identity :class:`Authenticate` found (identified here when this interceptor runs alone)."""
        identity = _IDENTITY.get(_UNSET)
        if identity is _UNSET:
            identity = self.authenticator.identify(context.invocation_metadata(), context.auth_context())
        return identity

    async def _refuse(self, context, method: str, robot_id: str, exc: FleetError) -> None:
        self.audit.refused(context, method, robot_id, exc)
        await abort(context, exc, _count_rejection)

    def _unary_unary(self, behavior, method: str):
        async def wrapped(request, context):
            try:
                authorize(self._identity(context), request.robot_id)
            except FleetError as exc:
                await self._refuse(context, method, request.robot_id, exc)
            return await behavior(request, context)
        return wrapped

    def _unary_stream(self, behavior, method: str):
        async def wrapped(request, context):
            robot = request.robot_id
            try:
                identity = self._identity(context)
                if robot:  # WatchPolicy may leave it empty: then it watches as its identity
                    authorize(identity, robot)
                robot = identity.robot_id if identity is not None else robot
                self.limits.open_policy_stream(robot)
            except FleetError as exc:
                await self._refuse(context, method, request.robot_id, exc)
            try:
                async for response in behavior(request, context):
                    try:  # revoked, expired or denied meanwhile: the stream ends before the next message
                        self.authenticator.check_open(identity)
                    except FleetError as exc:
                        await self._refuse(context, method, request.robot_id, exc)
                    yield response
            finally:
                self.limits.close_policy_stream(robot)
        return wrapped

    def _stream_stream(self, behavior, method: str):
        async def wrapped(request_iterator, context):
            try:
                identity = self._identity(context)
                opened = identity.robot_id if identity is not None else None
                if opened is not None:
                    self.limits.open_stream(opened)
            except FleetError as exc:
                await self._refuse(context, method, "", exc)
            try:
                async for response in behavior(self._checked(request_iterator, identity, context, method), context):
                    yield response
            finally:
                if opened is not None:
                    self.limits.close_stream(opened)
        return wrapped

    async def _checked(self, request_iterator, identity: Identity | None, context, method: str):
        """Each message: same robot as the identity, still allowed (not revoked, expired or denied meanwhile),
        within the rates.

        Errors raised here surface in the servicer's ``async for`` and are mapped there."""
        async for msg in request_iterator:
            try:
                authorize(identity, msg.robot_id)
                self.authenticator.check_open(identity)
            except FleetError as exc:
                self.audit.refused(context, method, msg.robot_id, exc)
                raise
            nbytes = request_bytes(msg) if self.limits.counts_bytes else 0
            steps = min(msg.n, 1024) + sum(min(m.n, 1024) for m in msg.more) if hasattr(msg, "n") \
                else len(msg.steps)  # columnar (protocol 2; ``more``: further chunks) or per-step
            delay = self.limits.delay_s(msg.robot_id, steps, nbytes)
            if delay > 0:
                log.debug("robot %s over its rate: holding its stream %.3fs", msg.robot_id, delay)
                await asyncio.sleep(delay)  # backpressure: the robot's window fills, its spool holds the rest
            yield msg


_UNSET = object()


def build_interceptors(sec: GatewaySecurity, redis) -> tuple[list[grpc.aio.ServerInterceptor], RevokedTokens | None]:
    """The interceptors for a GatewayConfig's security section, outermost first, around the request parser
    (``MalformedRequests``): authenticate before anything is parsed, then authorize and limit.
    Start the RevokedTokens it returns."""
    interceptor, revoked = build_interceptor(sec, redis)
    return [Authenticate(interceptor.authenticator, interceptor.audit), MalformedRequests(), interceptor], revoked


def build_interceptor(sec: GatewaySecurity, redis) -> tuple[AuthInterceptor, RevokedTokens | None]:
    """The authorizing interceptor for a GatewayConfig's security section (start the RevokedTokens it returns)."""
    key = load_key(sec.token_key_file) if sec.token_key_file else None
    mutual = bool(sec.client_ca_file)
    revoked = RevokedTokens(redis, sec.revocation_refresh_s) if key is not None or mutual else None
    if key is None and not mutual:
        log.warning("gateway runs without robot authentication (no token key, no client CA): development only")
    elif key is not None and not sec.tls_cert_file:
        log.warning("robot tokens without TLS travel in clear text: set tls_cert_file/tls_key_file")
    interceptor = AuthInterceptor(Authenticator(key, mutual, revoked),
                                  RobotLimits(sec.robot_max_streams, sec.robot_max_steps_per_s,
                                              sec.robot_max_bytes_per_s, sec.robot_max_policy_streams))
    return interceptor, revoked


__all__ = ["AuditLog", "Authenticate", "AuthInterceptor", "Authenticator", "DENIED_CERTS_KEY", "Identity",
           "REVOKED_KEY", "RevokedTokens", "RobotLimits", "authorize", "build_interceptor", "build_interceptors",
           "cert_fingerprint", "deny_cert", "revoke", "server_credentials"]
