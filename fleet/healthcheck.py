"""``python -m fleet.healthcheck [URL]``: exit 0 when a fleet process is healthy (container HEALTHCHECKs).

* ``grpc://host:port[/service]``: the gateway's grpc.health.v1 Check says SERVING
  (``service`` defaults to ``fleet.v1.FleetService``; plaintext, i.e. the gateway's
  ``health_listen`` port when its main port speaks TLS);
* ``http://host:port/path``: the URL answers 2xx (the trainer's and the edge's
  Prometheus ``/metrics`` endpoint: the process is up and serving).

Without an argument the URL comes from ``$FLEET_HEALTHCHECK_URL``.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

DEFAULT_SERVICE = "fleet.v1.FleetService"


def check(url: str, timeout_s: float = 3.0) -> tuple[bool, str]:
    """(healthy, a one-line reason)."""
    parts = urlsplit(url)
    if parts.scheme == "grpc":
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        service = parts.path.lstrip("/") or DEFAULT_SERVICE
        with grpc.insecure_channel(parts.netloc) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
            except grpc.RpcError as exc:
                return False, f"{url}: {exc.code().name} {exc.details()}"
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{url}: {name}"
    if parts.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (scheme checked)
                return 200 <= resp.status < 300, f"{url}: HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            return False, f"{url}: {exc}"
    return False, f"unsupported health URL {url!r}: use grpc://host:port[/service] or http(s)://..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    url = argv[0] if argv else os.environ.get("FLEET_HEALTHCHECK_URL", "")
    if not url:
        print("usage: python -m fleet.healthcheck URL (or set FLEET_HEALTHCHECK_URL)", file=sys.stderr)
        return 2
    healthy, reason = check(url)
    print(reason, file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
