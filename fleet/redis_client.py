"""Connect to Redis or Redis Cluster from one URL.

``redis://host:6379/0`` (or ``rediss://`` for TLS, ``unix://``) is one Redis;
``redis+cluster://host1:6379[,host2:6379...]`` (or ``rediss+cluster://``) is a
Redis Cluster reached through any of the listed nodes (the client discovers
the rest). The buffer's layout keeps every atomic write inside one slot (the
``{r:<robot_id>}`` hash tag, see ``cloud/buffer.py``), so the same code runs on
both; pipelines over many robots are split per node by the cluster client.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

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
