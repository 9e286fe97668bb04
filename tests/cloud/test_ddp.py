"""The trainer under data parallelism: 2 processes (gloo, CPU) started the way torchrun starts
them (RANK/WORLD_SIZE/MASTER_ADDR in the environment), one real redis-server, a real LeRobot ACT
policy. Each rank samples its own batches; after training every rank holds the weights rank 0
published, and only rank 0 published."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from cloud.buffer import SOURCE_OFFLINE
from cloud.distributed import RankInfo
from cloud.ingest import Ingest
from cloud.policy_store import PolicyStore
from fleet import PROTOCOL_VERSION
from fleet.redis_client import connect, connect_async
from fleet.redis_server import free_port
from fleet.types import Chunk, EpisodeSummary, FeatureSpec, RobotInfo, Schema, Step

SCHEMA = Schema((FeatureSpec("state", "float32", (4,)),), FeatureSpec("action", "float32", (2,)))
TASKS = ("reach the goal",)
MAX_STEPS, PUBLISH_EVERY = 6, 3


async def _seed(url: str, episodes: int = 4, length: int = 20) -> None:
    redis = connect_async(url)
    ingest = Ingest(redis, source=SOURCE_OFFLINE)
    await ingest.register(RobotInfo("demos", "test-arm", SCHEMA, TASKS, PROTOCOL_VERSION))
    rng = np.random.default_rng(0)
    seq = 0
    for e in range(episodes):
        steps = []
        for i in range(length):
            seq += 1
            state = rng.normal(size=4).astype(np.float32)
            steps.append(Step(seq=seq, index=i, observation={"state": state}, policy_action=np.zeros(2, np.float32),
                              action=state[:2] * 0.5, is_intervention=False, reward=0.0, success=i == length - 1,
                              done=i == length - 1, policy_version=0, timestamp_s=1.0))
        end = EpisodeSummary(True, length, 0, 0, False, 0)
        await ingest.write(Chunk("demos", f"e{e}", TASKS[0], steps, episode_end=end))
    await redis.aclose()


def _rank_main(rank: int, world_size: int, port: int, redis_url: str, policy_dir: str, out_dir: str,
               strategy: str) -> None:
    """What torchrun runs on each rank, then dump this rank's final weights (safetensors, no pickle)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    from cloud.trainer import Trainer
    from cloud.trainer_config import TrainerConfig
    from fleet.policies import PolicyConfig

    small = PolicyConfig(chunk_size=4, n_action_steps=4, dim_model=16, n_heads=2, dim_feedforward=32,
                         n_encoder_layers=1, n_decoder_layers=1)
    cfg = TrainerConfig(redis_url=redis_url, policy_dir=policy_dir, tasks=TASKS, batch_size=8, seed_bc_steps=0,
                        min_labeled_steps=8, max_steps=MAX_STEPS, publish_every_steps=PUBLISH_EVERY,
                        checkpoint_dir=os.path.join(out_dir, "checkpoints"), distributed_strategy=strategy,
                        policy=small)
    trainer = Trainer(cfg)
    state = trainer.run()
    if strategy == "ddp":  # with FSDP each rank holds only its shard; rank 0 published the gathered weights
        tensors = {k: v.contiguous() for k, v in trainer.policy.tensors().items()}
        save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"), metadata={"step": str(state.step)})


@pytest.mark.timeout(240)
def test_two_ranks_take_the_same_steps_and_only_rank0_publishes(redis_proc, tmp_path):
    asyncio.run(_seed(redis_proc.url))
    policy_dir, out = tmp_path / "policies", tmp_path / "out"
    out.mkdir()
    mp.start_processes(_rank_main, args=(2, free_port(), redis_proc.url, str(policy_dir), str(out), "ddp"),
                       nprocs=2, join=True, start_method="spawn")
    rank0, rank1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    store = PolicyStore(policy_dir, connect(redis_proc.url))
    # v1 before training, then one version every PUBLISH_EVERY steps, from rank 0 only.
    assert store.versions() == [1, 2, 3]
    published = store.tensors(3)
    assert rank0.keys() == rank1.keys() == published.keys()
    for name in published:
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(published[name], rank1[name], rtol=0, atol=0, msg=name)
    first = store.tensors(1)
    changed = [n for n in published if not torch.equal(first[n], published[n])]
    assert changed, "training did not change any weight: the comparison above would be vacuous"
    # Only rank 0 wrote checkpoints and the trainer status.
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")), "no checkpoint"
    status = connect(redis_proc.url).hgetall("fleet:trainer:status")
    assert int(status[b"step"]) == MAX_STEPS and int(status[b"version"]) == 3


@pytest.mark.timeout(240)
def test_fsdp_gathers_the_full_weights_into_a_cpu_copy_on_rank0_and_publishes_them(redis_proc, tmp_path):
    asyncio.run(_seed(redis_proc.url))
    policy_dir, out = tmp_path / "policies", tmp_path / "out"
    out.mkdir()
    mp.start_processes(_rank_main, args=(2, free_port(), redis_proc.url, str(policy_dir), str(out), "fsdp"),
                       nprocs=2, join=True, start_method="spawn")
    store = PolicyStore(policy_dir, connect(redis_proc.url))
    assert store.versions() == [1, 2, 3]
    first, published = store.tensors(1), store.tensors(3)
    assert first.keys() == published.keys()
    assert [n for n in published if not torch.equal(first[n], published[n])], "the gathered weights never changed"
    assert store.manifest(3).config["policy_config"]["device"] == "cpu"  # published from rank 0's CPU copy (on this
    # CPU-only machine the ranks train on the CPU too; on CUDA the copy is still built with device="cpu")
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())  # sharded optimizer


def test_rank_info_comes_from_torchrun_env():
    assert RankInfo.from_env({}) == RankInfo(0, 1, 0)
    assert RankInfo.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == RankInfo(3, 4, 1)
    with pytest.raises(ValueError, match="RANK \\(4\\) must be in"):
        RankInfo.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="must be integers"):
        RankInfo.from_env({"RANK": "x"})
