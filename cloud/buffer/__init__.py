"""The experience buffer: Redis (sequence numbers, registrations, catalog, label runs, low-dim columns
one element per chunk) plus the blob store (camera frames). ``layout`` owns every key,
``writer`` is the gateway side, ``reader`` the sampler/status/export/metrics side."""

from cloud.buffer.layout import (
    EVENTS_MAXLEN,
    POLICY_CHANNEL,
    POLICY_COUNTER_KEY,
    POLICY_LATEST_KEY,
    ROBOTS_KEY,
    SOURCE_OFFLINE,
    SOURCE_ONLINE,
    PolicyKeys,
    RobotKeys,
    frames_key,
    policy_keys,
    robot_prefix,
)
from cloud.buffer.writer import (WRITE_CHUNK_LUA, BufferWriter, ChunkToWrite, ChunkWrite, EvictedEpisode,
                                 WriteResult, interpret)

__all__ = ["ChunkToWrite", "EVENTS_MAXLEN", "POLICY_CHANNEL", "POLICY_COUNTER_KEY", "POLICY_LATEST_KEY", "ROBOTS_KEY",
           "SOURCE_OFFLINE", "SOURCE_ONLINE", "WRITE_CHUNK_LUA", "BufferWriter", "ChunkWrite", "EvictedEpisode",
           "PolicyKeys", "RobotKeys", "WriteResult", "frames_key", "interpret", "policy_keys", "robot_prefix"]
