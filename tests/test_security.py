"""Mutual TLS, robot tokens, revocation and per-robot limits on a real gateway (grpc.aio on a
loopback port, real redis-server), with credentials made by ``fleet certs``."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import stat

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.buffer.reader import BufferReader
from cloud.buffer import ROBOTS_KEY, RobotKeys
from cloud.gateway.auth import REVOKED_KEY, RobotLimits, TokenBucket
from edge.client import FleetClient
from fleet import PROTOCOL_VERSION, certs, tokens
from fleet.cli import main as fleet_main
from fleet.gateway_config import ClientSecurity, GatewayConfig, GatewaySecurity
from fleet.convert import chunk_to_pb
from fleet.errors import Overloaded
from fleet.healthcheck import check
from fleet.types import Chunk, FeatureSpec, RobotInfo, Schema, Step
from tests.conftest import GatewayThread

pytestmark = pytest.mark.timeout(60)

SCHEMA = Schema((FeatureSpec("state", "float32", (4,)),), FeatureSpec("action", "float32", (2,)))
TASK = "reach the goal"


def info(robot_id: str) -> RobotInfo:
    return RobotInfo(robot_id, "test-arm", SCHEMA, (TASK,), PROTOCOL_VERSION)


def chunk(robot_id: str, first_seq: int, n: int = 3) -> Chunk:
    return Chunk(robot_id, "e1", TASK, [
        Step(seq=first_seq + i, index=first_seq + i - 1, observation={"state": np.zeros(4, np.float32)},
             policy_action=np.zeros(2, np.float32), action=np.ones(2, np.float32), is_intervention=True,
             reward=0.0, success=False, done=False, policy_version=1, timestamp_s=1.0) for i in range(n)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    certs.init_pki(root, hosts=("localhost", "127.0.0.1"), robots=("r1", "r2"))
    rogue = tmp_path_factory.mktemp("rogue")
    certs.init_pki(rogue, hosts=("localhost",), robots=("r1",))
    return root, rogue


def gateway_security(pki_dir, **limits) -> GatewaySecurity:
    return GatewaySecurity(tls_cert_file=str(pki_dir / "gateway.pem"), tls_key_file=str(pki_dir / "gateway-key.pem"),
                           client_ca_file=str(pki_dir / "ca.pem"), token_key_file=str(pki_dir / "token.key"),
                           **limits)


@pytest.fixture
def secure_gateway(pki, redis_proc, tmp_path):
    gw = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url,
                                     policy_dir=str(tmp_path / "policies"), health_listen="127.0.0.1:0",
                                     security=gateway_security(pki[0], robot_max_streams=1)))
    yield gw
    gw.stop()


def robot_client(gw, pki_dir, cert_of: str | None, token_of: str | None, ca_dir=None) -> FleetClient:
    ca_dir = ca_dir or pki_dir
    robot_dir = pki_dir / "robots" / (cert_of or "r1")
    sec = ClientSecurity(ca_file=str(ca_dir / "ca.pem"),
                         cert_file=str(robot_dir / "cert.pem") if cert_of else "",
                         key_file=str(robot_dir / "key.pem") if cert_of else "",
                         token_file=str(pki_dir / "robots" / token_of / "token") if token_of else "",
                         server_name="localhost")
    return FleetClient(f"127.0.0.1:{gw.port}", rpc_timeout_s=5.0, security=sec)


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


def stream(client: FleetClient, *chunks: Chunk) -> list[int]:
    return [a.acked_seq for a in client.stream_experience(iter([chunk_to_pb(c, SCHEMA) for c in chunks]))]


def run_on_gateway(gw, coro):
    return asyncio.run_coroutine_threadsafe(coro, gw.loop).result(10)


def test_valid_robot_streams_and_impostors_are_refused(secure_gateway, pki, redis_client):
    root, rogue = pki
    good = robot_client(secure_gateway, root, "r1", "r1")
    assert good.register(info("r1")).last_acked_seq == 0
    assert stream(good, chunk("r1", 1)) == [3]
    assert good.heartbeat("r1", 1, 0, 0, "running", TASK, 1.0, 0.0).latest_policy_version == 0
    assert BufferReader(redis_client).episode_length("r1", "e1") == 3

    # No client certificate, or one from another CA: the TLS handshake refuses the connection, so the
    # call fails before any RPC exists (gRPC reports a failed handshake as UNAVAILABLE; the gateway is
    # up: the valid robot above just streamed, and r2 below gets precise codes).
    for client in (robot_client(secure_gateway, root, None, "r1"),
                   robot_client(secure_gateway, rogue, "r1", "r1", ca_dir=root)):
        with pytest.raises(grpc.RpcError) as err:
            client.register(info("r1"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        client.close()
    # A valid certificate but no token, or a token signed with another key.
    assert code_of(lambda: robot_client(secure_gateway, root, "r1", None).register(info("r1"))) \
        == grpc.StatusCode.UNAUTHENTICATED
    forged, _ = tokens.issue(tokens.load_key(rogue / "token.key"), "r1")
    (rogue / "forged").write_text(forged)
    (rogue / "forged").chmod(0o600)  # a token file others can read is refused before it is sent
    sec = ClientSecurity(ca_file=str(root / "ca.pem"), cert_file=str(root / "robots/r1/cert.pem"),
                         key_file=str(root / "robots/r1/key.pem"), token_file=str(rogue / "forged"),
                         server_name="localhost")
    assert code_of(lambda: FleetClient(f"127.0.0.1:{secure_gateway.port}", security=sec).register(info("r1"))) \
        == grpc.StatusCode.UNAUTHENTICATED
    # Another robot's token with r1's certificate; r2's full credentials used to act as r1.
    assert code_of(lambda: robot_client(secure_gateway, root, "r1", "r2").register(info("r1"))) \
        == grpc.StatusCode.PERMISSION_DENIED
    r2 = robot_client(secure_gateway, root, "r2", "r2")
    assert code_of(lambda: r2.register(info("r1"))) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: r2.heartbeat("r1", 1, 0, 0, "running", TASK, 1.0, 0.0)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: list(r2.watch_policy("r1", 0))) == grpc.StatusCode.PERMISSION_DENIED
    r2.register(info("r2"))
    assert code_of(lambda: stream(r2, chunk("r2", 1), chunk("r1", 4))) == grpc.StatusCode.PERMISSION_DENIED
    # Nothing was written as r1 by anyone but r1.
    assert BufferReader(redis_client).episode_length("r1", "e1") == 3
    assert int(redis_client.get(RobotKeys("r1").seq)) == 3
    assert redis_client.hexists(ROBOTS_KEY, "r2")
    good.close()
    r2.close()


def test_revocation_cuts_new_calls_and_open_streams(secure_gateway, pki, redis_client):
    root, _ = pki
    client = robot_client(secure_gateway, root, "r1", "r1")
    client.register(info("r1"))
    outbox: queue.Queue = queue.Queue()
    call = client.stream_experience(iter(outbox.get, None))
    outbox.put(chunk_to_pb(chunk("r1", 1), SCHEMA))
    assert next(call).acked_seq == 3
    token_id = tokens.verify(tokens.load_key(root / "token.key"), (root / "robots/r1/token").read_text().strip()).token_id
    assert fleet_main(["certs", "revoke", "--token_id", token_id, "--redis_url",
                       f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0"]) == 0
    assert redis_client.sismember(REVOKED_KEY, token_id)
    run_on_gateway(secure_gateway, secure_gateway.gw.revoked.refresh())  # what the periodic refresh does
    outbox.put(chunk_to_pb(chunk("r1", 4), SCHEMA))
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and token_id in err.value.details()
    outbox.put(None)
    assert code_of(lambda: client.register(info("r1"))) == grpc.StatusCode.UNAUTHENTICATED
    assert BufferReader(redis_client).episode_length("r1", "e1") == 3
    # r2 is unaffected.
    assert robot_client(secure_gateway, root, "r2", "r2").register(info("r2")).last_acked_seq == 0
    client.close()


def test_stream_limit_per_robot_and_health_is_open(secure_gateway, pki):
    root, _ = pki
    client = robot_client(secure_gateway, root, "r1", "r1")
    client.register(info("r1"))
    outbox: queue.Queue = queue.Queue()
    first = client.stream_experience(iter(outbox.get, None))
    outbox.put(chunk_to_pb(chunk("r1", 1), SCHEMA))
    assert next(first).acked_seq == 3  # the first stream is open and counted
    second = robot_client(secure_gateway, root, "r1", "r1")
    with pytest.raises(grpc.RpcError) as err:
        stream(second, chunk("r1", 4))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.value.trailing_metadata()).get("fleet-retry-after-s") == "5.000"
    outbox.put(None)
    first.cancel()
    # Health: plaintext on the health port (kubelet probes), and on the TLS port without any token.
    gw = secure_gateway.gw
    with grpc.insecure_channel(f"127.0.0.1:{gw.health_server_port}") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="fleet.v1.FleetService"),
                                                     timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # What the containers' HEALTHCHECK runs (python -m fleet.healthcheck).
    assert check(f"grpc://127.0.0.1:{gw.health_server_port}")[0]
    assert check(f"grpc://127.0.0.1:{gw.health_server_port}/no.such.Service")[0] is False
    creds = grpc.ssl_channel_credentials((root / "ca.pem").read_bytes(), (root / "robots/r1/key.pem").read_bytes(),
                                         (root / "robots/r1/cert.pem").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{secure_gateway.port}", creds,
                             options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status \
            == health_pb2.HealthCheckResponse.SERVING
    client.close()
    second.close()


def test_rate_limits_hold_a_robot_to_its_rate():
    limits = RobotLimits(max_streams=1, max_steps_per_s=100.0, max_bytes_per_s=0.0)
    assert limits.delay_s("r1", 100, 10**9) == 0.0  # one second of burst, bytes unlimited
    assert limits.delay_s("r1", 50, 0) == pytest.approx(0.5, abs=0.05)  # 50 steps over: half a second
    assert limits.delay_s("r2", 10, 0) == 0.0  # per robot
    limits.open_stream("r1")
    with pytest.raises(Overloaded, match="limit 1"):
        limits.open_stream("r1")
    limits.close_stream("r1")
    limits.open_stream("r1")
    assert TokenBucket(10.0).reserve(30) == pytest.approx(2.0, abs=0.05)


def test_tokens_verify_only_unaltered_and_unexpired():
    key = tokens.new_key()
    token, claims = tokens.issue(key, "r1", ttl_s=60, now_s=1000.0)
    assert tokens.verify(key, token, now_s=1030.0) == claims
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.verify(key, token, now_s=1060.0)
    head, payload, sig = token.split(".")
    other, _ = tokens.issue(key, "r2", now_s=1000.0)
    with pytest.raises(tokens.TokenError, match="bad signature"):
        tokens.verify(key, f"{head}.{other.split('.')[1]}.{sig}", now_s=1000.0)
    with pytest.raises(tokens.TokenError, match="not a fleet1 token"):
        tokens.verify(key, "Bearer abc", now_s=1000.0)


def test_certs_cli_writes_private_keys_and_refuses_to_replace_a_ca(tmp_path, capsys):
    out = tmp_path / "pki"
    assert fleet_main(["certs", "init", str(out), "--hosts", "gw.example,10.0.0.5", "--robots", "a,b"]) == 0
    for path in ("ca-key.pem", "gateway-key.pem", "token.key", "robots/a/key.pem", "robots/a/token"):
        assert stat.S_IMODE(os.stat(out / path).st_mode) == 0o600, path
    assert tokens.verify(tokens.load_key(out / "token.key"), (out / "robots/b/token").read_text().strip()).robot_id == "b"
    assert fleet_main(["certs", "robot", str(out), "--robot_id", "c"]) == 0
    assert (out / "robots/c/cert.pem").exists()
    with pytest.raises(SystemExit) as exc:
        fleet_main(["certs", "init", str(out)])
    assert exc.value.code == 2
    assert "refusing to replace a CA" in capsys.readouterr().err


def test_existing_loose_files_are_tightened_when_rewritten(tmp_path):
    out = tmp_path / "pki"
    (out / "robots" / "a").mkdir(parents=True)
    for path in ("ca-key.pem", "token.key", "robots/a/key.pem", "robots/a/token"):
        (out / path).write_text("left over\n")
        (out / path).chmod(0o644)  # os.open(..., 0o600) alone would keep this mode
    assert fleet_main(["certs", "init", str(out), "--robots", "a"]) == 0
    for path in ("ca-key.pem", "token.key", "robots/a/key.pem", "robots/a/token"):
        assert stat.S_IMODE(os.stat(out / path).st_mode) == 0o600, path


@pytest.mark.timeout(60)
def test_readable_keys_and_tokens_are_refused_with_exit_2(pki, redis_proc, tmp_path, capsys):
    """The edge and the gateway read their private files only when no one else can: exit 2, naming the file."""
    import shutil

    copy = tmp_path / "pki"
    shutil.copytree(pki[0], copy)
    robot = copy / "robots" / "r1"
    edge = ["edge", "--robot_id", "r1", "--gateway", "127.0.0.1:1", "--state_dir", str(tmp_path / "edge"),
            "--security.ca_file", str(robot / "ca.pem"), "--security.cert_file", str(robot / "cert.pem"),
            "--security.key_file", str(robot / "key.pem"), "--security.token_file", str(robot / "token")]
    gateway = ["gateway", "--listen", "127.0.0.1:0", "--redis_url", redis_proc.url, "--policy_dir",
               str(tmp_path / "policies"), "--security.tls_cert_file", str(copy / "gateway.pem"),
               "--security.tls_key_file", str(copy / "gateway-key.pem"),
               "--security.token_key_file", str(copy / "token.key")]
    for argv, path in ((edge, robot / "key.pem"), (edge, robot / "token"), (gateway, copy / "gateway-key.pem"),
                       (gateway, copy / "token.key")):
        for mode in (0o644, 0o640, 0o604):
            path.chmod(mode)
            with pytest.raises(SystemExit) as exc:
                fleet_main(argv)
            assert exc.value.code == 2, (path, oct(mode))
            err = capsys.readouterr().err
            assert f"'{path}' is readable or writable by group or others" in err and f"chmod 600 {path}" in err
        path.chmod(0o600)
    # root-owned and group-readable (a Kubernetes secret with defaultMode 0400 and an fsGroup) is accepted,
    # unless this process is root itself; 0600 is always accepted
    from fleet.secret_files import check_private

    check_private(copy / "token.key", "token key file")
    if os.getuid() != 0 and os.stat(copy / "token.key").st_uid == 0:
        (copy / "token.key").chmod(0o440)
        check_private(copy / "token.key", "token key file")


def _publish(policy_dir, redis_client, step: int) -> int:
    from cloud.policy_store import PolicyStore
    from cloud.publisher import Publisher
    from fleet.policies import PolicyConfig, build_policy

    small = PolicyConfig(chunk_size=2, n_action_steps=2, dim_model=16, n_heads=2, dim_feedforward=32,
                         n_encoder_layers=1, n_decoder_layers=1)
    policy = build_policy(small, SCHEMA, (TASK,), seed=step)
    return Publisher(PolicyStore(policy_dir, redis_client), every_steps=1).publish(policy, step).version


def test_revocation_reaches_an_open_watch_policy_stream(secure_gateway, pki, redis_client, caplog):
    """A revoked robot's open WatchPolicy stream ends before the next version, not at max_connection_age."""
    root, _ = pki
    client = robot_client(secure_gateway, root, "r1", "r1")
    client.register(info("r1"))
    policy_dir = secure_gateway.cfg.policy_dir
    _publish(policy_dir, redis_client, 1)
    events = client.watch_policy("r1", 0)
    assert next(events).version == 1  # the header of v1: the stream is open and delivering
    for _ in events:  # the rest of v1
        if type(_).__name__ == "PolicyTrailerEvent":
            break
    token_id = tokens.verify(tokens.load_key(root / "token.key"), (root / "robots/r1/token").read_text().strip()).token_id
    redis_client.sadd(REVOKED_KEY, token_id)
    run_on_gateway(secure_gateway, secure_gateway.gw.revoked.refresh())
    _publish(policy_dir, redis_client, 2)
    with pytest.raises(grpc.RpcError) as err:
        next(events)  # v2 is not delivered
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and token_id in err.value.details()
    assert "auth: refused /fleet.v1.FleetService/WatchPolicy for robot 'r1'" in caplog.text  # the audit line
    client.close()


