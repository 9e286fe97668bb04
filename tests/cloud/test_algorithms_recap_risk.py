"""RECAP's value function deployed with the policy: RECAP trains the policy's own module, its weights ride in the
published state dict (full and delta transfers, the edge's in-place standby load), and the edge's
``failure_risk`` (the help signal's risk) is the trainer's predicted failure. HG-DAgger's policy has none."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cloud.algorithms.hg_dagger import HGDAgger, HGDAggerConfig
from cloud.algorithms.recap import Recap, RecapConfig
from cloud.policy_store import PolicyStore
from cloud.publisher import Publisher
from edge.agent import build_fleet_policy
from edge.help import HelpConfig, HelpScorer
from fleet.errors import ConfigError
from fleet.policies import PolicyConfig, build_policy, set_torch_threads
from fleet.policies.value import PREFIX, ValueFunction, failure_threshold, value_input
from tests.cloud.test_algorithms_recap import SCHEMA, TASKS, TINY, episode_batch
from tests.cloud import test_policy_distribution as distribution
from tests.cloud.test_policy_distribution import assert_holds, make_updater, pieces
from tests.transfers import encode_transfer


@pytest.fixture(autouse=True)
def _one_thread():
    set_torch_threads(1)


def _observation(progress: float, task: int) -> dict[str, np.ndarray]:
    """A state as episode_batch makes them: progress t / length, and the task id (task 1 always fails)."""
    return {"state": np.array([progress, task, 0.0, 0.0], np.float32)}


def _trainer_risk(policy, obs: dict[str, np.ndarray], task: int) -> float:
    """The trainer's predicted failure for one observation, through its own value function."""
    with torch.no_grad():
        x = policy.value_input(lambda name: obs[name][None], (1,), np.array([task]))
        return float(policy.value.failure_risk(x, torch.tensor([task])))


def test_failure_threshold_separates_successful_from_failed_returns():
    # C = 0 means C = L_max: tau = -1/2 whatever the task's longest episode
    assert failure_threshold(20, 0) == failure_threshold(500, 0) == -0.5
    for longest, penalty in ((20, 0), (20, 20), (20, 50), (7, 3)):
        tau = failure_threshold(longest, penalty)
        c = penalty or longest
        success = [-(to_go) / (longest + c) for to_go in range(1, longest + 1)]
        failed = [-(to_go + c) / (longest + c) for to_go in range(1, longest + 1)]
        assert min(success) >= tau  # a success never lies below tau
        if c >= longest:
            assert max(failed) < tau  # ... and then every failure does
        else:
            assert min(failed) < tau < max(failed)  # C < L_max: a lower bound (the last steps overlap)


def test_recap_publishes_its_value_function_and_the_edge_predicts_failure(tmp_path: Path):
    cfg = RecapConfig(n_step=5, value_lr=1e-2, value_hidden_dim=32, value_bins=51, value_warmup_steps=0)
    policy_cfg = Recap.policy_config(dataclasses.replace(TINY, conditioning="none"), SimpleNamespace(algorithm=cfg))
    assert (policy_cfg.conditioning, policy_cfg.value_head, policy_cfg.value_hidden_dim, policy_cfg.value_bins) == (
        "advantage", "distributional", 32, 51)
    policy = build_policy(policy_cfg, SCHEMA, TASKS)
    recap = Recap(policy, cfg)
    assert recap.value is policy.value  # one module: what RECAP trains is what is published
    before = {k: v.clone() for k, v in policy.tensors().items() if k.startswith(PREFIX)}
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    for _ in range(200):
        recap.update(episode_batch(rng, 32))
    assert all(not torch.equal(policy.tensors()[k], v) for k, v in before.items() if ".net." in k)

    store = PolicyStore(tmp_path / "store")
    published = store.publish(policy.tensors(), policy.manifest_config(), policy.trainable_names())
    names = {t.name for t in published.tensors}
    assert {PREFIX + "failure_threshold", PREFIX + "net.0.weight"} <= names
    assert all(t.trainable for t in published.tensors if t.name.startswith(PREFIX + "net."))
    edge = build_fleet_policy(published, store.tensors(published.version))
    assert isinstance(edge.value, ValueFunction) and edge.config.value_head == "distributional"

    scorer = HelpScorer(HelpConfig(weight_uncertainty=0.0, weight_stall=0.0, weight_risk=1.0, threshold=0.6))
    for task, progress in ((1, 0.1), (1, 0.8), (0, 0.1), (0, 0.8)):
        obs = _observation(progress, task)
        edge.select_action(obs, TASKS[task])
        assert edge.failure_risk == pytest.approx(_trainer_risk(policy, obs, task), abs=1e-5)
        signal = scorer.update(obs, 0.0, edge, now_s=0.0)
        assert signal.risk == pytest.approx(edge.failure_risk)
        if task == 1:  # trained to see this task fail
            assert edge.failure_risk > 0.9 and signal.wanted, (progress, edge.failure_risk)
        else:  # ... and this one succeed
            assert edge.failure_risk < 0.1 and not signal.wanted, (progress, edge.failure_risk)
    edge.reset()
    assert edge.failure_risk == 0.0


