"""Network addresses: ``host:port`` parsed, and whether one stays on this machine (shared by the gateway's
protected mode and the edge's refusal to talk plaintext beyond loopback)."""

from __future__ import annotations

import ipaddress


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``; host may be empty) as (host without brackets, port); ValueError if not."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` names loopback only (127.0.0.0/8, ::1, localhost); "" / [::] / 0.0.0.0 do not."""
    host = address.rpartition(":")[0].strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # another host name: it may resolve to anything, so not loopback
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback
