"""The sampler's frame arena on a real redis-server: camera frames decoded once per cached episode and
gathered like the low-dim columns, bounded by ``frame_cache_bytes`` (FIFO, the rest decoded when
sampled), growing episodes, corrupt frames, and batches ready for pinned-memory transfer."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from cloud.buffer import SOURCE_OFFLINE
from cloud.sampler import Sampler, SamplerConfig, host_empty
from fleet.codec import encode_image
from fleet.errors import ConfigError
from fleet.types import Chunk, EncodedImage, FeatureSpec, Schema
from tests.cloud.fleet_sim import IngestSink, synthetic_episode

TASKS = ("task a",)
SHAPE = (8, 6, 3)
SCHEMA = Schema((FeatureSpec("state", "float32", (4,)), FeatureSpec("cam", "uint8", SHAPE, is_image=True)),
                FeatureSpec("action", "float32", (2,)))
ROW = int(np.prod(SHAPE))

pytestmark = pytest.mark.timeout(60)


def value(length, t):
    """The pixel value of step t of the episode of ``length`` steps (lossless PNG frames)."""
    return (np.asarray(length) - 10) * 40 + np.asarray(t) * 3


def episode(length: int, first: int = 0, end: int | None = None):
    steps, summary = synthetic_episode(0, length)
    for s in steps:
        s.images = {"cam": encode_image(np.full(SHAPE, value(length, s.index), np.uint8), "png")}
    return steps[first:end], summary


@pytest.fixture
def demos(redis_proc):
    sink = IngestSink(redis_proc.url, "demos", SCHEMA, TASKS, source=SOURCE_OFFLINE)
    for length in (10, 11, 12, 13):
        sink.write_episode(TASKS[0], *episode(length))
    return sink


def make(redis_client, batch_size=32, **cfg) -> Sampler:
    sampler = Sampler(redis_client, TASKS, 3, batch_size=batch_size, online_fraction=0.0, seed=0,
                      config=SamplerConfig(**cfg))
    sampler.refresh()
    return sampler


def assert_frames_right(batch):
    want = value(batch["obs/state"][:, 2], batch["t"])
    np.testing.assert_array_equal(batch["obs/cam"], np.broadcast_to(want[:, None, None, None], batch["obs/cam"].shape))


def test_frames_are_decoded_once_into_the_arena_and_gathered(demos, redis_client):
    cached, decoding = make(redis_client), make(redis_client, frame_cache_bytes=0)
    for _ in range(5):
        batch, same = cached.sample(), decoding.sample()
        assert_frames_right(batch)
        assert batch.keys() == same.keys()
        for key in batch:
            np.testing.assert_array_equal(batch[key], same[key], err_msg=key)
    arena = cached.cache.frames
    assert arena.used == 10 + 11 + 12 + 13 and arena.garbage == 0
    assert all(e.frames_ready == e.length and e.frame_base >= 0 for e in cached.cache._entries.values())
    assert decoding.cache.frames.used == 0  # no budget: every sampled frame decoded into its batch


def test_frames_past_the_budget_are_decoded_when_sampled(demos, redis_client):
    sampler = make(redis_client, frame_cache_bytes=25 * ROW)  # two episodes' frames at most
    for _ in range(10):
        assert_frames_right(sampler.sample())
    entries = list(sampler.cache._entries.values())
    in_arena = [e for e in entries if e.frame_base >= 0]
    assert len(entries) == 4 and 1 <= len(in_arena) <= 2
    assert sampler.cache.frames.nbytes <= 25 * ROW
    # FIFO: the frames that left are the oldest entries'; the newest kept theirs.
    assert entries[-1].frame_base >= 0 and all(e.frames_left for e in entries if e.frame_base < 0)


def test_a_growing_episode_keeps_its_frames_and_eviction_frees_them(redis_proc, redis_client):
    sink = IngestSink(redis_proc.url, "demos", SCHEMA, TASKS, source=SOURCE_OFFLINE)
    head, summary = episode(12, 0, 5)

    def write(steps, end=None):
        for s in steps:
            sink.seq += 1
            s.seq = sink.seq
        asyncio.run(sink._call(lambda ingest: ingest.write(Chunk("demos", "grow", TASKS[0], steps, episode_end=end))))

    write(head)
    sampler = make(redis_client)
    assert_frames_right(sampler.sample())
    write(episode(12, 5)[0], summary)
    sampler.refresh()
    for _ in range(5):
        batch = sampler.sample()
        assert_frames_right(batch)
    (entry,) = sampler.cache._entries.values()
    assert entry.length == entry.frames_ready == 12 and batch["t"].max() >= 5
    sampler.cache.forget("demos", "grow")
    sampler.cache.trim()
    assert sampler.cache.frames.used == 0  # the freed rows are reclaimed


def test_a_corrupt_frame_quarantines_its_episode(demos, redis_client):
    steps, summary = episode(14)
    for s in steps:  # JPEG frames (one encoding per camera and chunk), one cut short after its header
        s.images = {"cam": encode_image(np.full(SHAPE, 9, np.uint8), "jpeg")}
    data = steps[7].images["cam"].data
    steps[7].images = {"cam": EncodedImage("jpeg", *SHAPE, data[:len(data) - 40] + b"\xff\xd9")}
    demos.write_episode(TASKS[0], steps, summary, episode_id="bad")
    sampler = make(redis_client)
    for _ in range(10):
        assert_frames_right(sampler.sample())
    assert sampler.index.skipped["corrupt_image"] == 1
    arena = sampler.cache.frames  # its rows are garbage, reclaimed by the next compaction
    assert ("demos", "bad") not in sampler.cache._entries and arena.used - arena.garbage == 10 + 11 + 12 + 13


def test_batches_are_pinned_exactly_when_cuda_can_use_them(demos, redis_client):
    sampler, plain = make(redis_client), make(redis_client, pin_memory=False)
    assert sampler.pinned == torch.cuda.is_available() and not plain.pinned
    batch, same = sampler.sample(), plain.sample()
    for key, array in batch.items():
        assert torch.from_numpy(array).is_pinned() == sampler.pinned, key
        assert array.flags.c_contiguous and array.flags.writeable, key
        np.testing.assert_array_equal(array, same[key], err_msg=key)
    assert type(host_empty((2, 3), np.float32, pinned=False)) is np.ndarray
    with pytest.raises(ConfigError, match="frame_cache_bytes"):
        SamplerConfig(frame_cache_bytes=-1)