def test_scalar_head_risk_is_the_least_failure_probability_its_mean_allows():
    torch.manual_seed(0)
    value = ValueFunction(state_dim=1, n_tasks=1, hidden_dim=16, layers=1, head="scalar")
    optimizer = torch.optim.AdamW(value.parameters(), lr=1e-2)
    state = torch.tensor([[-1.0], [1.0]])  # -1: always fails (v ~ -0.9), +1: always succeeds (v ~ -0.2)
    x = value_input(state, torch.zeros(2, dtype=torch.long), 1)
    for _ in range(300):
        optimizer.zero_grad()
        value.loss(x, torch.tensor([-0.9, -0.2])).mean().backward()
        optimizer.step()
    with torch.no_grad():
        v, risk = value.value(x), value.failure_risk(x, torch.zeros(2, dtype=torch.long))
    np.testing.assert_allclose(v.numpy(), [-0.9, -0.2], atol=0.02)
    np.testing.assert_allclose(risk.numpy(), [(-0.5 + 0.9) / 0.5, 0.0], atol=0.05)  # (tau - V) / (1 + tau)


def test_hg_dagger_policy_has_no_value_head_and_no_risk():
    plain = dataclasses.replace(TINY, conditioning="none")
    cfg = HGDAgger.policy_config(plain, SimpleNamespace(algorithm=HGDAggerConfig()))
    assert cfg.value_head == "none"
    policy = build_policy(cfg, SCHEMA, TASKS)
    assert policy.value is None
    assert not any(k.startswith(PREFIX) for k in policy.tensors())
    model_bytes = sum(v.numel() * v.element_size() for v in policy.model.state_dict().values())
    norm_bytes = sum(v.numel() * v.element_size() for k, v in policy.tensors().items() if k.startswith("fleet_norm."))
    assert sum(v.numel() * v.element_size() for v in policy.tensors().values()) == model_bytes + norm_bytes
    policy.select_action(_observation(0.1, 1), TASKS[1])
    assert policy.failure_risk == 0.0
    with pytest.raises(ConfigError, match="value_head"):
        PolicyConfig(value_head="ensemble")


@pytest.mark.timeout(90)
def test_a_delta_transfer_updates_the_value_head_in_place(gateway, redis_client, tmp_path: Path):
    store = PolicyStore(gateway.cfg.policy_dir, redis_client)
    publisher = Publisher(store, every_steps=1, full_every_versions=0)
    policy = build_policy(dataclasses.replace(distribution.SMALL, value_head="scalar", value_hidden_dim=16,
                                              value_layers=1), distribution.SCHEMA, distribution.TASKS)
    follower = make_updater("follower", gateway.target, tmp_path)
    follower.start()
    try:
        assert follower.wait_version(publisher.publish(policy, 1).version, timeout_s=30)
        with torch.no_grad():  # only the value function changes (a RECAP step of its own optimizer)
            policy.value.net[-1].bias.add_(0.5)
            policy.value.failure_threshold.fill_(-0.25)
        version = publisher.publish(policy, 2).version
        sent = {p.name for p in pieces(encode_transfer(store, version, base_version=version - 1))}
        assert sent == {PREFIX + "net.3.bias", PREFIX + "failure_threshold"}
        assert follower.wait_version(version, timeout_s=30)
        assert follower.last_transfer.base_version == version - 1
        assert_holds(follower, store, version)  # the edge's policy holds the new value head, bit for bit
        assert follower.standby.models_built == 1  # written into the standby model, not rebuilt
        edge = follower.slot.current
        obs = {"state": np.linspace(-1, 1, 6, dtype=np.float32)}
        edge.select_action(obs, distribution.TASKS[0])
        assert edge.failure_risk == pytest.approx(_trainer_risk(policy, obs, 0), abs=1e-6)
    finally:
        follower.stop()
