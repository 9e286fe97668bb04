"""Publishing and checkpointing off the training thread: one snapshot into reused host buffers, the write in a
thread, its outcome (or error) collected later; safetensors written straight from memory."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from safetensors.torch import load

from cloud.checkpoints import CheckpointDir, CheckpointWriter
from cloud.policy_store import PolicyStore
from cloud.publisher import Publisher
from cloud.snapshot import HostSnapshot
from fleet.weights import write_safetensors
from tests.cloud.test_policy_distribution import act_with_frozen_encoder, update


def test_snapshot_reuses_its_buffers_and_is_a_copy() -> None:
    snap = HostSnapshot()
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # not contiguous
    first = snap.copy_from({"w": w})
    ptr = first["w"].data_ptr()
    w.add_(1)
    assert torch.equal(first["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3).t())  # a copy
    second = snap.copy_from({"w": w})
    assert second["w"].data_ptr() == ptr and torch.equal(second["w"], w)  # same memory, new values
    assert snap.copy_from({"w": w.double()})["w"].dtype == torch.float64 and snap.nbytes == 6 * 8


def test_safetensors_written_from_memory_round_trip() -> None:
    tensors = {"b": torch.randn(3, 5).bfloat16(), "a": torch.arange(7), "empty": torch.zeros(0),
               "mask": torch.rand(9) > 0.5}
    buf = io.BytesIO()
    write_safetensors(buf, tensors, {"version": "3"})
    back = load(buf.getvalue())
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())


class BlockingStore(PolicyStore):
    """A store whose next write waits for ``release`` (a slow disk), or fails with ``fail``."""

    def __init__(self, root):
        super().__init__(root)
        self.release = threading.Event()
        self.writing = threading.Event()
        self.fail: BaseException | None = None

    def put(self, manifest, tensors) -> None:
        self.writing.set()
        assert self.release.wait(10)
        if self.fail is not None:
            raise self.fail
        super().put(manifest, tensors)


@pytest.mark.timeout(30)
def test_publish_async_returns_before_the_write_and_poll_collects_it(tmp_path) -> None:
    store = BlockingStore(tmp_path / "store")
    publisher = Publisher(store, every_steps=2)
    policy = act_with_frozen_encoder()
    expected = policy.tensors()
    assert publisher.publish_async(policy, step=2)  # returns with the write blocked
    assert store.writing.wait(10) and publisher.busy
    update(policy, seed=1)  # training goes on: the version being written is the snapshot
    assert not publisher.publish_async(policy, step=3) and publisher.poll(policy) is None
    store.release.set()
    assert publisher.wait(10)
    manifest = publisher.poll(policy)
    assert manifest.version == policy.version == 1 and not publisher.due(3) and publisher.due(4)
    assert all(torch.equal(store.tensors(1)[k], v) for k, v in expected.items())

    store.release.clear()
    store.fail = OSError(28, "No space left on device")
    assert publisher.publish_async(policy, step=4)
    store.release.set()
    assert publisher.wait(10)
    with pytest.raises(OSError, match="No space left"):
        publisher.poll(policy)
    assert policy.version == 1 and publisher.due(4)  # the schedule is unchanged: due again, retried
    store.fail = None
    assert publisher.publish(policy, step=4).version == policy.version == 2


@pytest.mark.timeout(30)
def test_checkpoint_writer_snapshots_then_writes_in_the_background(tmp_path) -> None:
    ckpts = CheckpointDir(tmp_path / "ck", keep=3)
    writer = CheckpointWriter(ckpts)
    w, moment = torch.full((4,), 1.0), torch.tensor(5.0)
    writer.save_async(10, {"kind": "toy"}, {"w": w}, {"opt": {"m": moment}})
    w.add_(1)
    moment.add_(1)  # the step after: the checkpoint holds the snapshot
    assert writer.wait(10) and writer.last_written == 10
    loaded = ckpts.load(ckpts.root / "step-00000010")
    assert torch.equal(loaded.policy_tensors["w"], torch.full((4,), 1.0)) and loaded.state["opt"]["m"].item() == 5.0
    path = writer.save(11, {"kind": "toy"}, {"w": w}, {"opt": {"m": moment}})  # the way out: written, verified
    assert ckpts.steps() == [10, 11] and ckpts.load(path).state["opt"]["m"].item() == 6.0
