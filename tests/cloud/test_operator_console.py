"""The operator console's server (cloud/operators/console.py) on a real loopback HTTP port, against a small
in-test backend: the state it serves, the actions it passes on, and every way a request can be wrong. Then the
page itself in real headless Chromium (tests/browser.py)."""

from __future__ import annotations

import http.client
import json
import math
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from cloud.operators.console import ConsoleServer, read_token_file
from fleet.codec import encode_image
from fleet.errors import ConfigError
from tests.browser import headless_chromium, needs_chromium
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


class Backend:
    """A ConsoleBackend over a dict: robots ranked by score, operators that take over and hand back."""

    def __init__(self, robots: dict[str, float], operators: tuple[str, ...] = ("alice", "bob")):
        self.lock = threading.Lock()
        self.scores = dict(robots)
        self.held: dict[str, tuple[str, bool]] = {}   # robot -> (operator, manual)
        self.operators = operators
        self.calls: list[tuple[str, str, str]] = []
        self.thumbs: dict[str, bytes] = {}
        self.fail_with: Exception | None = None
        self.vanished: set[str] = set()   # listed, but gone by the time an action names them

    def snapshot(self) -> dict:
        with self.lock:
            if self.fail_with:
                raise self.fail_with
            ranked = sorted(self.scores, key=lambda r: -self.scores[r] if math.isfinite(self.scores[r]) else 0)
            robots = [{"robot_id": r, "score": self.scores[r], "uncertainty": 0.5, "stall": 0.25, "risk": 0.0,
                       "wanted": self.scores[r] >= 0.5, "holding": self.scores[r] >= 0.9,
                       "intervening": self.held.get(r, ("", False))[1], "wanted_for_s": 1.5,
                       "operator": self.held.get(r, ("", False))[0], "manual": self.held.get(r, ("", False))[1],
                       "has_thumbnail": r in self.thumbs, "task": "reach the goal", "policy_version": 3,
                       "connected": True} for r in ranked]
            on = {op: r for r, (op, _) in self.held.items()}
            return {"policy": "priority", "now_s": 12.5, "robots": robots,
                    "operators": [{"operator_id": o, "robot": on.get(o, ""),
                                   "queue": [r for r in ranked if r not in self.held][:2]} for o in self.operators]}

    def thumbnail(self, robot_id: str) -> bytes | None:
        self._robot(robot_id)
        return self.thumbs.get(robot_id)

    def take_over(self, operator_id: str, robot_id: str) -> None:
        self._check(operator_id, robot_id)
        with self.lock:
            self.calls.append(("take_over", operator_id, robot_id))
            self.held = {r: h for r, h in self.held.items() if h[0] != operator_id}
            self.held[robot_id] = (operator_id, True)

    def hand_back(self, operator_id: str, robot_id: str) -> None:
        self._check(operator_id, robot_id)
        with self.lock:
            self.calls.append(("hand_back", operator_id, robot_id))
            if self.held.get(robot_id, ("",))[0] == operator_id:
                del self.held[robot_id]

    def _robot(self, robot_id: str) -> None:
        if robot_id not in self.scores or robot_id in self.vanished:
            raise KeyError(robot_id)

    def _check(self, operator_id: str, robot_id: str) -> None:
        if operator_id not in self.operators:
            raise ConfigError(f"unknown operator {operator_id!r}")
        self._robot(robot_id)


@pytest.fixture
def backend():
    return Backend({"r-calm": 0.1, "r-stuck": 0.95, "r-unsure": 0.6})


@pytest.fixture
def console(backend):
    server = ConsoleServer(backend, "127.0.0.1:0")
    host, port = server.start()
    assert server.url == f"http://{host}:{port}/"
    yield server
    server.stop()
    assert server.url == ""


