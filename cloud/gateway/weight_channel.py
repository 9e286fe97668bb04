"""The weight side channel: tensor bytes over plain TCP with ``os.sendfile``, next to gRPC.

gRPC's Python API copies every message into a ``bytes`` object on both ends (~0.4-0.5 CPU s per GB on
the gateway, 0.7-0.85 on the edge, bench/weight_sync.py), so a 0.9 GB VLA costs more CPU in the
transport than in verifying it. With ``weights_listen`` set, an edge that asks for it
(``WatchPolicyRequest.side_channel``) gets, in the transfer's header on its authenticated WatchPolicy
stream, a ticket instead of pieces: 32 random bytes, single use, bound to the robot id, the transfer
(base -> version) and its byte ranges, valid for ``weights_ticket_s``. The edge connects here and sends::

    b"FLW1" + ticket (32 bytes) + u16 len(robot_id) + robot_id

and the gateway answers with each tensor of the transfer, in the header's manifest order::

    u16 len(name), u8 len(encoding), u64 len(data), name, encoding, data     (... then a frame with len(name) = 0)

A raw tensor is ``sendfile``d from the stored safetensors file (page cache -> socket, no copy in this
process); a delta's encoded bytes (held once per (base, version)) go out with ``sendall`` from memory.
Integrity does not come from this channel: every piece is checked on the edge against the signed
manifest's digests, as on gRPC. A bad, expired, reused or foreign ticket closes the connection with a
logged, counted refusal (``refused``; ``fleet_gateway_rejected_total{code="PERMISSION_DENIED"}``).

Plaintext only: a gateway with TLS keeps the weights on gRPC (``GatewayConfig`` refuses
``weights_listen`` with TLS; see docs/policy-distribution.md).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

from cloud.gateway.policy_feed import Part, Transfer
from fleet import metrics
from fleet.netaddr import split_host_port

log = logging.getLogger(__name__)

MAGIC = b"FLW1"
TICKET_BYTES = 32
FRAME = struct.Struct("<HBQ")
"""Per tensor: len(name), len(encoding), len(data)."""
HELLO_TIMEOUT_S = 5.0
"""A connection that has not presented its ticket by then is closed."""
MAX_TICKETS = 4096
"""Outstanding tickets (one per watching robot and transfer); beyond, the oldest are dropped."""


@dataclass(frozen=True)
class Ticket:
    robot_id: str
    version: int
    base_version: int
    parts: tuple[Part, ...]
    """The byte ranges the ticket opens: each tensor's bytes in the transfer (stored file or delta)."""
    expires: float


