"""systemd readiness and watchdog for the edge agent, without a dependency.

``sd_notify`` is one datagram on the unix socket named by ``$NOTIFY_SOCKET``
(an abstract socket when it starts with ``@``). Outside systemd the variable
is unset and every call is a no-op. With ``WatchdogSec=`` systemd sets
``$WATCHDOG_USEC``; :class:`Watchdog` sends ``WATCHDOG=1`` at half that
interval, but only while the agent reports itself healthy (the control loop
is ticking), so a wedged loop gets the unit restarted instead of pinged.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

from fleet.worker import Worker

log = logging.getLogger(__name__)


def notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not under systemd or on error."""
    address = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify(%r) to %r failed: %s", state, address, exc)
        return False


def watchdog_interval_s(env: dict[str, str] | None = None) -> float:
    """Seconds between pings systemd expects (half of WatchdogSec), or 0 when there is no watchdog.

    ``WATCHDOG_PID``, when set, must be this process (systemd's rule for forked helpers)."""
    env = env if env is not None else os.environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec or (pid and pid != str(os.getpid())):
        return 0.0
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; watchdog off", usec)
        return 0.0


class Watchdog:
    """Pings systemd's watchdog from its own thread while ``healthy()`` is True."""

    def __init__(self, healthy: Callable[[], bool], env: dict[str, str] | None = None):
        self._healthy = healthy
        self._env = env
        self.interval_s = watchdog_interval_s(env)
        self._worker = Worker("sd-watchdog", self._run)
        self.pings = 0

    def start(self) -> None:
        if not self.interval_s:
            return
        self._worker.start()

    def _run(self) -> None:
        while not self._worker.stopping.wait(self.interval_s):
            if self._healthy():
                if notify("WATCHDOG=1", self._env):
                    self.pings += 1
            else:
                log.error("agent unhealthy: not pinging the systemd watchdog (systemd will restart us)")

    def stop(self) -> None:
        self._worker.stop()