def call(url: str, body=None, *, raw: bytes | None = None, content_type: str = "application/json",
         headers: dict | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET (no body) or POST, errors included."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def error_of(reply: tuple[int, str, bytes]) -> tuple[int, str]:
    status, ctype, body = reply
    assert ctype == "application/json", reply
    return status, json.loads(body)["error"]


def test_state_is_the_backends_snapshot_as_json(console, backend):
    backend.scores["r-broken"] = float("nan")  # a non-finite value must not make the page's JSON.parse fail
    status, ctype, body = call(console.url + "api/state")
    assert (status, ctype) == (200, "application/json")
    state = json.loads(body)  # strict: json.loads accepts NaN, so check there is none below
    assert "NaN" not in body.decode()
    assert [r["robot_id"] for r in state["robots"]] == ["r-stuck", "r-unsure", "r-calm", "r-broken"]
    assert state["robots"][-1]["score"] is None
    assert state["robots"][0] | {"score": 0.95} == backend.snapshot()["robots"][0]
    assert [o["operator_id"] for o in state["operators"]] == ["alice", "bob"]


def test_the_page_is_self_contained(console):
    status, ctype, page = call(console.url)
    assert status == 200 and ctype.startswith("text/html")
    text = page.decode()
    assert "/api/state" in text and "take-over" in text and "hand-back" in text
    assert "://" not in text, "the page loads nothing from elsewhere (the machines have no internet)"


def test_take_over_and_hand_back_reach_the_backend(console, backend):
    status, _, body = call(console.url + "api/take_over", {"operator": "bob", "robot": "r-unsure"})
    assert status == 200 and json.loads(body) == {"ok": True, "operator": "bob", "robot": "r-unsure"}
    assert backend.calls == [("take_over", "bob", "r-unsure")]
    state = json.loads(call(console.url + "api/state")[2])
    held = {r["robot_id"]: (r["operator"], r["manual"]) for r in state["robots"]}
    assert held["r-unsure"] == ("bob", True) and held["r-stuck"] == ("", False)
    assert call(console.url + "api/hand_back", {"operator": "bob", "robot": "r-unsure"})[0] == 200
    assert backend.calls[-1] == ("hand_back", "bob", "r-unsure") and not backend.held


def test_thumbnail_is_served_as_jpeg(console, backend):
    jpeg = encode_image(np.full((48, 64, 3), 128, np.uint8), "jpeg").data
    backend.thumbs["r-stuck"] = jpeg
    assert call(console.url + "api/thumb/r-stuck") == (200, "image/jpeg", jpeg)
    status, message = error_of(call(console.url + "api/thumb/r-calm"))
    assert status == 404 and "no thumbnail" in message
    status, message = error_of(call(console.url + "api/thumb/nobody"))
    assert status == 404 and "nobody" in message
    assert error_of(call(console.url + "api/thumb/%2E%2E%2Fetc"))[0] == 400


@pytest.mark.parametrize("raw, content_type, status, words", [
    (b"{not json", "application/json", 400, "not JSON"),
    (b"[1, 2]", "application/json", 400, "JSON object"),
    (b'{"operator": "alice"}', "application/json", 400, "missing field 'robot'"),
    (b'{"robot": "r-calm"}', "application/json", 400, "missing field 'operator'"),
    (b'{"operator": 7, "robot": "r-calm"}', "application/json", 400, "'operator' must be an id"),
    (b'{"operator": "al ice", "robot": "r-calm"}', "application/json", 400, "'operator' must be an id"),
    (b'{"operator": "alice", "robot": "r-calm", "force": true}', "application/json", 400, "unknown field(s) 'force'"),
    (b"\xff\xfe", "application/json", 400, "not JSON"),
    (b'{"operator": "alice", "robot": "r-calm"}', "text/plain", 415, "application/json"),
    (b"{}" + b" " * 5000, "application/json", 413, "at most"),
])
def test_bad_action_bodies_are_refused_with_a_message(console, backend, raw, content_type, status, words):
    got = error_of(call(console.url + "api/take_over", raw=raw, content_type=content_type))
    assert got[0] == status and words in got[1], got
    assert not backend.calls
    assert call(console.url + "api/state")[0] == 200  # still serving


def test_unknown_ids_and_paths_are_404(console, backend):
    status, message = error_of(call(console.url + "api/take_over", {"operator": "mallory", "robot": "r-calm"}))
    assert status == 404 and "mallory" in message
    status, message = error_of(call(console.url + "api/hand_back", {"operator": "alice", "robot": "r-ghost"}))
    assert status == 404 and "r-ghost" in message
    assert error_of(call(console.url + "api/nothing"))[0] == 404
    assert error_of(call(console.url + "api/reboot", {"operator": "alice", "robot": "r-calm"}))[0] == 404
    assert not backend.calls


def test_a_failing_backend_is_a_503_and_the_server_lives_on(console, backend):
    backend.fail_with = ConnectionError("redis went away")
    status, message = error_of(call(console.url + "api/state"))
    assert status == 503 and "redis went away" in message
    backend.fail_with = None
    assert call(console.url + "api/state")[0] == 200


def test_a_foreign_host_header_is_refused_on_loopback(console):
    status, message = error_of(call(console.url + "api/state", headers={"Host": "evil.example:80"}))
    assert status == 403 and "loopback" in message
    assert call(console.url + "api/state", headers={"Host": "localhost"})[0] == 200


def test_a_token_guards_the_api_but_not_the_page(backend, tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret-console-token-123\n")
    server = ConsoleServer(backend, "127.0.0.1:0", token=read_token_file(str(path)))
    host, port = server.start()
    url = f"http://{host}:{port}"
    try:
        assert call(url + "/")[0] == 200
        assert error_of(call(url + "/api/state"))[0] == 401
        assert error_of(call(url + "/api/state", headers={"Authorization": "Bearer wrong"}))[0] == 401
        body = {"operator": "alice", "robot": "r-calm"}
        assert error_of(call(url + "/api/take_over", body))[0] == 401 and not backend.calls
        auth = {"Authorization": "Bearer s3cret-console-token-123"}
        assert call(url + "/api/state", headers=auth)[0] == 200
        assert call(url + "/api/take_over", body, headers=auth)[0] == 200 and backend.calls
    finally:
        server.stop()


def test_listen_rules(backend, tmp_path):
    with pytest.raises(ConfigError, match="not loopback.*--console_insecure"):
        ConsoleServer(backend, "0.0.0.0:0")
    with pytest.raises(ConfigError, match="not loopback"):
        ConsoleServer(backend, ":8470")
    with pytest.raises(ConfigError, match="not host:port"):
        ConsoleServer(backend, "localhost")
    ConsoleServer(backend, "0.0.0.0:0", insecure=True)  # the explicit flag allows it
    with ConsoleServer(backend, "127.0.0.1:0") as first:
        taken = first._httpd.server_address[1]
        with pytest.raises(ConfigError, match="cannot listen"):
            ConsoleServer(backend, f"127.0.0.1:{taken}").start()
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token_file(str(tmp_path / "short"))
    with pytest.raises(ConfigError, match="cannot read"):
        read_token_file(str(tmp_path / "missing"))
    assert read_token_file("") == ""


def test_the_operators_config_and_the_learner_refuse_a_remote_console_up_front(cli_main, capsys):
    from cloud.app import operators_args
    from cloud.operators.config import OperatorsConfig
    from fleet.cli import parse_config

    with pytest.raises(ConfigError, match="not loopback.*--console_insecure"):
        OperatorsConfig(console_listen="0.0.0.0:8470")
    assert OperatorsConfig(console_listen="0.0.0.0:8470", console_insecure=True).console_insecure
    with pytest.raises(ConfigError, match="not host:port"):
        parse_config("operators", ["--console_listen", "nowhere"], exit_on_error=False)
    # `fleet learner --operators` checks its child's console flags before starting anything
    with pytest.raises(SystemExit) as exc:
        cli_main(["learner", "--operators", "1", "--console_listen", "0.0.0.0:8470"])
    assert exc.value.code == 2 and "refusing to serve the operator console" in capsys.readouterr().err
    # the flags the learner passes on to its operators child when given --console_insecure / --console_token_file
    cfg = parse_config("operators", operators_args("redis://127.0.0.1:1/0", "1", [
        "--console_listen", "0.0.0.0:8470", "--console_insecure", "true", "--console_token_file", "/x"])[1:],
        exit_on_error=False)
    assert (cfg.console_insecure, cfg.console_token_file) == (True, "/x")


def test_stop_ends_open_keep_alive_connections(backend):
    server = ConsoleServer(backend, "127.0.0.1:0")
    host, port = server.start()
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/api/state")
    assert conn.getresponse().read() and conn.sock is not None  # HTTP/1.1: the connection stays open
    stopping = threading.Thread(target=server.stop)
    stopping.start()
    stopping.join(5)
    assert not stopping.is_alive(), "stop() waited on a browser's open connection"
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        conn.request("GET", "/api/state")
        conn.getresponse()
    conn.close()


def test_ipv6_loopback(backend):
    server = ConsoleServer(backend, "[::1]:0")
    try:
        server.start()
    except ConfigError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        assert server.url.startswith("http://[::1]:")
        assert call(server.url + "api/state")[0] == 200
    finally:
        server.stop()


# --- the page in real headless Chromium ---------------------------------------------------------------------


def _ranked_rows(driver) -> list[str]:
    return [tr.get_attribute("data-robot") for tr in driver.find_elements("css selector", "#robots tr")]


@needs_chromium
def test_browser_lists_robots_by_need_and_take_over_uses_the_chosen_operator(console, backend):
    from selenium.webdriver.support.ui import Select

    backend.thumbs["r-stuck"] = encode_image(np.full((48, 64, 3), 200, np.uint8), "jpeg").data
    with headless_chromium() as driver:
        driver.get(console.url + "")
        wait_until(lambda: _ranked_rows(driver) == ["r-stuck", "r-unsure", "r-calm"], 10, "the ranked robots")
        # the camera thumbnail arrives as a real decoded image
        wait_until(lambda: driver.execute_script(
            "const i = document.querySelector('img.thumb[data-robot=\"r-stuck\"]'); return i && i.naturalWidth"),
            10, "the thumbnail of r-stuck")
        badges = driver.find_element("css selector", '#robots tr[data-robot="r-stuck"] .badges').text
        assert "holding" in badges and "wants help" in badges

        Select(driver.find_element("id", "operator")).select_by_value("bob")
        driver.find_element("css selector", 'button.take-over[data-robot="r-unsure"]').click()
        wait_until(lambda: backend.calls, 10, "the take-over to reach the backend")
        assert backend.calls == [("take_over", "bob", "r-unsure")]
        wait_until(lambda: "bob (took over)" in driver.find_element(
            "css selector", '#robots tr[data-robot="r-unsure"] .assigned').text, 10, "the assignment on the page")
        assert "bob → r-unsure" in driver.find_element("id", "assignments").text

        # the ranking follows the backend: r-calm now needs help most
        backend.scores["r-calm"] = 0.99
        wait_until(lambda: _ranked_rows(driver)[0] == "r-calm", 10, "the new ranking")

        hand_back = driver.find_element("css selector", 'button.hand-back[data-robot="r-unsure"]')
        assert hand_back.is_enabled()
        hand_back.click()
        wait_until(lambda: backend.calls[-1:] == [("hand_back", "bob", "r-unsure")], 10, "the hand-back")
        wait_until(lambda: not driver.find_element(
            "css selector", 'button.hand-back[data-robot="r-unsure"]').is_enabled(), 10, "hand-back disabled again")

        # an error from the server is shown, not swallowed
        backend.vanished.add("r-calm")
        driver.find_element("css selector", 'button.take-over[data-robot="r-calm"]').click()
        wait_until(lambda: "r-calm" in driver.find_element("id", "message").text, 10, "the 404 on the page")
        assert "err" in driver.find_element("id", "message").get_attribute("class")
