"""End to end with real components: 2 simulated robots (real-time control loops,
spool, gRPC streamer, updater) + gateway (grpc.aio) + trainer, meeting in a real
redis-server. Steps arrive with the right fields, the trainer steps on them, a
new version reaches both edges and is swapped at an episode boundary. Signing is on: the trainer signs
every version with a publisher key from `fleet certs publisher-key`, the robots pin its public half."""

from __future__ import annotations

import threading
from collections import defaultdict

import numpy as np
import pytest

from cloud.buffer import RobotKeys
from cloud.buffer.reader import BufferReader
from edge.sim.demos import seed_scripted_demos
from cloud.policy_store import PolicyStore
from cloud.trainer import Trainer
from edge.agent import EdgeAgent, EdgeConfig
from edge.robots.config import MetaWorldConfig
from edge.loop import LoopConfig
from edge.operator import OperatorConfig
from fleet import signing
from cloud.trainer_config import TrainerConfig
from fleet.gateway_config import ClientSecurity
from fleet.policies import PolicyConfig
from tests.waiting import wait_until

TASKS = ("reach the goal", "press the button from the top")
SMALL = PolicyConfig(chunk_size=5, n_action_steps=5, dim_model=32, n_heads=2, dim_feedforward=64,
                     n_encoder_layers=1, n_decoder_layers=1)


@pytest.mark.timeout(240)
def test_two_robots_learn_and_swap(redis_proc, redis_client, gateway, tmp_path):
    seeded = seed_scripted_demos(redis_proc.url, TASKS, episodes_per_task=1, max_episode_steps=60)
    assert seeded["steps"] > 0

    key_id = signing.make_publisher_key(tmp_path / "keys")
    stop_trainer = threading.Event()
    trainer = Trainer(TrainerConfig(redis_url=redis_proc.url, policy_dir=gateway.cfg.policy_dir, tasks=TASKS,
                                    batch_size=16, seed_bc_steps=20, publish_every_steps=15, min_labeled_steps=8,
                                    refresh_interval_s=0.2, policy=SMALL,
                                    publish_key_file=str(tmp_path / "keys" / signing.PRIVATE_KEY_FILE)),
                      stop_trainer)
    trainer_thread = threading.Thread(target=trainer.run, daemon=True)
    trainer_thread.start()

    agents = [EdgeAgent(EdgeConfig(robot_id=f"r{i}", gateway=gateway.target, tasks=TASKS,
                                   state_dir=str(tmp_path / f"edge{i}"), loop=LoopConfig(control_hz=100.0, max_episode_steps=25, eval_every=0), backend=MetaWorldConfig(seed=i), heartbeat_interval_s=0.5,
                                   operator=OperatorConfig(seed=i, segment_steps=10),
                                   security=ClientSecurity(policy_public_key_files=(
                                       str(tmp_path / "keys" / signing.PUBLIC_KEY_FILE),))))
              for i in range(2)]
    stop_edges = threading.Event()
    try:
        for agent in agents:
            agent.start(stop_edges)
            assert agent.slot.current.version >= 1
        first = {a.cfg.robot_id: a.slot.current.version for a in agents}
        # A newer version than each robot started with reaches it and is swapped in. Not necessarily at the
        # first boundary after it arrived: a still newer version may be being written over it there.
        for agent in agents:
            rid = agent.cfg.robot_id
            assert agent.updater.wait_version(first[rid] + 1, timeout_s=120), "no new version reached the edge"
            acting = wait_until(lambda: (s := agent.loop.stats()).current_policy_version > first[rid] and s, 60,
                                "the robot to act with a newer version")
            assert agent.loop.wait_episodes(acting.episodes + 1, timeout_s=60)  # that episode has ended
            # Its steps reach Redis before the robots stop (stop does not wait for the spool to drain).
            assert agent.recorder.wait_idle(30), "the recorder did not hand its steps to the spool"
            assert agent.streamer.wait_acked(agent.spool.assigned_seq(), 60), "the spool was not acked"
    finally:
        stop_edges.set()
        for agent in agents:
            agent.stop()
        stop_trainer.set()
        trainer_thread.join(60)

    assert trainer.state.step > 20, "trainer took no optimizer steps on online data"
    store = PolicyStore(gateway.cfg.policy_dir)
    assert {store.manifest(v).signature["key_id"] for v in store.versions()} == {key_id}
    for agent in agents:
        rid = agent.cfg.robot_id
        keys = RobotKeys(rid)
        acked = int(redis_client.get(keys.seq))
        assert acked == agent.streamer.acked_seq > 0
        versions_per_episode = defaultdict(set)
        seqs = []
        catalog = redis_client.hgetall(keys.catalog)
        for eid, _ in catalog.items():
            reader = BufferReader(redis_client)
            steps = reader.steps(rid, eid.decode(), reader.schema(rid))
            assert [s.index for s in steps] == list(range(len(steps)))
            for s in steps:
                assert s.observation["state"].shape == (39,) and s.action.shape == (4,)
                assert np.isfinite(s.observation["state"]).all()
                assert s.timestamp_s > 0
                if not s.is_intervention:
                    np.testing.assert_array_equal(s.action, s.policy_action)
                versions_per_episode[eid].add(s.policy_version)
                seqs.append(s.seq)
        # Every step exactly once, none missing up to the ack.
        assert sorted(seqs) == list(range(1, acked + 1))
        # Swaps happen only between episodes: one version per episode.
        assert all(len(v) == 1 for v in versions_per_episode.values()), versions_per_episode
        # Steps after the swap carry the new version.
        assert max(v for vs in versions_per_episode.values() for v in vs) > first[rid]
        assert int(redis_client.hget(keys.stats, "intervention_steps")) > 0, "the operator never intervened"
        assert agent.updater.rejected == 0 and agent.last_good.load() is not None  # signed, verified again
