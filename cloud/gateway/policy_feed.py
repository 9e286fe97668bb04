"""Gateway side of policy distribution: know the newest version, encode each transfer once.

One subscriber per gateway listens on Redis pub/sub for new versions (and
re-reads the pointer periodically, in case a message was missed); every
``WatchPolicy`` stream waits on one asyncio.Condition.

A transfer is the stream of ``PolicyUpdate`` messages that takes an edge from
the version it holds (its base; 0 = none) to a target version: header, tensor
pieces, trailer. Each is planned once, in a thread, on first request (or ahead
of it: the delta from a new version's parent as soon as the version appears);
deltas only from the version's parent or keyframe, full weights for an edge
holding any other version; robots stream the first messages while the rest is
being encoded. A plan holds no copy of the weights: raw tensors are slices of
the stored, memory-mapped safetensors file, cut into the manifest's hashed
pieces (1 MiB) as each message goes out; only a delta's encoded bytes (made
once per (base, target) pair) are held, in a byte-bounded LRU cache. Each
message is built with exactly one copy of its bytes (page cache -> the
``bytes`` gRPC's Python API needs); gRPC core copies once more into its slice.

What a delta carries, per tensor of the target manifest:

* nothing, when the base manifest has the same sha256 (frozen tensors such as a
  VLM backbone, and anything the update did not touch);
* an element delta (``fleet.delta``) against the base's bytes, when the base is
  at or after the target's keyframe (periodic full versions bound the chain);
* the raw bytes otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterator

from cloud.policy_store import PolicyStore
from fleet import delta, metrics
from fleet.v1 import fleet_pb2 as pb
from fleet.weights import DTYPE_SIZES, Manifest

log = logging.getLogger(__name__)

PIECE_BYTES = 1 << 20  # well under the 4 MiB default gRPC message limit; raw tensors use the manifest's
CACHE_BYTES = 4 << 30


class Part:
    """One tensor of a transfer: its bytes (a view of the stored file, or a delta's encoding) and how they are
    cut into messages; ``file``: where raw bytes lie in the stored file (path, offset), for ``os.sendfile``."""

    __slots__ = ("name", "data", "encoding", "piece_bytes", "file")

    def __init__(self, name: str, data: memoryview, encoding: str, piece_bytes: int,
                 file: tuple[str, int] | None = None):
        self.name, self.data, self.encoding, self.piece_bytes, self.file = name, data, encoding, piece_bytes, file

    def messages(self) -> Iterator[bytes]:
        data, step = self.data, self.piece_bytes
        for offset in range(0, max(len(data), 1), step):
            yield _piece(self.name, offset, data[offset:offset + step], self.encoding)


class Transfer:
    """What takes an edge from ``base_version`` (0 = nothing) to ``version``: a header, tensor parts, a trailer.

    One encoder thread appends to ``parts`` while robots already send the first ones (``stream``); the list
    only grows. ``base_version`` becomes 0 if the base turned out to be unknown.
    """

    def __init__(self, version: int, base_version: int):
        self.version = version
        self.base_version = base_version
        self.parts: list[bytes | Part] = []
        self.payload_bytes = 0
        """Tensor data bytes in the pieces."""
        self.full_bytes = 0
        """What the tensors take raw (a full transfer's payload)."""
        self.tensors_sent = 0
        self.held_bytes = 0
        """Bytes this transfer holds in memory (a delta's encodings; a full transfer only maps the file)."""
        self.done = False
        self.error: BaseException | None = None
        self._waiters: list[asyncio.Future] = []
        self._wake_pending = False

    @property
    def kind(self) -> str:
        return "delta" if self.base_version else "full"

    def fill(self, parts: Iterator[bytes | Part], loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Encoder side (a thread): append every part, then mark done or failed; readers waiting on ``loop`` are
        woken as parts arrive.

        At most one wake-up is pending on the loop at a time: a part appended while one is pending is seen by
        the readers it resumes. (A wake-up per part cost a full transfer of a 500-tensor VLA ~1,000 event-loop
        round trips, ~15-25 ms of the gateway's CPU: bench/weight_sync.py.)"""
        try:
            for part in parts:
                self.parts.append(part)
                if isinstance(part, bytes):
                    self.held_bytes += len(part)
                elif part.encoding != delta.RAW:
                    self.held_bytes += len(part.data)
                self._wake(loop)
            self.done = True
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._wake_pending = False  # the end is always announced
            self._wake(loop)

    def _wake(self, loop: asyncio.AbstractEventLoop | None) -> None:
        if loop is not None and not self._wake_pending:
            self._wake_pending = True
            loop.call_soon_threadsafe(self.wake_readers)

    def wake_readers(self) -> None:
        """Event-loop side: resume every reader waiting for more."""
        self._wake_pending = False  # before the readers look: a part appended from now on schedules another
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_done(self) -> None:
        """Until every part is planned (raises the encoder's error)."""
        while not self.done and self.error is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        if self.error is not None:
            raise self.error

    async def stream(self) -> AsyncIterator[bytes]:
        """Every message, as soon as the encoder has its part."""
        sent = 0
        while True:
            while sent < len(self.parts):
                part = self.parts[sent]
                if isinstance(part, bytes):
                    yield part
                else:
                    for message in part.messages():
                        yield message
                sent += 1
            if self.error is not None:
                raise self.error
            if self.done:
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _piece(name: str, offset: int, data: memoryview, encoding: str) -> bytes:
    """A serialized ``PolicyUpdate{piece}``, copying ``data`` once (into the ``bytes`` gRPC sends).

    Serialized protobuf messages concatenate by merging, so the fields made with
    the generated class are followed by ``piece { data = 3 }`` written by hand.
    """
    head = pb.PolicyUpdate(piece=pb.TensorPiece(name=name, offset=offset, encoding=encoding)).SerializeToString()
    data_field = b"\x1a" + _varint(len(data))  # TensorPiece.data: field 3, length-delimited
    piece_field = b"\x12" + _varint(len(data_field) + len(data))  # PolicyUpdate.piece: field 2
    return b"".join((head, piece_field, data_field, data))


def iter_transfer(store: PolicyStore, transfer: Transfer, piece_bytes: int = PIECE_BYTES
                  ) -> Iterator[bytes | Part]:
    """The parts of ``transfer`` (header, tensors, trailer); sets its sizes before the header.

    A full transfer's tensors are views of the stored (memory-mapped) file, cut into the manifest's hashed
    pieces as they go out; a delta's tensors are encoded first (the header announces the payload size).
    """
    target = store.manifest(transfer.version)
    base: Manifest | None = None
    if transfer.base_version:
        try:
            base = store.manifest(transfer.base_version)
        except KeyError:
            log.info("base v%d is not in the store: sending v%d in full", transfer.base_version, transfer.version)
            transfer.base_version = 0
    payload = store.payload(transfer.version)
    located = store.payload_file(transfer.version)
    old = {e.name: e for e in base.tensors} if base else {}
    element_deltas = base is not None and transfer.base_version >= target.keyframe_version
    base_payload = None
    plan: list[tuple[str, memoryview, str]] = []
    for entry in target.tensors:
        prev = old.get(entry.name)
        same_layout = prev is not None and (prev.dtype, prev.shape) == (entry.dtype, entry.shape)
        if same_layout and prev.digest == entry.digest:
            continue  # the edge has these bytes already
        data, encoding = memoryview(payload[entry.name]), delta.RAW
        file = (str(located[0]), located[1][entry.name][0]) if located else None
        if element_deltas and same_layout:
            if base_payload is None:
                base_payload = store.payload(transfer.base_version)
            encoded = delta.encode(base_payload[entry.name], data, DTYPE_SIZES[entry.dtype])
            data, encoding, file = memoryview(encoded.data), encoded.encoding, None
        step = target.piece_bytes if encoding == delta.RAW and target.piece_bytes else piece_bytes
        plan.append(Part(entry.name, data, encoding, step, file))
    transfer.payload_bytes = sum(len(part.data) for part in plan)
    transfer.full_bytes = target.total_bytes
    transfer.tensors_sent = len(plan)
    yield pb.PolicyUpdate(header=pb.PolicyHeader(
        version=transfer.version, base_version=transfer.base_version, manifest_json=target.to_json(),
        payload_bytes=transfer.payload_bytes)).SerializeToString()
    yield from plan
    yield pb.PolicyUpdate(trailer=pb.PolicyTrailer(sha256=target.total_sha256)).SerializeToString()


class PolicyFeed:
    """The newest version (from Redis) and a byte-bounded cache of transfer plans (deltas' encodings)."""

    def __init__(self, redis, store: PolicyStore, cache_bytes: int = CACHE_BYTES, poll_s: float = 2.0,
                 piece_bytes: int = PIECE_BYTES):
        if piece_bytes < 1024:
            raise ValueError(f"piece_bytes ({piece_bytes}) must be >= 1024")
        self._redis = redis
        self._store = store
        self._latest = 0
        self._cond = asyncio.Condition()
        self._cache: OrderedDict[tuple[int, int], Transfer] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._piece_bytes = piece_bytes
        self._poll_s = poll_s
        self._task: asyncio.Task | None = None
        self._prewarm: set[asyncio.Task] = set()
        self._encoders: set[asyncio.Task] = set()
        self._stopping = False
        self._bases: dict[int, tuple[int, int]] = {}
        self.encodings: Counter[tuple[int, int]] = Counter()
        """How often each (base, version) transfer was encoded: once, however many robots fetch it."""

    @property
    def latest(self) -> int:
        return self._latest

    async def start(self) -> None:
        await self._refresh()
        self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        self._stopping = True
        for task in [self._task, *self._prewarm]:
            if task:
                task.cancel()
        if self._encoders:  # encoder threads cannot be cancelled; let them finish
            await asyncio.wait(self._encoders, timeout=30.0)
        if self._task:
            # redis-py's pubsub can swallow a cancellation mid-read; the flag ends the loop then.
            await asyncio.wait([self._task], timeout=self._poll_s + 1.0)

    async def _refresh(self) -> None:
        value = int(await self._redis.get(self._store.keys.latest) or 0)
        if value > self._latest:
            async with self._cond:
                self._latest = value
                self._cond.notify_all()
            if not self._stopping:
                task = asyncio.create_task(self._encode_ahead(value))
                self._prewarm.add(task)
                task.add_done_callback(self._prewarm.discard)

    async def _encode_ahead(self, version: int) -> None:
        """Most edges hold the previous version: build that delta before they ask."""
        try:
            manifest = await asyncio.to_thread(self._store.manifest, version)
            if manifest.parent_version:
                self.transfer(version, manifest.parent_version)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a miss here only means the first robot waits for the encoding
            log.warning("could not encode v%d ahead of requests: %s", version, exc)

    async def _listen(self) -> None:
        while not self._stopping:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._store.keys.channel)
                while not self._stopping:
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._poll_s)
                    await self._refresh()  # on a message, and every poll_s in case one was missed
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarts: resubscribe after a pause
                if not self._stopping:
                    log.warning("policy feed lost Redis (%s); retrying", exc)
                    await asyncio.sleep(1.0)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), 1.0)
                except (Exception, asyncio.CancelledError):
                    pass

    async def wait_newer(self, have: int, timeout_s: float) -> int:
        """Return the latest version once it is newer than ``have``, or the current one on timeout."""
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self._latest > have), timeout_s)
            except asyncio.TimeoutError:
                pass
            return self._latest

    async def transfer_for(self, version: int, have: int, want_full: bool) -> Transfer:
        """The transfer for an edge that holds ``have``: a delta from it when ``have`` is the version's parent
        or its keyframe (what every edge that keeps up holds), else the full weights. So the deltas encoded
        per version are bounded: edges asking from many other versions cannot make the gateway encode
        (and cache) one delta each."""
        base = 0 if want_full or have <= 0 or have >= version else have
        if base and base not in await self._delta_bases(version):
            base = 0
        return self.transfer(version, base)

    async def _delta_bases(self, version: int) -> tuple[int, int]:
        """(parent, keyframe) of ``version`` (read once per version; (0, 0) if the manifest is unreadable)."""
        bases = self._bases.get(version)
        if bases is None:
            try:
                manifest = await asyncio.to_thread(self._store.manifest, version)
                bases = (manifest.parent_version, manifest.keyframe_version)
            except Exception as exc:  # a version being garbage-collected, a broken file: send it full
                log.warning("cannot read the manifest of v%d (%s): sending it in full", version, exc)
                return 0, 0
            self._bases[version] = bases
            while len(self._bases) > 256:
                self._bases.pop(next(iter(self._bases)))
        return bases

    def transfer(self, version: int, base_version: int = 0) -> Transfer:
        """The transfer ``base_version`` -> ``version``: cached, or started now (encoded once in a thread;
        robots stream it while it is being encoded)."""
        key = (base_version, version)
        cached = self._cache.get(key)
        if cached is not None and cached.error is None:
            self._cache.move_to_end(key)
            return cached
        transfer = Transfer(version, base_version)
        self._cache[key] = transfer
        self.encodings[key] += 1
        task = asyncio.create_task(self._encode(transfer))
        self._encoders.add(task)
        task.add_done_callback(self._encoders.discard)
        return transfer

    async def _encode(self, transfer: Transfer) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        messages = iter_transfer(self._store, transfer, self._piece_bytes)
        try:
            await asyncio.to_thread(transfer.fill, messages, loop)
        except Exception as exc:  # the readers get the error; the next request encodes again
            log.warning("could not encode v%d from v%d: %s", transfer.version, transfer.base_version, exc)
            return
        seconds = time.perf_counter() - t0
        metrics.GATEWAY_POLICY_ENCODE.labels(kind=transfer.kind).observe(seconds)
        log.info("encoded v%d from v%d: %s, %d tensors, %.1f of %.1f MB in %.2fs", transfer.version,
                 transfer.base_version, transfer.kind, transfer.tensors_sent, transfer.payload_bytes / 1e6,
                 transfer.full_bytes / 1e6, seconds)
        self._evict()

    def _evict(self) -> None:
        """Drop least recently used transfers beyond the byte budget (never the newest one)."""
        total = sum(t.held_bytes for t in self._cache.values())
        while total > self._cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            total -= dropped.held_bytes
