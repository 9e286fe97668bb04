"""The standard gRPC health service (grpc.health.v1) for the gateway.

Service ``fleet.v1.FleetService`` (readiness) is ``SERVING`` while Redis
answers PING and ``NOT_SERVING`` when it does not (a replica that cannot reach
the buffer should get no new streams); the overall service ``""`` (liveness)
is ``SERVING`` while the process runs: restarting gateways does not bring
Redis back. Both turn ``NOT_SERVING`` at the start of a graceful stop. Kubernetes probes it natively (``grpc:`` probes);
when the main port needs TLS the gateway can also serve it alone on a
plaintext port (``GatewayConfig.health_listen``), because kubelet probes speak
no TLS.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

log = logging.getLogger(__name__)

READY_SERVICE = "fleet.v1.FleetService"


class GatewayHealth:
    def __init__(self, redis, interval_s: float = 5.0, timeout_s: float = 2.0):
        self._redis = redis
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self.servicer = health_aio.HealthServicer()
        self._task: asyncio.Task | None = None
        self.serving = False

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def _set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        if serving != self.serving:
            log.log(logging.INFO if serving else logging.WARNING, "gateway health: %s",
                    "SERVING" if serving else "NOT_SERVING (Redis does not answer)")
        self.serving = serving
        await self.servicer.set(READY_SERVICE, status)

    async def check(self) -> bool:
        try:
            ok = bool(await asyncio.wait_for(self._redis.ping(), self._timeout_s))
        except Exception:  # any failure to reach Redis means not serving
            ok = False
        await self._set(ok)
        return ok

    async def start(self) -> None:
        await self.servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.check()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.check()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.servicer.enter_graceful_shutdown()
