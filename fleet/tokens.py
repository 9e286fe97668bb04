"""Robot tokens: who a caller is, checked by the gateway on every call.

A token is ``fleet1.<payload>.<signature>``: the payload is base64url JSON
``{"rid": robot id, "tid": token id, "iat": issued at (s), "exp": expiry (s, 0 = none)}``
and the signature is HMAC-SHA256 over ``fleet1.<payload>`` with a secret shared
by the gateways (the token key file). Gateways stay stateless: a token verifies
without a database; revocation is by token id (a Redis set, see
``cloud/gateway/auth.py``). The robot keeps its token in a credentials file
(systemd ``LoadCredential=``) and sends it as ``authorization: Bearer <token>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fleet.secret_files import read_private, tighten

PREFIX = "fleet1"
MIN_KEY_BYTES = 32


class TokenError(ValueError):
    """A token that does not verify (malformed, bad signature, expired); the message says which."""


@dataclass(frozen=True)
class TokenClaims:
    robot_id: str
    token_id: str
    issued_s: float
    expires_s: float = 0.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_key() -> bytes:
    """A fresh random token key."""
    return secrets.token_bytes(MIN_KEY_BYTES)


def write_key(path: str | os.PathLike, key: bytes) -> None:
    """Write the key as hex, readable by the owner only (an existing file is tightened to 0600 too)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    tighten(fd)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")


def load_key(path: str | os.PathLike) -> bytes:
    """Read a hex key file; refuses keys shorter than MIN_KEY_BYTES and files others can read (ConfigError)."""
    text = read_private(path, "token key file").decode(errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise TokenError(f"token key file {str(path)!r} must hold hex digits") from None
    if len(key) < MIN_KEY_BYTES:
        raise TokenError(f"token key in {str(path)!r} has {len(key)} bytes; at least {MIN_KEY_BYTES} required")
    return key


def issue(key: bytes, robot_id: str, ttl_s: float = 0.0, token_id: str | None = None,
          now_s: float | None = None) -> tuple[str, TokenClaims]:
    """Sign a token for ``robot_id``; ``ttl_s`` 0 = no expiry (rely on revocation)."""
    if not robot_id:
        raise TokenError("robot_id must not be empty")
    if ttl_s < 0:
        raise TokenError(f"ttl_s ({ttl_s}) must be >= 0")
    now = time.time() if now_s is None else now_s
    claims = TokenClaims(robot_id, token_id or secrets.token_hex(8), now, now + ttl_s if ttl_s else 0.0)
    payload = _b64(json.dumps({"rid": claims.robot_id, "tid": claims.token_id, "iat": round(claims.issued_s, 3),
                               "exp": round(claims.expires_s, 3)}, separators=(",", ":")).encode())
    signed = f"{PREFIX}.{payload}"
    sig = hmac.new(key, signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{_b64(sig)}", claims


def verify(key: bytes, token: str, now_s: float | None = None) -> TokenClaims:
    """Check the signature and expiry; returns the claims or raises TokenError."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenError(f"token is not a {PREFIX} token (expected {PREFIX}.<payload>.<signature>)")
    expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    try:
        sig = _unb64(parts[2])
        data = json.loads(_unb64(parts[1]))
        claims = TokenClaims(str(data["rid"]), str(data["tid"]), float(data["iat"]), float(data.get("exp", 0)))
    except (ValueError, KeyError, TypeError):
        raise TokenError("token payload is malformed") from None
    if not hmac.compare_digest(sig, expected):
        raise TokenError(f"token {claims.token_id!r} has a bad signature (another key, or altered)")
    now = time.time() if now_s is None else now_s
    if claims.expires_s and now >= claims.expires_s:
        raise TokenError(f"token {claims.token_id!r} for robot {claims.robot_id!r} expired at {claims.expires_s:.0f}")
    return claims


def read_token_file(path: str | os.PathLike) -> str:
    """The token in a credentials file (surrounding whitespace ignored); refuses files others can read."""
    token = read_private(path, "token file").decode(errors="replace").strip()
    if not token:
        raise TokenError(f"token file {str(path)!r} is empty")
    return token
