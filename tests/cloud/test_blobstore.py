"""The blob store for camera frames: both backends through the same tests (a real directory, a real
SeaweedFS S3 server), the local store's durability against SIGKILL, and an S3 outage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import cloud.blobstore as blobstore
from cloud.blobstore import LocalDirBlobStore, S3BlobStore, open_blob_store
from fleet.errors import BackendUnavailable, BlobNotFound, ConfigError, InvalidInput

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        s = open_blob_store(str(tmp_path / "blobs"))
    else:
        s = open_blob_store(request.getfixturevalue("s3_shared").url(f"fleet-tests/{uuid.uuid4().hex[:12]}"))
    yield s
    s.close()


def ops(mode: str, kind: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("fleet_blob_store_operations_total",
                                     {"mode": mode, "kind": kind, "outcome": outcome}) or 0.0


def test_put_get_overwrite_delete_list(store):
    before = ops(store.mode, "put", "ok")
    store.put("robot-1/ep-1/chunk-0/cam:front", b"frames-0")
    store.put("robot-1/ep-1/chunk-1/cam:front", memoryview(b"xxframes-1")[2:])
    store.put("robot-2/ep-9/chunk-0/cam:wrist", b"")
    assert store.get("robot-1/ep-1/chunk-0/cam:front") == b"frames-0"
    assert store.get("robot-1/ep-1/chunk-1/cam:front") == b"frames-1"
    assert store.get("robot-2/ep-9/chunk-0/cam:wrist") == b""
    assert ops(store.mode, "put", "ok") == before + 3

    store.put("robot-1/ep-1/chunk-0/cam:front", b"frames-0")  # a resend after a lost ack
    store.put("robot-1/ep-1/chunk-1/cam:front", b"other")
    assert store.get("robot-1/ep-1/chunk-1/cam:front") == b"other"

    assert sorted(store.list()) == ["robot-1/ep-1/chunk-0/cam:front", "robot-1/ep-1/chunk-1/cam:front",
                                    "robot-2/ep-9/chunk-0/cam:wrist"]
    assert sorted(store.list("robot-1/")) == ["robot-1/ep-1/chunk-0/cam:front", "robot-1/ep-1/chunk-1/cam:front"]
    assert sorted(store.list("robot-1/ep-1/chunk-1")) == ["robot-1/ep-1/chunk-1/cam:front"]
    assert list(store.list("robot-3")) == []
    assert list(store.list("robot-1/ep-1/chunk-0/cam:front/")) == []

    store.delete(["robot-1/ep-1/chunk-0/cam:front", "robot-1/ep-1/chunk-1/cam:front", "never/written"])
    store.delete([])
    assert list(store.list()) == ["robot-2/ep-9/chunk-0/cam:wrist"]
    with pytest.raises(BlobNotFound):
        store.get("robot-1/ep-1/chunk-0/cam:front")
    assert ops(store.mode, "get", "not_found") >= 1


def test_a_file_key_and_a_directory_key_coexist(store):
    store.put("a", b"1")
    store.put("a/b", b"2")
    assert (store.get("a"), store.get("a/b")) == (b"1", b"2")
    assert sorted(store.list("a")) == ["a", "a/b"]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "a/", "sp ace", "é", "a\x00b", "x" * 1025,
                                 "new\nline", "q?x", "a*b"])
def test_bad_keys_are_refused_before_touching_the_store(store, key):
    before = ops(store.mode, "put", "invalid")
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.delete([key])):
        with pytest.raises(InvalidInput):
            call()
    assert list(store.list()) == []
    assert ops(store.mode, "put", "invalid") == before + 1


def test_local_keys_longer_than_a_file_name_are_refused(tmp_path):
    store = LocalDirBlobStore(tmp_path)
    store.put("k" * 240, b"x")
    with pytest.raises(InvalidInput, match="at most 240"):
        store.put("k" * 241, b"x")


def test_big_object_round_trips(store):
    data = os.urandom(8 * 1024 * 1024)
    store.put("big/one", data)
    assert store.get("big/one") == data


def test_delete_goes_in_batches(store, monkeypatch):
    monkeypatch.setattr(blobstore, "S3_DELETE_BATCH", 3)
    keys = [f"batch/k{i}" for i in range(8)]
    for k in keys:
        store.put(k, k.encode())
    store.delete(keys[:7])
    assert list(store.list("batch/")) == ["batch/k7"]


def test_s3_list_pages(s3_shared):
    store = open_blob_store(s3_shared.url(f"fleet-tests/{uuid.uuid4().hex[:12]}"))
    store.list_page_size = 2
    keys = [f"p/{i:02d}" for i in range(5)]
    for k in keys:
        store.put(k, b"x")
    assert list(store.list("p/")) == keys


def test_urls(tmp_path, monkeypatch):
    assert isinstance(open_blob_store(str(tmp_path / "a")), LocalDirBlobStore)
    local = open_blob_store((tmp_path / "b").as_uri())
    assert isinstance(local, LocalDirBlobStore) and local.root == tmp_path / "b"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    s3 = open_blob_store("s3://my-bucket/frames/v1?endpoint=http://127.0.0.1:9&region=eu-west-1")
    assert isinstance(s3, S3BlobStore)
    assert (s3.bucket, s3.prefix, s3.endpoint) == ("my-bucket", "frames/v1/", "http://127.0.0.1:9")
    assert open_blob_store("s3://my-bucket").prefix == ""
    for bad in ("", "s3://", "s3://Bad_Bucket/x", "s3://b/x?endpoint=ftp://h", "s3://bkt/x?nope=1",
                "s3://bkt/a/../b", "file://relative/dir", "gs://bucket/x"):
        with pytest.raises(ConfigError, match="blob store URL"):
            open_blob_store(bad)


# --- durability of the local store -----------------------------------------------------------------

_WRITER = """
import sys
from cloud.blobstore import LocalDirBlobStore
store = LocalDirBlobStore(sys.argv[1])
i = 0
while True:
    store.put(f"k/{i}", bytes([i % 251]) * (1 << 20))
    store.put("same", bytes([i % 251]) * (1 << 20))  # overwrites: never a mix of two versions
    print(i, flush=True)
    i += 1
"""


def test_local_put_survives_sigkill_right_after_it_returned(tmp_path):
    root = tmp_path / "blobs"
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    acked = -1
    try:
        while acked < 5:
            line = child.stdout.readline()
            assert line, f"writer exited with {child.poll()}"
            acked = int(line)
    finally:
        child.send_signal(signal.SIGKILL)  # mid-way through the next puts
        child.wait(10)
    store = LocalDirBlobStore(root)
    for i in range(acked + 1):
        assert store.get(f"k/{i}") == bytes([i % 251]) * (1 << 20)
    keys = set(store.list())
    assert {f"k/{i}" for i in range(acked + 1)} <= keys <= {f"k/{i}" for i in range(acked + 2)} | {"same"}
    for key in keys:  # whatever a list shows is complete, the put in flight too
        data = store.get(key)
        assert len(data) == 1 << 20 and data == data[:1] * len(data), key
    assert store.get("same")[0] in (acked % 251, (acked + 1) % 251)


# --- S3 outage ---------------------------------------------------------------------------------------

def test_s3_outage_raises_backend_unavailable_quickly_and_recovers(s3_server):
    store = open_blob_store(s3_server.url("fleet-outage/frames"))
    store.put("before", b"kept")
    s3_server.kill()
    for call in (lambda: store.put("during", b"x" * 100_000), lambda: store.get("before"),
                 lambda: store.delete(["before"]), lambda: list(store.list())):
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            call()
        assert time.monotonic() - started < 15, "an outage must surface within boto3's short retries"
    assert ops("s3", "put", "unavailable") >= 1
    s3_server.restart()
    assert store.get("before") == b"kept"
    assert list(store.list()) == ["before"]  # the put that failed left nothing behind
    store.put("after", b"y")
    assert sorted(store.list()) == ["after", "before"]
