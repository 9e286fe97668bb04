"""WatchPolicy: stream every version newer than the one the edge holds.

A mixin of ``FleetServicer`` (one gRPC service, one servicer class) kept in its
own file: policy distribution evolves separately from experience ingest.
"""

from __future__ import annotations

import logging

import grpc

from cloud.gateway.interceptors import map_errors
from fleet import metrics
from fleet.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)


def _count_rejection(code: grpc.StatusCode) -> None:
    metrics.GATEWAY_REJECTED.labels(code=code.name).inc()


class PolicyServicerMixin:
    """Needs ``self._feed`` (a PolicyFeed) and ``self._watch_timeout_s``."""

    @map_errors(_count_rejection)
    async def WatchPolicy(self, request: pb.WatchPolicyRequest, context):
        have = request.have_version
        while not context.done():
            latest = await self._feed.wait_newer(have, self._watch_timeout_s)
            if latest <= have:
                continue
            messages = await self._feed.messages(latest)
            for msg in messages:
                yield msg
            metrics.GATEWAY_POLICY_BYTES.labels(kind="full").inc(sum(len(m.piece.data) for m in messages))
            log.info("sent policy v%d to %s (had v%d)", latest, request.robot_id or "?", have)
            have = latest
