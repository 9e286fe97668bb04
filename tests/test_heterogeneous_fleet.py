"""A heterogeneous fleet against one learner: a MetaWorld Sawyer (39-d state, 4-d action) and
a LeRobot arm (3 joints, a camera, 3-d action) stream into one Redis buffer. One trainer per
embodiment (``--embodiment``) learns only from its robots and publishes its own policy line,
which the gateway serving that embodiment streams to its robots; a trainer without
``--embodiment`` keeps to one schema."""

from __future__ import annotations

import asyncio
import threading
import uuid

import numpy as np
import pytest
import redis.asyncio as aioredis

import tests.lerobot_toys  # noqa: F401  (registers toy_arm / toy_leader with LeRobot)
from cloud.buffer import ROBOTS_KEY, SOURCE_OFFLINE, policy_keys
from cloud.ingest import Ingest
from edge.sim.demos import seed_scripted_demos
from cloud.buffer_index import BufferIndex
from cloud.trainer import Trainer
from edge.agent import EdgeAgent, EdgeConfig
from edge.loop import LoopConfig
from edge.operator import OperatorConfig
from edge.robots.base import make_robot
from edge.robots.lerobot import load_backend_config
from fleet import PROTOCOL_VERSION
from fleet.codec import encode_image
from cloud.trainer_config import TrainerConfig
from fleet.gateway_config import GatewayConfig
from fleet.policies import PolicyConfig
from fleet.types import Chunk, EpisodeSummary, RobotInfo, Step
from tests.conftest import GatewayThread

MW_TASK = "reach the goal"
TOY_TASK = "put the arm at the goal"
MW, TOY = "metaworld-sawyer", "lerobot-toy_arm"
SMALL = PolicyConfig(chunk_size=4, n_action_steps=4, dim_model=32, n_heads=2, dim_feedforward=64,
                     n_encoder_layers=1, n_decoder_layers=1)


def toy_section(tmp_path) -> dict:
    calib = str(tmp_path / "calibration")
    return {"robot": {"type": "toy_arm", "id": "arm", "calibration_dir": calib},
            "teleop": {"type": "toy_leader", "id": "leader", "calibration_dir": calib, "arm_id": "arm",
                       "period": 10, "intervene_from": 2}}


async def _toy_demos(url: str, schema, episodes: int = 2, steps: int = 8) -> None:
    """Offline demonstrations for the toy arm: joints driven to the goal (1.0) from 0."""
    redis = aioredis.Redis.from_url(url)
    ingest = Ingest(redis, source=SOURCE_OFFLINE)
    seq = await ingest.register(RobotInfo("demos-toy", TOY, schema, (TOY_TASK,), PROTOCOL_VERSION))
    for _ in range(episodes):
        pos, chunk_steps = np.zeros(3), []
        for t in range(steps):
            seq += 1
            frame = np.full((12, 16, 3), t, np.uint8)
            action = np.ones(3, np.float32)
            chunk_steps.append(Step(seq, t, {"state": pos.astype(np.float32)}, action, action, False, 0.0,
                                    t == steps - 1, t == steps - 1, 0, 1.0 + t, {"wrist": encode_image(frame)}))
            pos = pos + 0.6 * (1.0 - pos)
        end = EpisodeSummary(True, steps, 0, 0, False, 0)
        await ingest.write(Chunk("demos-toy", f"demos-toy-{uuid.uuid4().hex[:8]}", TOY_TASK, chunk_steps,
                                 episode_end=end))
    await redis.aclose()


