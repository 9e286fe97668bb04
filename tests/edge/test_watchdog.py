"""sd_notify over a real unix datagram socket (what systemd listens on), and the watchdog pinging
only while the agent is healthy."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from edge.watchdog import Watchdog, notify, watchdog_interval_s

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5.0)
    yield sock, {"NOTIFY_SOCKET": str(path)}
    sock.close()


def test_notify_sends_one_datagram_and_is_a_noop_outside_systemd(notify_socket):
    sock, env = notify_socket
    assert notify("READY=1\nSTATUS=waiting for a policy", env)
    assert sock.recv(4096) == b"READY=1\nSTATUS=waiting for a policy"
    assert notify("READY=1", {}) is False


def test_abstract_socket_names_are_supported():
    name = f"fleet-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5.0)
    try:
        assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(64) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_interval_is_half_of_watchdog_usec_and_respects_watchdog_pid():
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) == 0.0
    assert watchdog_interval_s({}) == 0.0


def test_watchdog_pings_only_while_healthy(notify_socket):
    sock, env = notify_socket
    healthy = threading.Event()
    healthy.set()
    checked = threading.Semaphore(0)

    def is_healthy() -> bool:
        result = healthy.is_set()
        checked.release()
        return result

    dog = Watchdog(is_healthy, env={**env, "WATCHDOG_USEC": "40000"})  # a ping every 20 ms
    assert dog.interval_s == pytest.approx(0.02)
    dog.start()
    try:
        assert sock.recv(64) == b"WATCHDOG=1"
        assert sock.recv(64) == b"WATCHDOG=1"
        healthy.clear()
        pings = dog.pings
        for _ in range(3):  # three checks while unhealthy: no new ping
            assert checked.acquire(timeout=5)
        assert dog.pings <= pings + 1  # at most one ping that was already under way
        sock.settimeout(0.0)
        while True:  # drain what was sent before the agent turned unhealthy
            try:
                sock.recv(64)
            except BlockingIOError:
                break
        for _ in range(2):
            assert checked.acquire(timeout=5)
        with pytest.raises(BlockingIOError):
            sock.recv(64)
    finally:
        dog.stop()