class WeightChannel:
    """A TCP listener (one thread, one more per connection) serving transfers to ticket holders."""

    def __init__(self, listen: str, ticket_s: float = 30.0, max_connections: int = 64, timeout_s: float = 30.0):
        host, port = split_host_port(listen)
        self.ticket_s, self.timeout_s, self.max_connections = ticket_s, timeout_s, max_connections
        self._sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                          backlog=128)
        self.port = self._sock.getsockname()[1]
        self.host = host
        self._tickets: dict[bytes, Ticket] = {}
        self._lock = threading.Lock()
        self._connections = 0
        self._stopping = False
        self.refused: Counter[str] = Counter()
        """Connections refused, by reason (bad_hello, unknown_ticket, expired, wrong_robot, busy)."""
        self.served = 0
        """Transfers sent in full (counted before their end frame goes out)."""
        self._thread = threading.Thread(target=self._accept, name="weight-channel", daemon=True)
        self._thread.start()
        log.info("weight side channel listening on %s:%d", host, self.port)

    @property
    def address(self) -> str:
        """What edges are told: ":port" when listening on every interface (the edge uses its gateway's host)."""
        wildcard = self.host in ("", "0.0.0.0", "::")
        return f":{self.port}" if wildcard else f"[{self.host}]:{self.port}" if ":" in self.host \
            else f"{self.host}:{self.port}"

    def issue(self, robot_id: str, transfer: Transfer) -> bytes:
        """A single-use ticket for ``robot_id`` to fetch ``transfer``'s tensors (planned in full)."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        parts = tuple(p for p in transfer.parts if isinstance(p, Part))
        now = time.monotonic()
        with self._lock:
            for key in [k for k, t in self._tickets.items() if t.expires < now]:
                del self._tickets[key]
            while len(self._tickets) >= MAX_TICKETS:
                self._tickets.pop(next(iter(self._tickets)))
            self._tickets[ticket] = Ticket(robot_id, transfer.version, transfer.base_version, parts,
                                           now + self.ticket_s)
        return ticket

    def stop(self) -> None:
        self._stopping = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5.0)

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.05)  # EMFILE and the like: try again
                continue
            with self._lock:
                busy = self._connections >= self.max_connections
                if not busy:
                    self._connections += 1
            if busy:
                self._refuse(conn, peer, "busy", "")
                continue
            threading.Thread(target=self._serve, args=(conn, peer), name="weight-send", daemon=True).start()

    def _refuse(self, conn: socket.socket, peer, reason: str, robot: str) -> None:
        self.refused[reason] += 1
        metrics.GATEWAY_REJECTED.labels(code="PERMISSION_DENIED").inc()
        log.warning("weight side channel: refused %s (robot %s): %s", peer, robot or "?", reason)
        conn.close()

    def _serve(self, conn: socket.socket, peer) -> None:
        try:
            conn.settimeout(HELLO_TIMEOUT_S)
            ticket, robot, reason = None, "", ""
            try:
                hello = _recv_exact(conn, len(MAGIC) + TICKET_BYTES + 2)
                (robot_len,) = struct.unpack_from("<H", hello, len(MAGIC) + TICKET_BYTES)
                robot = _recv_exact(conn, robot_len).decode("utf-8", "replace") if robot_len <= 1024 else ""
                if not hello.startswith(MAGIC) or robot_len > 1024:
                    reason = "bad_hello"
                else:
                    with self._lock:
                        ticket = self._tickets.pop(bytes(hello[len(MAGIC):len(MAGIC) + TICKET_BYTES]), None)
                    reason = ("unknown_ticket" if ticket is None else "expired" if ticket.expires < time.monotonic()
                              else "wrong_robot" if ticket.robot_id != robot else "")
            except (OSError, EOFError):
                reason = "bad_hello"
            if reason:
                self._refuse(conn, peer, reason, robot)
                return
            # Blocking from here, a stalled edge bounded by SO_SNDTIMEO: sendfile then moves a whole tensor per call
            # (Python's socket.sendfile on a socket with a timeout polls and sends a socket buffer at a time: ~2x
            # the CPU per GB over loopback here).
            conn.settimeout(None)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("ll", int(self.timeout_s), int(self.timeout_s % 1 * 1e6)))
            t0 = time.perf_counter()
            sent = self._send(conn, ticket)
            self.served += 1  # counted before the end frame: an edge that has the transfer sees it counted
            metrics.GATEWAY_POLICY_BYTES.labels(kind="delta" if ticket.base_version else "full").inc(sent)
            conn.sendall(FRAME.pack(0, 0, 0))
            log.info("weight side channel: sent v%d (from v%d) to %s: %.1f MB in %.2f s", ticket.version,
                     ticket.base_version, robot, sent / 1e6, time.perf_counter() - t0)
        except OSError as exc:  # the edge went away or stalled: it retries (over gRPC if need be)
            log.info("weight side channel: transfer to %s ended: %s", peer, exc)
        except Exception:  # noqa: BLE001 - one connection's failure must not take the listener down
            log.exception("weight side channel: transfer to %s failed", peer)
        finally:
            conn.close()
            with self._lock:
                self._connections -= 1

    @staticmethod
    def _send(conn: socket.socket, ticket: Ticket) -> int:
        sent = 0
        files: dict[str, object] = {}  # each stored file opened once per transfer
        try:
            for part in ticket.parts:
                name, encoding = part.name.encode(), part.encoding.encode()
                conn.sendall(FRAME.pack(len(name), len(encoding), len(part.data)) + name + encoding)
                fh = None
                if part.file is not None and len(part.data):
                    fh = files.get(part.file[0])
                    if fh is None:
                        try:
                            fh = files[part.file[0]] = open(part.file[0], "rb")
                        except OSError:  # the version was removed meanwhile: the mapping still holds its bytes
                            fh = None
                if fh is not None:
                    _sendfile(conn, fh, part.file[1], len(part.data), part.name)
                else:
                    conn.sendall(part.data)
                sent += len(part.data)
        finally:
            for fh in files.values():
                fh.close()
        return sent


def _sendfile(conn: socket.socket, fh, offset: int, count: int, name: str) -> None:
    """``count`` bytes of ``fh`` from ``offset`` into blocking ``conn`` (os.sendfile: the bytes stay in the kernel)."""
    end = offset + count
    while offset < end:
        n = os.sendfile(conn.fileno(), fh.fileno(), offset, end - offset)
        if n == 0:  # the file is shorter than when it was planned
            raise OSError(f"{fh.name}: {count - (end - offset)} of {count} bytes of {name!r}")
        offset += n


def _recv_exact(conn: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf
