"""Find and run a private Prometheus for ``fleet demo --monitor`` and the observability tests.

The binary comes from PATH (Debian's ``prometheus``). The server gets its own directory (config,
TSDB, log), a free loopback port, a short retention, and the recording rules and alerts of
``deploy/prometheus/rules``; it never touches a shared Prometheus. ``deploy_scrape_configs`` turns
``deploy/prometheus/prometheus.yml``'s jobs (fleet-gateway, fleet-trainer, fleet-edge) into ones
that scrape given ports, so the demo runs the same config as a one-machine deployment.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from fleet.subprocs import stop_process

PROM_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
"""The deployment's Prometheus config and rules (a source checkout; not in a wheel)."""
APT_HINT = "install it with `apt-get install -y prometheus` (Debian/Ubuntu)"


def find_prometheus() -> str | None:
    """Path of the prometheus binary on PATH, or None."""
    return shutil.which("prometheus")


def rule_files() -> list[str]:
    """Absolute paths of deploy/prometheus/rules/*.yml (recording rules and alerts)."""
    return [str(p) for p in sorted((PROM_DIR / "rules").glob("*.yml"))]


def deploy_scrape_configs(targets: dict[str, list[str]]) -> list[dict]:
    """The scrape jobs of deploy/prometheus/prometheus.yml with their targets replaced: job name -> host:port list.

    A job of the file not in ``targets`` is left out; a name in ``targets`` the file lacks is a KeyError."""
    import yaml

    jobs = {j["job_name"]: j for j in yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["scrape_configs"]}
    out = []
    for name, addresses in targets.items():
        job = copy.deepcopy(jobs[name])
        labels = job["static_configs"][0].get("labels", {})
        job["static_configs"] = [{"targets": list(addresses), **({"labels": labels} if labels else {})}]
        out.append(job)
    return out


class PrometheusProcess:
    """A running private prometheus on a free loopback port; ``stop`` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir: str | os.PathLike, scrape_configs: list[dict], interval_s: float = 1.0,
                 binary: str | None = None):
        from fleet.redis_server import free_port

        binary = binary or find_prometheus()
        if binary is None:
            raise FileNotFoundError(f"prometheus is not on PATH; {APT_HINT}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        every = f"{interval_s:g}s"
        config = {"global": {"scrape_interval": every, "evaluation_interval": every, "scrape_timeout": every},
                  "rule_files": rule_files(), "scrape_configs": scrape_configs}
        (self.workdir / "prometheus.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log_path = self.workdir / "prometheus.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1d", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str, **params: str) -> dict:
        """GET ``path`` of the HTTP API as JSON (an error reply's body too: it says why)."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400/422: a bad query
            return json.loads(exc.read())

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)

    def active_targets(self) -> list[dict]:
        return self.get("/api/v1/targets", state="active")["data"]["activeTargets"]

    def ready(self) -> bool:
        """True once it serves queries; RuntimeError (with its log's tail) if it exited."""
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {tail}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after {timeout_s:.0f}s; see {self.log_path}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_process(self.proc, timeout_s, "prometheus")