@pytest.mark.timeout(240)
def test_two_embodiments_train_and_receive_their_own_policies(redis_proc, redis_client, tmp_path):
    seed_scripted_demos(redis_proc.url, (MW_TASK,), episodes_per_task=1, max_episode_steps=40)
    toy_schema = make_robot("lerobot", tasks=[TOY_TASK], config=toy_section(tmp_path)).schema
    asyncio.run(_toy_demos(redis_proc.url, toy_schema))

    # A trainer without --embodiment keeps to the first schema it sees and skips the other one.
    shared = BufferIndex()
    shared.refresh(redis_client)
    assert set(shared.robots) == {"demos-metaworld"}

    gateways, trainers, threads = {}, {}, []
    stop = threading.Event()
    for emb, task in ((MW, MW_TASK), (TOY, TOY_TASK)):
        policy_dir = str(tmp_path / emb / "policies")
        gateways[emb] = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url,
                                                    policy_dir=policy_dir, embodiment=emb))
        trainers[emb] = Trainer(TrainerConfig(redis_url=redis_proc.url, policy_dir=policy_dir, embodiment=emb,
                                              tasks=(task,), batch_size=8, seed_bc_steps=10, publish_every_steps=10,
                                              min_labeled_steps=4, refresh_interval_s=0.2, policy=SMALL,
                                              checkpoint_every_s=0, checkpoint_every_steps=0), stop)
        threads.append(threading.Thread(target=trainers[emb].run, daemon=True))
    for t in threads:
        t.start()
    common = dict(heartbeat_interval_s=0.5, first_policy_timeout_s=120)
    agents = {
        MW: EdgeAgent(EdgeConfig(robot_id="mw-1", gateway=gateways[MW].target, tasks=(MW_TASK,),
                                 state_dir=str(tmp_path / "edge-mw"),
                                 loop=LoopConfig(control_hz=100.0, max_episode_steps=25, eval_every=0),
                                 operator=OperatorConfig(divergence_threshold=0.15, agree_threshold=0.05,
                                                                divergence_steps=1, segment_steps=5), **common)),
        TOY: EdgeAgent(EdgeConfig(robot_id="toy-1", gateway=gateways[TOY].target, tasks=(TOY_TASK,),
                                  backend=load_backend_config(toy_section(tmp_path)),
                                  state_dir=str(tmp_path / "edge-toy"),
                                  loop=LoopConfig(control_hz=100.0, max_episode_steps=15, eval_every=0), **common)),
    }
    edge_stop = threading.Event()
    try:
        for agent in agents.values():
            agent.start(edge_stop)
        first = {emb: a.slot.current.version for emb, a in agents.items()}
        for emb, agent in agents.items():
            assert first[emb] >= 1
            episodes = 0
            while agent.loop.stats().intervention_steps == 0 and episodes < 20:  # the operator steps in...
                episodes += 1
                assert agent.loop.wait_episodes(episodes, timeout_s=60)
            assert agent.loop.stats().intervention_steps > 0, f"{emb}: the operator never intervened"
            after = agent.updater.have_version + 1  # ...and a version trained after that reaches the robot
            assert agent.updater.wait_version(after, timeout_s=150), f"{emb}: no newer version arrived"
            for _ in range(5):  # swapped in at an episode boundary
                if agent.slot.current.version >= after:
                    break
                assert agent.loop.wait_episodes(agent.loop.stats().episodes + 1, timeout_s=60)
            assert agent.slot.current.version >= after
    finally:
        edge_stop.set()
        for agent in agents.values():
            agent.stop()
        stop.set()
        for t in threads:
            t.join(60)
        for gw in gateways.values():
            gw.stop()

    robots = set(redis_client.hkeys(ROBOTS_KEY))
    assert robots == {b"demos-metaworld", b"demos-toy", b"mw-1", b"toy-1"}
    # Each trainer saw only its own embodiment's robots and trained past seed BC on their online data.
    assert set(trainers[MW].sampler.index.robots) == {"demos-metaworld", "mw-1"}
    assert set(trainers[TOY].sampler.index.robots) == {"demos-toy", "toy-1"}
    for emb, agent in agents.items():
        assert trainers[emb].state.step > 10, f"{emb}: no training on online data"
        assert trainers[emb].policy.schema == agent.robot.schema
        assert agent.slot.current.schema == agent.robot.schema  # each robot acts with its own line's policy
        assert int(redis_client.get(policy_keys(emb).latest)) >= first[emb] + 1
    assert redis_client.get(policy_keys().latest) is None  # nothing was published on the shared line
