"""Hostile configuration, with real processes: protected mode (a gateway beyond loopback needs
TLS and robot tokens unless --insecure; an edge talking to a gateway beyond loopback needs TLS unless
--insecure) and typos (unknown config-file keys and flags exit 2
naming the closest valid one)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest

pytestmark = pytest.mark.timeout(120)

FLEET = [sys.executable, "-m", "fleet.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fleet(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*FLEET, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("listen", ["0.0.0.0:{port}", "[::]:{port}"])
def test_gateway_refuses_non_loopback_without_tls_and_tokens(listen, tmp_path):
    port = free_port()
    out = fleet("gateway", "--listen", listen.format(port=port), "--redis_url", "redis://127.0.0.1:1/0",
                "--policy_dir", str(tmp_path / "policies"))
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for flag in ("--security.tls_cert_file", "--security.tls_key_file", "--security.token_key_file", "--insecure"):
        assert flag in lines[0]
    assert "not loopback" in lines[0]


def test_gateway_refuses_tls_without_tokens(tmp_path):
    out = fleet("gateway", "--listen", f"0.0.0.0:{free_port()}", "--security.tls_cert_file", str(tmp_path / "c"),
                "--security.tls_key_file", str(tmp_path / "k"))
    assert out.returncode == 2, out
    assert "without robot tokens" in out.stderr and "--security.token_key_file" in out.stderr


def test_gateway_listens_beyond_loopback_with_insecure(redis_proc, tmp_path):
    port = free_port()
    proc = subprocess.Popen([*FLEET, "gateway", "--listen", f"0.0.0.0:{port}", "--insecure",
                             "--redis_url", redis_proc.url, "--policy_dir", str(tmp_path / "policies")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listening = threading.Event()
    seen: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            seen.append(line)
            if f"listening on port {port}" in line:
                listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert listening.wait(60), "".join(seen)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
    reader.join(10)
    # 0: graceful stop; -SIGTERM: terminated between the "listening" line and serve_forever's signal handlers
    assert proc.returncode in (0, -15), "".join(seen)


def test_gateway_on_loopback_needs_no_flags():
    from cloud.gateway.server import protected_mode_refusal
    from fleet.netaddr import is_loopback
    from fleet.gateway_config import GatewayConfig, GatewaySecurity

    for listen in ("127.0.0.1:0", "127.3.2.1:5", "localhost:50051", "[::1]:50051", "[::ffff:127.0.0.1]:1"):
        assert is_loopback(listen), listen
        assert protected_mode_refusal(GatewayConfig(listen=listen)) is None
    for listen in ("0.0.0.0:1", "[::]:1", ":50051", "10.0.0.5:1", "gateway.example.org:1"):
        assert not is_loopback(listen), listen
        assert protected_mode_refusal(GatewayConfig(listen=listen))
    secure = GatewaySecurity(tls_cert_file="c", tls_key_file="k", token_key_file="t")
    assert protected_mode_refusal(GatewayConfig(listen="[::]:1", security=secure)) is None


def test_learner_refuses_non_loopback_without_insecure(tmp_path):
    out = fleet("learner", "--listen", "[::]:50051", "--log_dir", str(tmp_path / "logs"))
    assert out.returncode == 2, out
    assert len(out.stderr.strip().splitlines()) == 1 and "--insecure" in out.stderr


@pytest.mark.parametrize("gateway", ["10.0.0.5:50051", "learner.example.org:50051", "[::]:50051"])
def test_edge_refuses_a_gateway_beyond_loopback_without_tls(gateway, tmp_path):
    out = fleet("edge", "--gateway", gateway, "--state_dir", str(tmp_path / "state"))
    assert out.returncode == 2, out
    line = out.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert gateway in line and "--security.ca_file" in line and "--insecure" in line, line
    assert not (tmp_path / "state").exists()  # refused before anything was built


def test_edge_with_an_unreadable_publisher_key_exits_2(tmp_path):
    out = fleet("edge", "--security.policy_public_key_files", str(tmp_path / "publisher.pub"),
                "--state_dir", str(tmp_path / "state"), timeout=110)
    assert out.returncode == 2, out
    assert "publisher.pub" in out.stderr and "cannot be read" in out.stderr, out.stderr
    assert not (tmp_path / "state").exists()  # refused before the robot, the spool or the network


def test_edge_tls_or_loopback_needs_no_insecure():
    from edge.config import EdgeConfig, plaintext_refusal
    from fleet.config import parse
    from fleet.gateway_config import ClientSecurity
    from fleet.netaddr import is_loopback

    for gateway in ("127.0.0.1:50051", "localhost:1", "[::1]:1"):
        assert plaintext_refusal(EdgeConfig(gateway=gateway)) is None
    assert plaintext_refusal(EdgeConfig(gateway="10.0.0.5:1", security=ClientSecurity(ca_file="ca.pem"))) is None
    assert plaintext_refusal(EdgeConfig(gateway="10.0.0.5:1"))
    assert not is_loopback("10.0.0.5:1")
    assert parse(EdgeConfig, ["--gateway", "10.0.0.5:1", "--insecure"], prog="fleet edge").insecure


@pytest.mark.parametrize("config, key, suggestion", [
    ({"gatway": "127.0.0.1:1"}, '"gatway"', '"gateway"'),
    ({"robot_id": "r", "security": {"ca_flie": "ca.pem"}}, '"security.ca_flie"', '"security.ca_file"'),
    ({"security": {"token_flie": "t"}}, '"security.token_flie"', '"security.token_file"'),
    ({"operator": {"zzzzzz": 1}}, '"operator.zzzzzz"', "not a OperatorConfig field; valid: divergence_threshold"),
])
def test_edge_config_file_unknown_key(config, key, suggestion, tmp_path):
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(config))
    out = fleet("edge", "--config_path", str(path), "--state_dir", str(tmp_path / "state"))
    assert out.returncode == 2, out
    assert f"unknown key {key}" in out.stderr, out.stderr
    assert suggestion in out.stderr, out.stderr
    assert str(path) in out.stderr


def test_edge_config_file_section_must_be_an_object(tmp_path):
    path = tmp_path / "robot.json"
    path.write_text(json.dumps({"security": "ca.pem"}))
    out = fleet("edge", "--config_path", str(path))
    assert out.returncode == 2, out
    assert '"security" must be a mapping of ClientSecurity fields' in out.stderr


@pytest.mark.parametrize("argv, bad, suggestion", [
    (["gateway", "--redis_ulr", "redis://127.0.0.1:1/0"], "--redis_ulr", "--redis_url"),
    (["gateway", "--redis-url", "redis://127.0.0.1:1/0"], "--redis-url", "--redis_url"),
    (["status", "--redis-url", "redis://127.0.0.1:1/0"], "--redis-url", "--redis_url"),
    (["gateway", "--securty.token-key-file=k"], "--securty.token-key-file=k", "--security.token_key_file"),
    (["edge", "--gatway", "127.0.0.1:1"], "--gatway", "--gateway"),
    (["status", "--jsn"], "--jsn", "--json"),
])
def test_unknown_flag_suggests_closest(argv, bad, suggestion):
    out = fleet(*argv)
    assert out.returncode == 2, out
    last = out.stderr.strip().splitlines()[-1]
    assert f"fleet {argv[0]}: error: unrecognized arguments: {bad} (did you mean {suggestion}?)" in last, last


@pytest.mark.parametrize("argv, message", [
    (["--backend.type", "ros3"], "invalid choice: 'ros3' (choose from 'metaworld', 'lerobot', 'ros2')"),
    (["--backend.type", "ros2"], "backend: Missing required field(s) `joint_names`"),
    (["--backend.type", "ros2", "--backend.joint_names", "[a]", "--backend.queue_size", "x"],
     "backend.queue_size: Couldn't parse 'x' into an int"),
    (["--backend.type", "lerobot", "--backend.robot.type", "so101_follower"], "backend.robot: Missing required"),
    (["--backend.type", "lerobot", "--backend.robot.type", "so101_follower", "--backend.robot.port", "p",
      "--backend.intervention", "motion"], "backend.intervention='motion' needs a backend.teleop device"),
    (["--config_path", "{old}"], 'unknown key "lerobot" (now backend, with "type: lerobot"'),
])
def test_edge_backend_is_a_choice_with_only_its_own_fields(argv, message, tmp_path, capsys):
    from fleet.cli import parse_config

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"backend": "lerobot", "lerobot": {"robot": {"type": "so101_follower"}}}))
    with pytest.raises(SystemExit) as exit_:
        parse_config("edge", [a.format(old=old) for a in argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_edge_backend_takes_lerobot_configs_and_bare_names():
    from fleet.cli import parse_config

    cfg = parse_config("edge", ["--backend.type=lerobot", "--backend.robot.type=so101_follower",
                                "--backend.robot.port=/dev/ttyACM0", "--backend.teleop.type=so101_leader",
                                "--backend.teleop.port=/dev/ttyACM1", "--backend.intervention=motion"])
    assert cfg.backend.type == "lerobot" and type(cfg.backend.robot).__name__ == "SOFollowerRobotConfig"
    assert cfg.backend.robot.port == "/dev/ttyACM0"
    assert type(cfg.backend.teleop).__name__ == "SOLeaderTeleopConfig" and cfg.backend.teleop.port == "/dev/ttyACM1"
    cfg = parse_config("edge", ["--backend", "ros2", "--backend.joint_names", "[j1, j2]"])
    assert cfg.backend.type == "ros2" and cfg.backend.joint_names == ("j1", "j2")
    assert parse_config("edge", ["--backend.seed", "3"]).backend.seed == 3


def test_trainer_exits_2_when_redis_names_a_version_its_policy_dir_lacks(redis_proc, tmp_path):
    """Redis of one deployment, the policy directory of another: a precise exit 2, not a KeyError traceback."""
    import redis

    from cloud.policy_store import PolicyStore

    r = redis.Redis.from_url(redis_proc.url)
    r.set(PolicyStore(tmp_path / "elsewhere", r).keys.latest, 3)
    out = fleet("trainer", "--redis_url", redis_proc.url, "--policy_dir", str(tmp_path / "policies"),
                "--metrics_port", "0", timeout=90)
    assert out.returncode == 2, out
    last = out.stderr.strip().splitlines()[-1]
    assert "policy v3 is the latest published" in last and str(tmp_path / "policies") in last, last
    assert "Traceback" not in out.stderr, out.stderr
