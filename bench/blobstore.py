"""Blob store throughput for camera-frame objects, beside the raw limits measured in the same run.

    local      LocalDirBlobStore.put: temp file, fsync, rename, fsync of the directory (durable)
    s3         S3BlobStore.put against a private SeaweedFS (`weed`, loopback) through boto3
    limit      the same bytes written with open/write/close into one directory, no fsync (what the disk
               takes when nothing has to be durable)

An object is one chunk of one camera: ``--frames`` encoded frames of ``--frame-bytes`` each (default 30
frames of a ~12 KB 224x224 JPEG: one second of one camera at 30 Hz). Each backend runs with 1 and with
``--threads`` concurrent writers (the gateway puts one object per camera concurrently).

    python bench/blobstore.py --quick --json bench/results/blobstore.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_json  # noqa: E402
from cloud.blobstore import open_blob_store  # noqa: E402
from fleet.s3_server import start_weed  # noqa: E402


def run(put, objects: list[bytes], threads: int) -> dict:
    keys = [f"bench/{uuid.uuid4().hex}/{i:06d}/cam" for i in range(len(objects))]
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, keys, objects))
    elapsed = time.perf_counter() - started
    nbytes = sum(len(o) for o in objects)
    return {"objects": len(objects), "threads": threads, "seconds": elapsed, "objects_per_s": len(objects) / elapsed,
            "mb_per_s": nbytes / elapsed / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=400)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--frame-bytes", type=int, default=12_000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="100 objects")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    n = 100 if args.quick else args.objects
    objects = [os.urandom(args.frames * args.frame_bytes) for _ in range(min(n, 16))]
    objects = [objects[i % len(objects)] for i in range(n)]
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                     "object_bytes": len(objects[0]), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="fleet-blob-bench-") as tmp:
        raw_dir = Path(tmp) / "raw"
        raw_dir.mkdir()

        def raw_put(key: str, data: bytes) -> None:
            with open(raw_dir / key.replace("/", "%"), "wb") as fh:
                fh.write(data)

        local = open_blob_store(str(Path(tmp) / "local"))
        weed = start_weed(Path(tmp) / "weed")
        os.environ.update({k: v for k, v in weed.env.items() if k != "AWS_ENDPOINT_URL"})
        s3 = open_blob_store(weed.url("bench/frames"))
        try:
            for name, put in (("limit", raw_put), ("local", local.put), ("s3", s3.put)):
                for threads in (1, args.threads):
                    results["runs"][f"{name}/{threads}"] = run(put, objects, threads)
        finally:
            s3.close()
            weed.kill()
    limit = max(results["runs"][f"limit/{t}"]["mb_per_s"] for t in (1, args.threads))
    print(f"object: {len(objects[0]) / 1e3:.0f} KB ({args.frames} frames x {args.frame_bytes} B); machine loaded "
          f"(2 cores shared with other work): compare ratios within this run")
    print(f"{'backend/threads':<18}{'objects/s':>12}{'MB/s':>10}{'x limit':>10}")
    for key, r in results["runs"].items():
        print(f"{key:<18}{r['objects_per_s']:>12.1f}{r['mb_per_s']:>10.1f}{r['mb_per_s'] / limit:>10.2f}")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
