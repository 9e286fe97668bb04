"""Connect to Redis or Redis Cluster from one URL.

``redis://host:6379/0`` (or ``rediss://`` for TLS, ``unix://``) is one Redis;
``redis+cluster://host1:6379[,host2:6379...]`` (or ``rediss+cluster://``) is a
Redis Cluster reached through any of the listed nodes (the client discovers
the rest). The buffer's layout keeps every atomic write inside one slot (the
``{r:<robot_id>}`` hash tag, see ``cloud/buffer.py``), so the same code runs on
both; pipelines over many robots are split per node by the cluster client.
"""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

REDIS_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError)
"""Redis errors that mean "not reachable right now" (down, restarting, LOADING its AOF): waited out, not raised."""
OUTAGE_BACKOFF_S = (0.25, 10.0)
"""First and largest wait between Redis reconnection attempts (doubling in between)."""

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# Client options that only single-node clients accept.
_SINGLE_ONLY = ("health_check_interval", "db")


def is_cluster(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def _cluster_parts(url: str):
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES[parts.scheme]
    auth, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for hostport in hosts.split(","):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"redis cluster URL {url!r}: node {hostport!r} must be host:port")
        nodes.append((host.strip("[]"), int(port)))
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"redis cluster URL {url!r}: Redis Cluster has only database 0, got path {parts.path!r}")
    first = f"{auth}@{hosts.split(',')[0]}" if auth else hosts.split(",")[0]
    return urlunsplit((scheme, first, "", parts.query, "")), nodes


def connect(url: str, **kwargs):
    """A sync client: ``redis.Redis`` or ``redis.cluster.RedisCluster``."""
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    if not is_cluster(url):
        return redis.Redis.from_url(url, **kwargs)
    base, nodes = _cluster_parts(url)
    for name in _SINGLE_ONLY:
        kwargs.pop(name, None)
    return RedisCluster.from_url(base, startup_nodes=[ClusterNode(h, p) for h, p in nodes], **kwargs)


def connect_async(url: str, **kwargs):
    """An asyncio client: ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``."""
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    if not is_cluster(url):
        return aioredis.Redis.from_url(url, **kwargs)
    base, nodes = _cluster_parts(url)
    for name in _SINGLE_ONLY:
        kwargs.pop(name, None)
    return RedisCluster.from_url(base, startup_nodes=[ClusterNode(h, p) for h, p in nodes], **kwargs)


def wait_out_outage(client, stop: threading.Event, probe_key: str) -> tuple[bool, int, float]:
    """Redis is unreachable: retry PING and a data command (``EXISTS probe_key``: refused with LOADING until the
    AOF is read) with capped exponential backoff (``OUTAGE_BACKOFF_S``) until it answers. Returns (answered,
    attempts, seconds waited); answered is False if ``stop`` was set first. The caller logs the outage."""
    t0, delay = time.monotonic(), OUTAGE_BACKOFF_S[0]
    attempts = 0
    while not stop.wait(delay):
        attempts += 1
        try:
            client.ping()
            client.exists(probe_key)
        except REDIS_UNAVAILABLE as again:
            log.debug("Redis still unavailable after %d attempts: %s", attempts, again)
            delay = min(delay * 2, OUTAGE_BACKOFF_S[1])
            continue
        return True, attempts, time.monotonic() - t0
    return False, attempts, time.monotonic() - t0
