"""The retention policy (cloud/retention.py:choose_evictions) over catalog entries: budgets by bytes (buffer,
robot, task, Redis) and by age, tiers, unfinished episodes, watermarks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.buffer.reader import EpisodeInfo
from cloud.retention import choose_evictions, tier_of
from fleet.gateway_config import RetentionConfig
from fleet.errors import ConfigError

NOW = 1_000_000.0


def ep(eid: str, first_s: float, *, robot: str = "r1", task: str = "pick", source: str = "online",
       interventions: int = 0, redis_bytes: int = 100, blob_bytes: int = 0, ended: bool = True,
       updated_s: float | None = None) -> EpisodeInfo:
    return EpisodeInfo(robot, eid, task, source, False, ended, True, 10, redis_bytes, blob_bytes, interventions,
                       first_s, first_s + 10 if updated_s is None else updated_s)


def ids(evictions) -> list[str]:
    return [ev.episode.episode_id for ev in evictions]


def test_no_budget_evicts_nothing():
    episodes = [ep(f"e{i}", NOW - 1e6 + i) for i in range(5)]
    assert choose_evictions(episodes, RetentionConfig(), NOW) == []


def test_tiers():
    assert tier_of(ep("a", 0)) == "online"
    assert tier_of(ep("a", 0, interventions=3)) == "intervention"
    assert tier_of(ep("a", 0, source="offline", interventions=3)) == "offline"


def test_buffer_budget_evicts_oldest_online_first_then_interventions_then_demonstrations():
    episodes = [ep("demo-old", 0, source="offline"), ep("hg-old", 10, interventions=5), ep("on-new", 50),
                ep("on-old", 20), ep("hg-new", 60, interventions=1), ep("demo-new", 70, source="offline")]
    # 600 bytes, budget 450, watermark 0.9 -> down to 405: two online episodes (400 left)
    got = choose_evictions(episodes, RetentionConfig(max_bytes=450), NOW)
    assert ids(got) == ["on-old", "on-new"]
    assert {ev.reason for ev in got} == {"buffer_bytes"} and {ev.tier for ev in got} == {"online"}
    # budget 250 -> down to 225: all online, then the older intervention episode, then the newer
    assert ids(choose_evictions(episodes, RetentionConfig(max_bytes=250), NOW)) == \
        ["on-old", "on-new", "hg-old", "hg-new"]
    assert ids(choose_evictions(episodes, RetentionConfig(max_bytes=100, low_watermark=1.0), NOW)) == \
        ["on-old", "on-new", "hg-old", "hg-new", "demo-old"]


def test_blob_bytes_count_towards_the_buffer_budget_but_not_the_redis_budget():
    episodes = [ep("a", 0, redis_bytes=10, blob_bytes=1000), ep("b", 1, redis_bytes=10, blob_bytes=1000)]
    assert ids(choose_evictions(episodes, RetentionConfig(max_bytes=1500), NOW)) == ["a"]
    assert choose_evictions(episodes, RetentionConfig(redis_max_bytes=100), NOW) == []


def test_redis_budget_uses_redis_used_memory_when_given():
    episodes = [ep(f"e{i}", i, redis_bytes=100) for i in range(4)]
    cfg = RetentionConfig(redis_max_bytes=1000)
    assert choose_evictions(episodes, cfg, NOW) == []  # 400 bytes in the catalogs
    got = choose_evictions(episodes, cfg, NOW, redis_used_bytes=1150)  # overhead: 1150 used, down to 900
    assert ids(got) == ["e0", "e1", "e2"] and {ev.reason for ev in got} == {"redis_bytes"}
    # Overhead alone over the budget: evicting every episode could not meet it, so none go for it.
    assert choose_evictions(episodes, cfg, NOW, redis_used_bytes=2000) == []


def test_robot_budget_touches_only_the_robot_over_it():
    episodes = [ep(f"a{i}", i, robot="a") for i in range(5)] + [ep(f"b{i}", i - 100, robot="b") for i in range(5)]
    got = choose_evictions(episodes, RetentionConfig(robot_max_bytes=300), NOW)
    assert ids(got) == ["b0", "b1", "b2", "a0", "a1", "a2"]  # each robot down to 270: 2 left each
    assert {ev.reason for ev in got} == {"robot_bytes"}


def test_task_budget():
    episodes = [ep(f"p{i}", i, task="pick") for i in range(4)] + [ep(f"s{i}", i, task="stack") for i in range(2)]
    got = choose_evictions(episodes, RetentionConfig(task_max_bytes=300), NOW)
    assert ids(got) == ["p0", "p1"] and {ev.reason for ev in got} == {"task_bytes"}


def test_age_limits_per_tier():
    old, recent = NOW - 7200, NOW - 60
    episodes = [ep("on-old", old), ep("on-recent", recent), ep("hg-old", old, interventions=2),
                ep("demo-old", old, source="offline")]
    got = choose_evictions(episodes, RetentionConfig(online_max_age_s=3600), NOW)
    assert ids(got) == ["on-old"] and got[0].reason == "age"
    got = choose_evictions(episodes, RetentionConfig(online_max_age_s=3600, intervention_max_age_s=3600,
                                                     offline_max_age_s=3600), NOW)
    assert ids(got) == ["on-old", "hg-old", "demo-old"]


def test_age_counts_from_the_last_write():
    long_running = ep("long", NOW - 7200, updated_s=NOW - 10)
    assert choose_evictions([long_running], RetentionConfig(online_max_age_s=3600), NOW) == []


def test_unfinished_episodes_are_kept_until_abandoned():
    streaming = ep("streaming", NOW - 100, ended=False, updated_s=NOW - 1)
    abandoned = ep("abandoned", NOW - 9000, ended=False, updated_s=NOW - 7200)
    cfg = RetentionConfig(max_bytes=50, online_max_age_s=60, open_episode_grace_s=3600)
    assert ids(choose_evictions([streaming, abandoned], cfg, NOW)) == ["abandoned"]


def test_eviction_order_is_configurable():
    episodes = [ep("demo", 0, source="offline"), ep("on", 10), ep("hg", 20, interventions=1)]
    cfg = RetentionConfig(max_bytes=150, eviction_order=("offline", "online", "intervention"))
    assert ids(choose_evictions(episodes, cfg, NOW)) == ["demo", "on"]


@pytest.mark.parametrize("bad, match", [
    ({"max_bytes": -1}, "max_bytes"), ({"max_bytes": 1.5}, "max_bytes"),
    ({"online_max_age_s": float("inf")}, "online_max_age_s"), ({"low_watermark": 0.0}, "low_watermark"),
    ({"eviction_order": ("online", "offline")}, "eviction_order"), ({"archive_tiers": ("gold",)}, "archive_tiers"),
    ({"interval_s": 0}, "interval_s")])
def test_config_refuses_values_that_cannot_work(bad, match):
    with pytest.raises(ConfigError, match=match):
        RetentionConfig(**bad)


episode_lists = st.lists(st.builds(
    ep, st.uuids().map(lambda u: u.hex[:8]), st.floats(0, 1e5), robot=st.sampled_from(["a", "b", "c"]),
    task=st.sampled_from(["pick", "stack"]), source=st.sampled_from(["online", "offline"]),
    interventions=st.sampled_from([0, 0, 3]), redis_bytes=st.integers(1, 1000), blob_bytes=st.integers(0, 5000),
    ended=st.sampled_from([True, True, True, False])), max_size=40, unique_by=lambda e: e.episode_id)


@settings(max_examples=150, deadline=None)
@given(episodes=episode_lists, budget=st.integers(0, 60_000), watermark=st.sampled_from([0.5, 0.9, 1.0]))
def test_a_buffer_budget_is_met_with_the_least_valuable_episodes(episodes, budget, watermark):
    cfg = RetentionConfig(max_bytes=budget, low_watermark=watermark, open_episode_grace_s=1e9)
    got = choose_evictions(episodes, cfg, NOW)
    evicted = {id(ev.episode) for ev in got}
    kept = [e for e in episodes if id(e) not in evicted]
    total = sum(e.redis_bytes + e.blob_bytes for e in kept)
    rank = {t: i for i, t in enumerate(cfg.eviction_order)}
    key = lambda e: (rank[tier_of(e)], e.first_s)  # noqa: E731
    if not budget or sum(e.redis_bytes + e.blob_bytes for e in episodes) <= budget:
        assert got == []
        return
    assert all(ev.episode.ended for ev in got), "an episode being written was evicted"
    kept_ended = [e for e in kept if e.ended]
    assert total <= watermark * budget or not kept_ended, "over budget with evictable episodes left"
    if got and kept_ended:  # nothing kept is less valuable than something evicted
        assert max(key(ev.episode) for ev in got) <= min(key(e) for e in kept_ended)
    # evicting one episode fewer would not have been enough
    if got:
        assert total + got[-1].episode.redis_bytes + got[-1].episode.blob_bytes > watermark * budget
