"""The operator console: one web page, served by the learner's operators service, that lists the robots
ranked by need (with their camera thumbnail), the current assignments and each operator's queue, and has
take-over and hand-back buttons (docs/operators.md, "Console").

``ConsoleServer`` is a small JSON-over-HTTP front for a ``ConsoleBackend`` (the operators service): the
stdlib's threading HTTP server on a daemon thread, no framework. Routes:

- ``GET /``                    the page (``console.html`` next to this module; it polls ``/api/state``)
- ``GET /api/state``           the backend's snapshot as JSON
- ``GET /api/thumb/<robot>``   the robot's last JPEG thumbnail (404 when it has none)
- ``POST /api/take_over``      ``{"operator": str, "robot": str}``: pin that operator to that robot
- ``POST /api/hand_back``      the same body: release it

Bad input is a 400 naming what is wrong, an unknown robot or operator a 404; a backend that fails is a
503 with its message, never a dead server. Take-over moves a physical arm, so the server binds loopback
unless told otherwise (``insecure``, like the gateway's ``--insecure``), refuses a ``Host`` header that is
not loopback while it does (DNS rebinding), takes POSTs only as ``application/json`` (a cross-site form
cannot send that without a CORS preflight, which is never granted), and, given a token, wants
``Authorization: Bearer <token>`` on every ``/api/`` call (the page reads it once from ``#token=...``).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from fleet.errors import ConfigError
from fleet.names import is_id, shown
from fleet.netaddr import is_loopback, split_host_port

log = logging.getLogger(__name__)

PAGE_FILE = Path(__file__).with_name("console.html")
MAX_BODY_BYTES = 4096
"""A take-over/hand-back body is two ids; anything longer is refused unread (413)."""
IDLE_TIMEOUT_S = 30.0
"""A connection silent this long is closed (the page asks every 0.5 s; a stalled client holds no thread)."""


class ConsoleBackend(Protocol):
    """What the console shows and drives (implemented by the operators service)."""

    def snapshot(self) -> dict:
        """``{"policy": str, "now_s": float, "robots": [...] ranked by need (highest first),
        "operators": [{"operator_id", "robot" (or ""), "queue": [robot ids]}]}``; each robot is
        ``{"robot_id", "score", "uncertainty", "stall", "risk", "wanted", "holding", "intervening",
        "wanted_for_s", "operator" (or ""), "manual", "has_thumbnail", "task", "policy_version", "connected"}``."""

    def thumbnail(self, robot_id: str) -> bytes | None:
        """The robot's last JPEG thumbnail, None when it has none; KeyError/ConfigError for an unknown robot."""

    def take_over(self, operator_id: str, robot_id: str) -> None:
        """Pin ``operator_id`` to ``robot_id`` until hand-back; KeyError/ConfigError on an unknown id."""

    def hand_back(self, operator_id: str, robot_id: str) -> None:
        """Release ``robot_id`` from ``operator_id``; KeyError/ConfigError on an unknown id."""


def console_refusal(listen: str, insecure: bool) -> str | None:
    """The one-line reason to refuse serving the console on ``listen``, else None (a bad address raises)."""
    try:
        split_host_port(listen)
    except ValueError:
        raise ConfigError(f"console_listen {shown(listen)} is not host:port (e.g. 127.0.0.1:8470)") from None
    if is_loopback(listen) or insecure:
        return None
    return (f"refusing to serve the operator console on {listen} (not loopback): its take-over button moves "
            "robots and it speaks plain HTTP; use a loopback console_listen behind an SSH tunnel or a TLS "
            "proxy, or pass --console_insecure (trusted networks only; set --console_token_file too)")


def read_token_file(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped); "" for no path; ConfigError if unusable."""
    if not path:
        return ""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"console_token_file {path}: cannot read it ({exc})") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ConfigError(f"console_token_file {path}: the token must be one word of at least 16 characters "
                          "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


class ConsoleServer:
    """Serves the console for ``backend`` on ``listen`` (``host:port``; port 0 picks a free one)."""

    def __init__(self, backend: ConsoleBackend, listen: str = "127.0.0.1:0", *, insecure: bool = False,
                 token: str = ""):
        refusal = console_refusal(listen, insecure)
        if refusal:
            raise ConfigError(refusal)
        self.backend = backend
        self.listen = listen
        self.token = token
        self.loopback_only = is_loopback(listen)
        self.page = PAGE_FILE.read_bytes()
        self.address: tuple[str, int] | None = None
        """The bound (host, port) while serving."""
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Bind and serve on a daemon thread; returns the bound (host, port). ConfigError if it cannot bind."""
        host, port = split_host_port(self.listen)
        server_cls = _HTTPServer6 if ":" in host else _HTTPServer
        try:
            httpd = server_cls((host, port), _handler_for(self))
        except OSError as exc:
            raise ConfigError(f"console_listen {self.listen}: cannot listen there ({exc})") from None
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="operator-console", daemon=True)
        self._thread.start()
        self.address = httpd.server_address[:2]
        log.info("operator console on %s", self.url)
        return self.address

    @property
    def url(self) -> str:
        """The page's address while serving (``http://host:port/``), else ""."""
        if self.address is None:
            return ""
        host, port = self.address
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        httpd, self._httpd, self.address = self._httpd, None, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()  # a browser's keep-alive connection must not outlive the server
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ConsoleServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _HTTPServer(ThreadingHTTPServer):
    """One daemon thread per connection; ``close_connections`` ends those still open (keep-alive), which
    ``server_close`` alone would wait for (or leave serving) while a browser tab stays open."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args, **kwargs):
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            open_now = list(self._open)
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float as None: the page's JSON.parse refuses NaN/Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _action_body(raw: bytes) -> tuple[str, str]:
    """(operator, robot) from a take-over/hand-back body, or a 400 naming what is wrong."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _HttpError(HTTPStatus.BAD_REQUEST, f"the body is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise _HttpError(HTTPStatus.BAD_REQUEST, 'the body must be a JSON object {"operator": ..., "robot": ...}')
    unknown = sorted(set(body) - {"operator", "robot"})
    if unknown:
        raise _HttpError(HTTPStatus.BAD_REQUEST, f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                                 'expected {"operator": ..., "robot": ...}')
    ids = []
    for field in ("operator", "robot"):
        value = body.get(field)
        if value is None:
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"missing field {field!r}")
        if not isinstance(value, str) or not is_id(value):
            shown_value = shown(value) if isinstance(value, str) else type(value).__name__
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"field {field!r} must be an id (letters, digits, . _ : -), "
                                                     f"got {shown_value}")
        ids.append(value)
    return ids[0], ids[1]


