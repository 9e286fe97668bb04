"""The edge end of the weight side channel (``cloud.gateway.weight_channel`` has the protocol).

With a ticket in a transfer's header, the tensors are fetched over plain TCP: each raw tensor is received
with ``recv_into`` straight into the standby model's memory, up to ``RECV_BYTES`` (whole manifest pieces) per
call, and the BLAKE3 digest of each piece in it is checked right after, on the receiving thread (the kernel
keeps queueing the next bytes meanwhile). A helper thread hashing each piece from the other core cost ~0.1
CPU s per GB more on the 2-core bench machine (a hand-off per piece, the piece read back from the other
core's cache) and was no faster. Without a standby tensor (the first version), pieces go through one reused
buffer into ``Assembler.add``; a delta's encoded bytes (at most the tensor's size) are received whole. The
manifest came signed on the gRPC stream, so a corrupt or truncated side channel raises IntegrityError exactly
like a corrupt gRPC transfer (nothing received is used before ``Assembler.finish``).

``SideChannelUnavailable``: no connection, or closed before the first tensor (a refused ticket): the
updater then takes the same version over gRPC.
"""

from __future__ import annotations

import socket
import struct

from edge.assembler import MAX_DELTA_OVERHEAD, Assembler
from edge.client import PolicyPieceEvent
from fleet import delta
from fleet.errors import IntegrityError
from fleet.weights import PIECE_BYTES

RECV_BYTES = 4 << 20
"""Bytes of a tensor received into the standby model per call (whole pieces), then checked piece by piece:
~0.08-0.11 CPU s per GB less on the edge than a call per 1 MiB piece (A/B on the 450M layout, 2-core bench
machine; 2 MiB gained nothing)."""
MAGIC = b"FLW1"
FRAME = struct.Struct("<HBQ")
"""Per tensor: len(name), len(encoding), len(data) (as the gateway sends it)."""


class SideChannelUnavailable(Exception):
    """The side channel could not be used for this transfer (fall back to gRPC)."""


def receive(address: tuple[str, int], ticket: bytes, robot_id: str, assembler: Assembler,
            timeout_s: float = 30.0) -> int:
    """Fetch the transfer of ``ticket`` into ``assembler`` (then ``finish`` it with the gRPC trailer); returns
    the tensor bytes received."""
    try:
        sock = socket.create_connection(address, timeout=timeout_s)
    except OSError as exc:
        raise SideChannelUnavailable(f"cannot connect to the weight side channel {address}: {exc}") from exc
    # Blocking, with the timeout in the kernel (SO_RCVTIMEO/SO_SNDTIMEO): each recv then fills a whole piece
    # (MSG_WAITALL) instead of returning what one poll found, ~16x fewer system calls.
    timeval = struct.pack("ll", int(timeout_s), int(timeout_s % 1 * 1e6))
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    rid = robot_id.encode()
    with sock:
        frames = 0
        try:
            sock.sendall(MAGIC + ticket + struct.pack("<H", len(rid)) + rid)
            received, scratch = 0, None
            step = assembler.manifest.piece_bytes or PIECE_BYTES
            run = step * max(1, RECV_BYTES // step)
            while True:
                head = _recv(sock, FRAME.size, first=frames == 0)
                name_len, enc_len, length = FRAME.unpack(head)
                if name_len == 0:
                    break
                text = _recv(sock, name_len + enc_len)
                try:
                    name, encoding = text[:name_len].decode(), text[name_len:].decode()
                except UnicodeDecodeError:
                    raise IntegrityError("side channel: undecodable tensor name") from None
                frames += 1
                entry = assembler.entry(name)
                if encoding == delta.RAW:
                    dest = assembler.raw_into(name, length)
                    if dest is not None:  # up to RECV_BYTES per system call, then each piece in it checked
                        for start in range(0, max(length, 1), run):  # an empty tensor: one empty piece
                            end = min(start + run, length)
                            _recv_into(sock, dest[start:end])
                            for offset in range(start, max(end, start + 1), step):
                                assembler.check_in_place(name, offset, min(step, end - offset))
                    else:
                        scratch = scratch if scratch is not None else memoryview(bytearray(step))
                        for offset in range(0, max(length, 1), step):
                            n = min(step, length - offset)
                            _recv_into(sock, scratch[:n])
                            assembler.add(PolicyPieceEvent(name, offset, scratch[:n], delta.RAW))
                else:
                    if length > entry.nbytes + MAX_DELTA_OVERHEAD:
                        raise IntegrityError(f"{encoding} delta of {name!r} is larger than the tensor's "
                                             f"{entry.nbytes} bytes")
                    data = bytearray(length)
                    _recv_into(sock, memoryview(data))
                    assembler.add(PolicyPieceEvent(name, 0, data, encoding))
                received += length
            return received
        except (socket.timeout, BlockingIOError) as exc:  # SO_RCVTIMEO passed: EAGAIN
            raise IntegrityError(f"side channel stalled for {timeout_s:g} s: {exc}") from None
        except OSError as exc:
            if frames == 0:  # e.g. reset while presenting the ticket
                raise SideChannelUnavailable(f"weight side channel {address}: {exc}") from exc
            raise IntegrityError(f"side channel broken mid-transfer: {exc}") from None


def _recv(sock: socket.socket, n: int, first: bool = False) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), first)
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview, first: bool = False) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            if first and got == 0:
                raise SideChannelUnavailable("the gateway closed the weight side channel before sending (ticket "
                                             "refused or expired?)")
            raise IntegrityError(f"side channel transfer truncated ({got} of {n} bytes of a frame)")
        got += k