def test_expired_token_ends_open_streams_and_denied_certificates_are_refused(pki, redis_proc, redis_client,
                                                                            tmp_path):
    """Tokens expire on open streams too; with mutual TLS only, a denied certificate is refused."""
    import time as _time

    root, _ = pki
    robot = root / "robots" / "r2"
    short, claims = tokens.issue(tokens.load_key(root / "token.key"), "r2", ttl_s=2.0)
    (tmp_path / "short").write_text(short)
    (tmp_path / "short").chmod(0o600)
    gw = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url,
                                     policy_dir=str(tmp_path / "policies"), security=gateway_security(root)))
    try:
        sec = ClientSecurity(ca_file=str(root / "ca.pem"), cert_file=str(robot / "cert.pem"),
                             key_file=str(robot / "key.pem"), token_file=str(tmp_path / "short"),
                             server_name="localhost")
        client = FleetClient(f"127.0.0.1:{gw.port}", rpc_timeout_s=5.0, security=sec)
        client.register(info("r2"))
        outbox: queue.Queue = queue.Queue()
        call = client.stream_experience(iter(outbox.get, None))
        outbox.put(chunk_to_pb(chunk("r2", 1), SCHEMA))
        assert next(call).acked_seq == 3
        _time.sleep(max(0.0, claims.expires_s - _time.time()) + 0.05)  # the token's own clock: nothing to wait on
        outbox.put(chunk_to_pb(chunk("r2", 4), SCHEMA))
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in err.value.details()
        outbox.put(None)
        client.close()
    finally:
        gw.stop()

    mtls_only = GatewaySecurity(tls_cert_file=str(root / "gateway.pem"), tls_key_file=str(root / "gateway-key.pem"),
                                client_ca_file=str(root / "ca.pem"))
    gw = GatewayThread(GatewayConfig(listen="127.0.0.1:0", redis_url=redis_proc.url,
                                     policy_dir=str(tmp_path / "policies2"), security=mtls_only))
    try:
        client = robot_client(gw, root, "r2", None)
        assert client.register(info("r2")).last_acked_seq == 3
        assert fleet_main(["certs", "deny", "--cert_file", str(robot / "cert.pem"), "--redis_url", redis_proc.url]) == 0
        run_on_gateway(gw, gw.gw.revoked.refresh())
        with pytest.raises(grpc.RpcError) as err:
            client.register(info("r2"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "certificate of robot 'r2' is denied" \
            in err.value.details()
        assert robot_client(gw, root, "r1", None).register(info("r1")).last_acked_seq == 0  # r1 unaffected
        client.close()
    finally:
        gw.stop()


def test_a_refreshed_token_is_picked_up_without_restarting_the_edge(pki, secure_gateway, redis_client, capsys):
    """`fleet certs token` replaces a robot's token file; the client reads it on its next call, so an
    expiring token is refreshed (and the old one can then be revoked) without restarting the robot."""
    import shutil

    root, _ = pki
    work = root.parent / f"{root.name}-refresh"
    shutil.copytree(root, work, dirs_exist_ok=True)
    client = robot_client(secure_gateway, work, "r1", "r1")
    client.register(info("r1"))
    old = tokens.verify(tokens.load_key(work / "token.key"), (work / "robots/r1/token").read_text().strip())
    assert fleet_main(["certs", "token", str(work), "--robot_id", "r1"]) == 0
    new_id = json.loads(capsys.readouterr().out)["token_id"]
    new = tokens.verify(tokens.load_key(work / "token.key"), (work / "robots/r1/token").read_text().strip())
    assert new.token_id == new_id != old.token_id and 29 * 86400 < new.expires_s - new.issued_s <= 30 * 86400
    assert stat.S_IMODE(os.stat(work / "robots/r1/token").st_mode) == 0o600
    redis_client.sadd(REVOKED_KEY, old.token_id)  # the old token is now useless ...
    run_on_gateway(secure_gateway, secure_gateway.gw.revoked.refresh())
    assert client.register(info("r1")).last_acked_seq == 0  # ... and this client already sends the new one
    client.close()


def test_no_request_bytes_are_parsed_before_the_caller_is_authenticated(secure_gateway, pki):
    root, _ = pki
    garbage = b"\xff\xff\xff\xff not a protobuf"
    anonymous = robot_client(secure_gateway, root, "r1", None)  # a fleet certificate, no token
    raw = anonymous._channel.unary_unary("/fleet.v1.FleetService/Register", request_serializer=None,
                                         response_deserializer=None)
    assert code_of(lambda: raw(garbage, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED  # refused unread
    robot = robot_client(secure_gateway, root, "r1", "r1")
    raw = robot._channel.unary_unary("/fleet.v1.FleetService/Register", request_serializer=None,
                                     response_deserializer=None)
    assert code_of(lambda: raw(garbage, timeout=5, metadata=robot._metadata)) == grpc.StatusCode.INVALID_ARGUMENT
    anonymous.close()
    robot.close()


def test_watch_policy_streams_per_robot_are_limited(secure_gateway, pki):
    """Two WatchPolicy streams per robot by default: a third is RESOURCE_EXHAUSTED, other robots unaffected."""
    import time as _time

    from prometheus_client import REGISTRY

    root, _ = pki
    clients = [robot_client(secure_gateway, root, "r1", "r1") for _ in range(3)]
    before = REGISTRY.get_sample_value("fleet_gateway_policy_streams") or 0.0
    watches = [c.watch_policy("r1", 0) for c in clients[:2]]
    deadline = _time.monotonic() + 10
    while (REGISTRY.get_sample_value("fleet_gateway_policy_streams") or 0.0) < before + 2:  # the gateway's gauge
        assert _time.monotonic() < deadline, "the two watches never opened"
        _time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as err:
        next(clients[2].watch_policy("r1", 0))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 2" in err.value.details()
    other = robot_client(secure_gateway, root, "r2", "r2")
    third_robot = other.watch_policy("r2", 0)  # r2 has its own budget: this stream opens and waits
    while (REGISTRY.get_sample_value("fleet_gateway_policy_streams") or 0.0) < before + 3:
        assert _time.monotonic() < deadline, "r2's watch never opened"
        _time.sleep(0.02)
    watches[0].cancel()
    third_robot.cancel()
    for w in watches[1:]:
        w.cancel()
    for c in (*clients, other):
        c.close()
