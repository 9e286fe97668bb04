"""Gateway side of policy distribution: know the newest version, encode each version once.

One subscriber per gateway listens on Redis pub/sub for new versions (and
re-reads the pointer periodically, in case a message was missed); every
``WatchPolicy`` stream waits on one asyncio.Condition. A version's wire messages
are built once, on first request, and shared by every robot that fetches it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from cloud.buffer import POLICY_CHANNEL, POLICY_LATEST_KEY
from cloud.policy_store import PolicyStore
from fleet.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)

PIECE_BYTES = 1 << 20  # well under the 4 MiB default gRPC message limit


def encode_version(store: PolicyStore, version: int) -> list[pb.PolicyUpdate]:
    """Header, pieces of at most PIECE_BYTES, trailer: a full transfer of ``version``."""
    manifest = store.manifest(version)
    payload = store.payload(version)
    msgs = [pb.PolicyUpdate(header=pb.PolicyHeader(version=version, base_version=0,
                                                   manifest_json=manifest.to_json(),
                                                   payload_bytes=manifest.total_bytes))]
    for entry in manifest.tensors:
        data = payload[entry.name]
        for offset in range(0, max(len(data), 1), PIECE_BYTES):
            msgs.append(pb.PolicyUpdate(piece=pb.TensorPiece(name=entry.name, offset=offset,
                                                             data=data[offset:offset + PIECE_BYTES], encoding="raw")))
    msgs.append(pb.PolicyUpdate(trailer=pb.PolicyTrailer(sha256=manifest.total_sha256)))
    return msgs


class PolicyFeed:
    def __init__(self, redis, store: PolicyStore, cache_versions: int = 4, poll_s: float = 2.0):
        self._redis = redis
        self._store = store
        self._latest = 0
        self._cond = asyncio.Condition()
        self._cache: OrderedDict[int, list[pb.PolicyUpdate]] = OrderedDict()
        self._cache_versions = cache_versions
        self._locks: dict[int, asyncio.Lock] = {}
        self._poll_s = poll_s
        self._task: asyncio.Task | None = None
        self._stopping = False

    @property
    def latest(self) -> int:
        return self._latest

    async def start(self) -> None:
        await self._refresh()
        self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
            # redis-py's pubsub can swallow a cancellation mid-read; the flag ends the loop then.
            await asyncio.wait([self._task], timeout=self._poll_s + 1.0)

    async def _refresh(self) -> None:
        value = int(await self._redis.get(POLICY_LATEST_KEY) or 0)
        if value > self._latest:
            async with self._cond:
                self._latest = value
                self._cond.notify_all()

    async def _listen(self) -> None:
        while not self._stopping:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(POLICY_CHANNEL)
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

    async def messages(self, version: int) -> list[pb.PolicyUpdate]:
        cached = self._cache.get(version)
        if cached is not None:
            self._cache.move_to_end(version)
            return cached
        lock = self._locks.setdefault(version, asyncio.Lock())
        async with lock:  # encode once even if many robots ask at the same moment
            if version not in self._cache:
                self._cache[version] = await asyncio.to_thread(encode_version, self._store, version)
                while len(self._cache) > self._cache_versions:
                    self._cache.popitem(last=False)
            self._locks.pop(version, None)
            return self._cache[version]