def _handler_for(console: ConsoleServer) -> type[BaseHTTPRequestHandler]:
    backend = console.backend

    class Handler(BaseHTTPRequestHandler):
        server_version = "fleet-console"
        protocol_version = "HTTP/1.1"
        timeout = IDLE_TIMEOUT_S

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's name)
            log.debug("console %s: " + format, self.address_string(), *args)

        def do_GET(self) -> None:
            self._serve(self._get)

        def do_POST(self) -> None:
            self._serve(self._post)

        def _serve(self, route) -> None:
            try:
                self._check_host()
                status, ctype, body = route(urlsplit(self.path).path)
            except _HttpError as exc:
                status, ctype, body = exc.status, "application/json", _error(str(exc))
            except (KeyError, ConfigError) as exc:
                status, ctype, body = HTTPStatus.NOT_FOUND, "application/json", _error(_message(exc))
            except Exception as exc:  # a backend that failed (Redis away...): answer, keep serving
                log.warning("console %s %s failed: %r", self.command, self.path, exc)
                status, ctype = HTTPStatus.SERVICE_UNAVAILABLE, "application/json"
                body = _error(f"the operators service failed: {type(exc).__name__}: {exc}")
            self._reply(status, ctype, body)

        def _reply(self, status: HTTPStatus, ctype: str, body: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("X-Frame-Options", "DENY")  # no clickjacking of the take-over button
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the browser went away mid-answer
                self.close_connection = True

        def _check_host(self) -> None:
            if not console.loopback_only:
                return
            host = self.headers.get("Host", "")
            if not (is_loopback(host if host.rpartition(":")[2].isdigit() else f"{host}:0")):
                raise _HttpError(HTTPStatus.FORBIDDEN, f"Host {shown(host)} is not loopback; this console "
                                                       "serves loopback only (open it as http://127.0.0.1:PORT/)")

        def _check_token(self) -> None:
            if not console.token:
                return
            given = self.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                     console.token.encode()):
                raise _HttpError(HTTPStatus.UNAUTHORIZED, "this console needs its token: open it as "
                                                          "http://HOST:PORT/#token=<the console token>")

        def _get(self, path: str) -> tuple[HTTPStatus, str, bytes]:
            if path in ("/", "/index.html"):
                return HTTPStatus.OK, "text/html; charset=utf-8", console.page
            if path == "/api/state":
                self._check_token()
                state = _finite(backend.snapshot())
                return HTTPStatus.OK, "application/json", json.dumps(state, allow_nan=False).encode()
            if path.startswith("/api/thumb/"):
                self._check_token()
                robot = unquote(path[len("/api/thumb/"):])
                if not is_id(robot):
                    raise _HttpError(HTTPStatus.BAD_REQUEST, f"{shown(robot)} is not a robot id")
                jpeg = backend.thumbnail(robot)
                if not jpeg:
                    raise _HttpError(HTTPStatus.NOT_FOUND, f"robot {robot!r} has no thumbnail")
                return HTTPStatus.OK, "image/jpeg", jpeg
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no such page {shown(path)}")

        def _post(self, path: str) -> tuple[HTTPStatus, str, bytes]:
            actions = {"/api/take_over": backend.take_over, "/api/hand_back": backend.hand_back}
            if path not in actions:
                raise _HttpError(HTTPStatus.NOT_FOUND, f"no such action {shown(path)}")
            self._check_token()
            raw = self._body()
            operator, robot = _action_body(raw)
            actions[path](operator, robot)
            log.info("console: %s %s -> %s", path.rsplit("/", 1)[1], operator, robot)
            return HTTPStatus.OK, "application/json", json.dumps({"ok": True, "operator": operator,
                                                                  "robot": robot}).encode()

        def _body(self) -> bytes:
            ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
            length = self.headers.get("Content-Length", "")
            if not length.isdigit():
                self.close_connection = True
                raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "a POST needs a Content-Length")
            if int(length) > MAX_BODY_BYTES:
                self.close_connection = True
                raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                 f"body of {length} bytes; at most {MAX_BODY_BYTES}")
            raw = self.rfile.read(int(length))
            if ctype != "application/json":
                raise _HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                 f"Content-Type {shown(ctype)}; send application/json")
            return raw

    return Handler


def _message(exc: BaseException) -> str:
    """The 404's text: a KeyError's str() is the repr of its argument, a bare key or a sentence."""
    if not isinstance(exc, KeyError) or not exc.args:
        return str(exc)
    arg = exc.args[0]
    return arg if isinstance(arg, str) and " " in arg else f"unknown id {arg!r}"


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
