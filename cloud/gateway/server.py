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

from cloud.gateway.policy_feed import PolicyFeed
from cloud.gateway.servicer import FleetServicer
from cloud.ingest import Ingest
from cloud.policy_store import PolicyStore
from fleet.config import GatewayConfig
from fleet.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


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

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.server.stop(grace_s)
        await self.feed.stop()
        await self.redis.aclose()


async def start_gateway(cfg: GatewayConfig) -> RunningGateway:
    """Build the parts in data-flow order and start serving; returns the bound port."""
    redis = aioredis.Redis.from_url(cfg.redis_url, socket_timeout=cfg.redis_timeout_s,
                                    socket_connect_timeout=cfg.redis_timeout_s, health_check_interval=10)
    ingest = Ingest(redis)
    import redis as sync_redis

    store = PolicyStore(cfg.policy_dir, sync_redis.Redis.from_url(cfg.redis_url))
    feed = PolicyFeed(redis, store)
    await feed.start()
    servicer = FleetServicer(ingest, feed, redis)
    server = grpc.aio.server(options=server_options(cfg))
    pb_grpc.add_FleetServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(cfg.listen)
    if port == 0:
        raise OSError(f"gateway could not bind {cfg.listen}")
    await server.start()
    log.info("gateway %s listening on port %d (redis %s)", servicer.gateway_id, port, cfg.redis_url)
    return RunningGateway(server=server, port=port, feed=feed, redis=redis)


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
