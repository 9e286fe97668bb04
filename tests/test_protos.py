"""The committed stubs in fleet/v1 are exactly what protoc makes of protos/."""

from __future__ import annotations

from pathlib import Path

from fleet.protogen import ROOT, generate


def test_committed_stubs_match_proto(tmp_path):
    written = generate(tmp_path)
    assert written, "protoc wrote nothing"
    for path in written:
        rel = path.relative_to(tmp_path)
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is generated but not committed: run `make protos`"
        assert committed.read_text() == path.read_text(), f"{rel} is stale: run `make protos` and commit"
    assert {p.relative_to(tmp_path) for p in written} == {
        Path("fleet/v1/fleet_pb2.py"), Path("fleet/v1/fleet_pb2.pyi"), Path("fleet/v1/fleet_pb2_grpc.py")}
