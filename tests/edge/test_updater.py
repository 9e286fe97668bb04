"""The edge side of policy distribution without a network: assembling full and delta transfers built by the
gateway's encoder, rejecting broken ones, the last good policy on disk, refusing unusable policies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cloud.policy_store import PolicyStore
from edge.client import FleetClient, PolicyHeaderEvent, PolicyPieceEvent
from edge.hotswap import PolicySlot
from edge.updater import Assembler, Held, LastGood, check_finite
from fleet.errors import IntegrityError, PolicyUnusable
from fleet.types import FeatureSpec, Schema
from fleet.v1 import fleet_pb2 as pb
from tests.transfers import encode_transfer, messages

PIECE = 4096


def versions(tmp_path: Path) -> PolicyStore:
    """v1 and v2 of a mixed-dtype state dict; v2 changes a few trainable elements, never the frozen tensor."""
    gen = torch.Generator().manual_seed(0)
    v1 = {"backbone.w": torch.randn(64, 64, generator=gen).bfloat16(),  # frozen
          "head.w": torch.randn(32, 64, generator=gen), "head.b": torch.zeros(32).bfloat16(),
          "steps": torch.tensor([7], dtype=torch.int64), "mask": torch.rand(50, generator=gen) > 0.5,
          "empty": torch.zeros(0)}
    store = PolicyStore(tmp_path / "store", piece_bytes=PIECE)
    store.publish(v1, {"kind": "test"}, trainable={"head.w", "head.b"})
    v2 = {k: v.clone() for k, v in v1.items()}
    v2["head.w"][:3] += 0.01
    v2["head.b"] += torch.tensor(1e-2).bfloat16()
    v2["steps"] += 1
    store.publish(v2, {"kind": "test"}, trainable={"head.w", "head.b"})
    return store


def events(store: PolicyStore, version: int, base: int = 0) -> list:
    transfer = encode_transfer(store, version, base, piece_bytes=PIECE)
    return [FleetClient.policy_event(pb.PolicyUpdate.FromString(m)) for m in messages(transfer)]


def assemble(evs: list, held: Held | None) -> tuple[Held, dict[str, torch.Tensor]]:
    assembler = Assembler(evs[0], held)
    for e in evs[1:-1]:
        assembler.add(e)
    return assembler.finish(evs[-1])


def test_full_then_delta_is_bit_identical_and_reuses_unchanged_bytes(tmp_path: Path) -> None:
    store = versions(tmp_path)
    held1, tensors1 = assemble(events(store, 1), None)
    assert all(torch.equal(tensors1[k], v) for k, v in store.tensors(1).items())
    delta_events = events(store, 2, base=1)
    assert isinstance(delta_events[0], PolicyHeaderEvent) and delta_events[0].base_version == 1
    sent = {e.name for e in delta_events if isinstance(e, PolicyPieceEvent)}
    assert sent == {"head.w", "head.b", "steps"}
    held2, tensors2 = assemble(delta_events, held1)
    for name, data in store.payload(2).items():
        assert bytes(held2.payload[name]) == bytes(data), name
    assert held2.payload["backbone.w"] is held1.payload["backbone.w"]  # kept, not copied or re-sent
    assert tensors2["head.w"].dtype == torch.float32 and tensors2["head.w"].shape == (32, 64)


def test_broken_transfers_are_integrity_errors(tmp_path: Path) -> None:
    store = versions(tmp_path)
    full = events(store, 1)
    held1, _ = assemble(full, None)
    delta_events = events(store, 2, base=1)
    with pytest.raises(IntegrityError, match="delta against v1, but this edge holds nothing"):
        Assembler(delta_events[0], None)
    pieces = [e for e in full if isinstance(e, PolicyPieceEvent)]
    assert len([p for p in pieces if p.name == "backbone.w"]) == 2  # 8 KiB in 4 KiB pieces
    dropped = [e for e in full if e is not pieces[1]]
    with pytest.raises(IntegrityError, match="truncated: tensor 'backbone.w' has 4096 of 8192 bytes"):
        assemble(dropped, None)
    without_tensor = [e for e in delta_events if not (isinstance(e, PolicyPieceEvent) and e.name == "steps")]
    with pytest.raises(IntegrityError, match="truncated: tensor 'steps' missing"):
        assemble(without_tensor, held1)
    flipped = list(full)
    piece = pieces[0]
    flipped[full.index(piece)] = PolicyPieceEvent(piece.name, piece.offset, bytes([piece.data[0] ^ 1]) + piece.data[1:],
                                                  piece.encoding)
    with pytest.raises(IntegrityError, match="'backbone.w' piece at byte 0 blake3 .* \\(corrupt transfer\\)"):
        assemble(flipped, None)
    assembler = Assembler(full[0], None)
    with pytest.raises(IntegrityError, match="ends at byte 8193, beyond its 8192 bytes"):
        assembler.add(PolicyPieceEvent("backbone.w", 4097, piece.data, "raw"))
    with pytest.raises(IntegrityError, match="unknown tensor 'nope'"):
        assembler.add(PolicyPieceEvent("nope", 0, b"x", "raw"))
    with pytest.raises(IntegrityError, match="'diff' piece of 'head.w' in a full transfer"):
        assembler.add(PolicyPieceEvent("head.w", 0, b"x", "diff"))
    delta_asm = Assembler(delta_events[0], held1)
    with pytest.raises(IntegrityError, match="out of order"):
        delta_asm.add(PolicyPieceEvent("head.w", 10, b"x", "diff"))
    with pytest.raises(IntegrityError, match="trailer checksum differs"):
        Assembler(full[0], None).finish(type(full[-1])("0" * 64))


def test_last_good_keeps_the_previous_version_for_revert(tmp_path: Path, caplog) -> None:
    store = versions(tmp_path)
    last_good = LastGood(tmp_path / "edge" / "policy")
    assert last_good.load_held() is None and last_good.version() == 0
    for v in (1, 2):
        last_good.save(store.manifest(v), store.tensors(v))
    assert last_good.version() == 2
    held = last_good.load_held()
    assert held.manifest.version == 2 and bytes(held.payload["head.w"]) == bytes(store.payload(2)["head.w"])
    assert not last_good.revert(1)  # not the saved one: nothing to do
    assert last_good.revert(2) and last_good.version() == 1
    manifest, tensors = last_good.load()
    assert manifest.version == 1 and torch.equal(tensors["head.w"], store.tensors(1)["head.w"])
    data = bytearray((last_good.dir / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (last_good.dir / "model.safetensors").write_bytes(bytes(data))
    assert last_good.load_held() is None
    assert "unusable" in caplog.text


def test_check_finite_refuses_nan_and_raising_policies(make_policy) -> None:
    schema = Schema((FeatureSpec("state", "float32", (39,)), FeatureSpec("cam", "uint8", (8, 8, 3), True)),
                    FeatureSpec("action", "float32", (4,)))
    check_finite(make_policy("zero", version=3), schema, "reach-v3")
    with pytest.raises(PolicyUnusable, match="policy v4 produces non-finite actions") as info:
        check_finite(make_policy("nan", version=4), schema, "reach-v3")
    assert info.value.version == 4
    with pytest.raises(PolicyUnusable, match="policy v5 fails to act: RuntimeError: broken policy"):
        check_finite(make_policy("raise", version=5), schema, "reach-v3")


def test_rollback_tells_listeners_which_version_was_bad(make_policy) -> None:
    slot = PolicySlot(make_policy("zero", version=1))
    heard: list[int] = []
    slot.add_rollback_listener(heard.append)
    slot.offer(make_policy("nan", version=2))
    assert slot.swap_if_pending() and slot.current.version == 2
    assert slot.rollback("NaN actions") and slot.current.version == 1
    assert heard == [2]
    assert not slot.rollback("again") and heard == [2]  # nothing left to roll back to

