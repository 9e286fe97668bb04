"""Generate the Python gRPC stubs in ``fleet/v1/`` from ``protos/fleet/v1/*.proto``.

The generated stubs are committed so that installing the package needs no code
generation; ``tests/test_protos.py`` regenerates them into a temporary directory
and fails if they differ from the committed ones. Run ``make protos`` after
editing a ``.proto`` file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto under protos/ and return the written files."""
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    return sorted(p for proto in protos for p in (out_dir / proto.parent.relative_to(PROTO_ROOT)).glob(proto.stem + "_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
