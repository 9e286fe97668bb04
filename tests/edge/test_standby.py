"""In-place load on the edge: versions are written into a standby model swapped with the acting one, no model
is built per version, at most two are resident, and rollback after the previous model's memory was reused goes
through the last good policy on disk. Real gateway, real LeRobot ACT policies."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import pytest
import torch

from cloud.policy_store import PolicyStore
from cloud.publisher import Publisher
from fleet.policies import FleetPolicy
from tests.cloud.test_policy_distribution import act_with_frozen_encoder, make_updater, update
from tests.waiting import wait_until


def live_models() -> int:
    gc.collect()
    return sum(type(o) is FleetPolicy for o in gc.get_objects())


def weights_of(policy: FleetPolicy, store: PolicyStore, version: int) -> bool:
    mine = policy.tensors()
    return policy.version == version and all(torch.equal(mine[k], t) for k, t in store.tensors(version).items())


def start_edge(name: str, gateway, redis_client, tmp_path: Path):
    """The store the gateway serves, a publisher into it, a trainer-side policy, and a started updater."""
    store = PolicyStore(gateway.cfg.policy_dir, redis_client)
    publisher = Publisher(store, every_steps=1, full_every_versions=0)
    edge = make_updater(name, gateway.target, tmp_path)
    edge.start()
    return store, publisher, act_with_frozen_encoder(), edge


@pytest.mark.timeout(90)
def test_versions_go_into_the_standby_model_and_rollback_reloads_from_disk(gateway, redis_client,
                                                                            tmp_path: Path) -> None:
    store, publisher, trainer_policy, edge = start_edge("standby", gateway, redis_client, tmp_path)
    slot = edge.slot
    try:
        baseline = live_models()  # the trainer's policy
        update(trainer_policy, seed=1)
        v1 = publisher.publish(trainer_policy, 1).version
        assert edge.wait_version(v1, timeout_s=30) and slot.swap_if_pending()
        first = slot.current
        update(trainer_policy, seed=2)
        v2 = publisher.publish(trainer_policy, 2).version  # no swap before v3: v3 is written over v2
        assert edge.wait_version(v2, timeout_s=30)
        second = slot.take_pending()
        slot.offer(second)
        update(trainer_policy, seed=3)
        v3 = publisher.publish(trainer_policy, 3).version
        assert edge.wait_version(v3, timeout_s=30) and edge.last_transfer.base_version == v2
        assert slot.swap_if_pending() and slot.current is second and weights_of(second, store, v3)
        update(trainer_policy, seed=4)
        v4 = publisher.publish(trainer_policy, 4).version  # into the previous model, the first one
        assert edge.wait_version(v4, timeout_s=30) and edge.last_transfer.base_version == v3
        assert slot.swap_if_pending() and slot.current is first and weights_of(first, store, v4)
        assert edge.standby.models_built == 2 and live_models() - baseline <= 2  # v1's and v2's, then reused
        assert edge.rejected == 0

        update(trainer_policy, seed=5)
        v5 = publisher.publish(trainer_policy, 5).version  # into the second model (it held v3)
        assert edge.wait_version(v5, timeout_s=30) and slot.swap_if_pending() and slot.current is second
        assert edge.standby.claim(store.manifest(v5)) is first  # what the next version's header does
        assert not slot.rollback("NaN actions")  # v4's model is the standby now: the updater reloads v4
        assert edge.wait(lambda u: slot.pending_version == v4, timeout_s=30)
        assert edge.refused_version == v5 and edge.last_good.version() == v4 and edge.have_version == v4
        assert slot.swap_if_pending() and slot.current is first and weights_of(first, store, v4)
        assert edge.standby.models_built == 2 and live_models() - baseline <= 2
    finally:
        edge.stop()


@pytest.mark.timeout(90)
def test_weights_without_host_views_are_loaded_in_place_not_rebuilt(gateway, redis_client, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """A model whose weights have no host view (on a GPU ``weight_views`` is {}) is reused all the same: the
    bytes are loaded into it through ``load_tensors``, no model is built per version."""
    monkeypatch.setattr(FleetPolicy, "weight_views", lambda self: {})
    store, publisher, trainer_policy, edge = start_edge("standby-nv", gateway, redis_client, tmp_path)
    slot = edge.slot
    try:
        for seed in range(1, 5):
            update(trainer_policy, seed=seed)
            version = publisher.publish(trainer_policy, seed).version
            assert edge.wait_version(version, timeout_s=30) and slot.swap_if_pending()
            assert weights_of(slot.current, store, version)
        assert edge.standby.models_built == 2 and edge.rejected == 0  # v1's and v2's, then reused
    finally:
        edge.stop()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("wait_ends_by", ["a swap", "the updater stopping"])
def test_a_boundary_missed_while_the_pending_model_was_rewritten_makes_the_next_version_wait(
        gateway, redis_client, tmp_path: Path, caplog, wait_ends_by: str) -> None:
    """Writing a new version over the pending one can make an episode boundary pass with nothing to swap. If
    that happened, the next version does not take the pending model again (transfers slower than publishing
    would then starve the robot on one version for ever): it waits for the next boundary and goes into the
    model that swap freed. An updater stopped while it waits leaves the pending version pending."""
    caplog.set_level(logging.INFO, logger="edge.standby")
    store, publisher, trainer_policy, edge = start_edge("missed", gateway, redis_client, tmp_path)
    slot = edge.slot
    try:
        update(trainer_policy, seed=1)
        v1 = publisher.publish(trainer_policy, 1).version
        assert edge.wait_version(v1, timeout_s=30) and slot.swap_if_pending()
        first = slot.current
        update(trainer_policy, seed=2)
        v2 = publisher.publish(trainer_policy, 2).version
        assert edge.wait_version(v2, timeout_s=30)
        second = slot.take_pending()  # as the updater does to write a newer version over it ...
        assert not slot.swap_if_pending() and slot.missed_swap and slot.missed_swaps == 1  # ... a boundary
        slot.offer(second)

        update(trainer_policy, seed=3)
        v3 = publisher.publish(trainer_policy, 3).version
        wait_until(lambda: f"v{v3} waits for the next episode boundary" in caplog.text, 30,
                   "the updater to wait for a boundary")
        assert slot.pending_version == v2 and edge.have_version == v2  # v2 is not written over again
        if wait_ends_by == "the updater stopping":
            edge.stop()
            assert slot.pending_version == v2 and slot.swap_if_pending() and slot.current is second
            assert weights_of(second, store, v2)
            return
        assert slot.swap_if_pending() and slot.current is second and not slot.missed_swap
        assert edge.wait_version(v3, timeout_s=30) and edge.last_transfer.base_version == v2
        assert slot.swap_if_pending() and slot.current is first and weights_of(first, store, v3)
        assert edge.standby.models_built == 2 and edge.rejected == 0
    finally:
        edge.stop()
