"""The gateway process: stateless gRPC front of the Redis buffer and the policy store.

asyncio throughout (grpc.aio + redis.asyncio). Several replicas may run behind
one load balancer: every piece of state is in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
import redis.asyncio as aioredis

from cloud.gateway.auth import build_interceptors, server_credentials
from cloud.gateway.backpressure import InflightLimiter
from cloud.gateway.health import GatewayHealth
from cloud.gateway.policy_feed import PolicyFeed
from cloud.gateway.policy_servicer import add_fleet_service
from cloud.gateway.servicer import FleetServicer
from cloud.gateway.weight_channel import WeightChannel
from cloud.blobstore import open_blob_store
from cloud.ingest import Ingest
from cloud.policy_store import PolicyStore
from fleet.gateway_config import GatewayConfig
from fleet.malloc import keep_freed_memory
from fleet.netaddr import is_loopback
from fleet.redis_client import connect, connect_async

log = logging.getLogger(__name__)


PROTECTED_MODE_FLAGS = ("--security.tls_cert_file", "--security.tls_key_file", "--security.token_key_file")
"""What a gateway listening beyond loopback needs (protected mode), unless ``--insecure``."""


def protected_mode_refusal(cfg: GatewayConfig) -> str | None:
    """The one-line reason to refuse ``cfg`` (non-loopback listen without TLS and robot tokens), else None."""
    if cfg.weights_listen and not is_loopback(cfg.weights_listen) and not cfg.insecure:
        return (f"refusing to serve policy weights in plaintext on {cfg.weights_listen} (weights_listen, not "
                "loopback): unset weights_listen (with TLS the weights go over gRPC), or pass --insecure "
                "(a trusted network; the signed manifests still protect their integrity)")
    if is_loopback(cfg.listen) or (cfg.security.tls_cert_file and cfg.security.token_key_file):
        return None
    missing = [name for name, have in (("TLS", cfg.security.tls_cert_file),
                                       ("robot tokens", cfg.security.token_key_file)) if not have]
    return (f"refusing to listen on {cfg.listen} (not loopback) without {' and '.join(missing)}: set "
            f"{', '.join(PROTECTED_MODE_FLAGS[:-1])} and {PROTECTED_MODE_FLAGS[-1]}, "
            f"or pass --insecure to serve unauthenticated anyway (development only)")


def server_options(cfg: GatewayConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_connection_age_ms", cfg.max_connection_age_s * 1000),
        ("grpc.max_connection_age_grace_ms", 30_000),
    ]


@dataclass
class RunningGateway:
    server: grpc.aio.Server
    port: int
    feed: PolicyFeed
    redis: aioredis.Redis
    health: GatewayHealth | None = None
    health_server: grpc.aio.Server | None = None
    health_server_port: int = 0
    revoked: object | None = None
    retention: object | None = None
    weights: WeightChannel | None = None

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.retention is not None:
            await self.retention.stop()
        if self.health is not None:
            await self.health.stop()  # NOT_SERVING first: load balancers stop sending new streams
        await self.server.stop(grace_s)
        if self.weights is not None:
            self.weights.stop()
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.revoked is not None:
            await self.revoked.stop()
        await self.feed.stop()
        await self.redis.aclose()


async def start_gateway(cfg: GatewayConfig) -> RunningGateway:
    """Build the parts in data-flow order and start serving; returns the bound port."""
    keep_freed_memory()  # messages of a few hundred kB: reuse freed blocks, no fresh pages each (fleet/malloc.py)
    redis = connect_async(cfg.redis_url, socket_timeout=cfg.redis_timeout_s,
                          socket_connect_timeout=cfg.redis_timeout_s, health_check_interval=10)
    blobs = open_blob_store(cfg.blob_url) if cfg.blob_url else None
    ingest = Ingest(redis, retry_after_s=cfg.retry_after_s, redis_full_retry_after_s=cfg.redis_full_retry_after_s,
                    blobs=blobs, codec=cfg.buffer_codec)
    store = PolicyStore(cfg.policy_dir, connect(cfg.redis_url), embodiment=cfg.embodiment)
    feed = PolicyFeed(redis, store, cache_bytes=cfg.policy_cache_bytes)
    await feed.start()
    limiter = InflightLimiter(cfg.max_inflight_bytes, cfg.robot_max_inflight_bytes, cfg.max_experience_streams,
                              cfg.inflight_wait_s, cfg.retry_after_s)
    weights = WeightChannel(cfg.weights_listen, cfg.weights_ticket_s) if cfg.weights_listen else None
    servicer = FleetServicer(ingest, feed, redis, limiter=limiter, weights=weights)
    interceptors, revoked = build_interceptors(cfg.security, redis)
    if revoked is not None:
        await revoked.start()
    server = grpc.aio.server(options=server_options(cfg), interceptors=interceptors)
    add_fleet_service(servicer, server)  # WatchPolicy sends pre-serialized transfers
    health = GatewayHealth(redis)
    health.add_to(server)
    creds = server_credentials(cfg.security)
    port = server.add_secure_port(cfg.listen, creds) if creds else server.add_insecure_port(cfg.listen)
    if port == 0:
        raise OSError(f"gateway could not bind {cfg.listen}")
    health_server, health_port = None, 0
    if cfg.health_listen:  # plaintext, health only: kubelet gRPC probes speak no TLS
        health_server = grpc.aio.server()
        health.add_to(health_server)
        health_port = health_server.add_insecure_port(cfg.health_listen)
        if health_port == 0:
            raise OSError(f"gateway could not bind health_listen {cfg.health_listen}")
        await health_server.start()
    await health.start()
    await server.start()
    retention = None
    if cfg.retention.enabled:
        from cloud.retention import start_retention

        retention = start_retention(cfg.redis_url, ingest.writer, blobs, cfg.retention)
    log.info("gateway %s listening on port %d (%s; redis %s; weights %s)", servicer.gateway_id, port,
             "mutual TLS" if cfg.security.client_ca_file else "TLS" if creds else "plaintext", cfg.redis_url,
             f"also on side channel port {weights.port}" if weights else "over gRPC only")
    return RunningGateway(server=server, port=port, feed=feed, redis=redis, health=health,
                          health_server=health_server, health_server_port=health_port, revoked=revoked,
                          retention=retention, weights=weights)


async def serve_forever(cfg: GatewayConfig, ready=None) -> None:
    """Run until SIGINT/SIGTERM (first: graceful stop; second: immediate)."""
    gw = await start_gateway(cfg)
    if ready is not None:
        ready(gw.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway stopping")
    await gw.stop(grace_s=cfg.shutdown_grace_s)
