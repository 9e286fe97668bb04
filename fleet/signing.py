"""Publisher signatures on policy manifests (Ed25519): what makes a version authentic to a robot.

The trainer signs every version's manifest with the publisher's private key
(``fleet trainer --publish_key_file``); a robot pins the public half (or several, during a key
rotation: ``security.policy_public_key_files``) and refuses a version whose manifest is unsigned,
signed by a key it does not pin, or changed after signing. The manifest lists every tensor's
sha256 and their ``total_sha256``, so once its signature verifies, every byte the edge assembles
(full transfer, delta applied to the bytes it held, or the last good policy on its disk) is checked
against hashes the publisher vouched for, however it arrived.

Signed bytes: :data:`DOMAIN` followed by the manifest's canonical JSON without its ``signature``
field (keys sorted, no spaces, ASCII), taken after one JSON round trip so that the signer and a
verifier who parsed the manifest from the wire agree byte for byte. The signature travels in the
manifest itself: ``"signature": {"key_id": <16 hex>, "ed25519": <128 hex>}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleet.errors import ConfigError, PolicyRefused
from fleet.secret_files import read_private, tighten

if TYPE_CHECKING:  # no torch for `fleet certs`
    from fleet.weights import Manifest

DOMAIN = b"fleet policy manifest v1\n"
"""Prefix of the signed bytes, so that a manifest signature can never be taken for another message's."""
PRIVATE_KEY_FILE = "publisher.key"
PUBLIC_KEY_FILE = "publisher.pub"
PREVIOUS_PUBLIC_KEY_FILE = "publisher-previous.pub"
REASON = "signature"
"""The refusal label (``fleet_edge_policy_rejected_total{reason="signature"}``)."""

_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable name of a public key: the first 16 hex digits of the sha256 of its raw 32 bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signed_bytes(manifest: Manifest) -> bytes:
    """What the signature covers: DOMAIN + the canonical JSON of ``manifest`` without its signature."""
    data = json.loads(dataclasses.replace(manifest, signature={}).to_json())
    data.pop("signature", None)
    return DOMAIN + json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class ManifestSigner:
    """The publisher's private key: signs manifests."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    @staticmethod
    def from_file(path: str | os.PathLike, what: str = "publish_key_file") -> ManifestSigner:
        """Load a PEM (PKCS#8) Ed25519 private key; ConfigError naming the file if it is readable by group or
        others, missing, or not an Ed25519 key."""
        data = read_private(path, what)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{what} {str(path)!r} is not a PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{what} {str(path)!r} holds a {type(key).__name__}, not an Ed25519 key "
                              "(make one with `fleet certs publisher-key DIR`)")
        return ManifestSigner(key)

    def sign(self, manifest: Manifest) -> Manifest:
        """``manifest`` with its signature (any previous one replaced)."""
        signature = self._key.sign(signed_bytes(manifest))
        return dataclasses.replace(manifest, signature={"key_id": self.key_id, "ed25519": signature.hex()})


class PinnedKeys:
    """The publisher public keys a robot trusts (several during a rotation): verifies manifests."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]):
        self._keys = {key_id(k): k for k in keys}
        if not self._keys:
            raise ConfigError("no publisher public key to pin")

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    @staticmethod
    def from_files(paths: Iterable[str | os.PathLike],
                   what: str = "security.policy_public_key_files") -> PinnedKeys:
        """Every PEM public key in ``paths`` (a file may hold several); ConfigError naming the file if one is
        unreadable, holds no public key or holds one that is not Ed25519."""
        keys = []
        for path in paths:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"{what}: {str(path)!r} cannot be read: {exc.strerror}") from None
            blocks = _PEM_PUBLIC.findall(data)
            if not blocks:
                raise ConfigError(f"{what}: {str(path)!r} holds no PEM public key (-----BEGIN PUBLIC KEY-----)")
            for block in blocks:
                try:
                    key = serialization.load_pem_public_key(block)
                except (ValueError, TypeError) as exc:
                    raise ConfigError(f"{what}: {str(path)!r} holds an unreadable public key: {exc}") from None
                if not isinstance(key, Ed25519PublicKey):
                    raise ConfigError(f"{what}: {str(path)!r} holds a {type(key).__name__}, not an Ed25519 "
                                      "publisher key (`fleet certs publisher-key DIR` writes publisher.pub)")
                keys.append(key)
        return PinnedKeys(keys)

    def verify(self, manifest: Manifest) -> None:
        """Raise PolicyRefused (reason "signature") unless ``manifest`` is signed by one of the pinned keys."""
        sig = manifest.signature
        if not sig:
            raise PolicyRefused(f"policy v{manifest.version} is not signed, and this robot pins publisher key(s) "
                                f"{', '.join(self.key_ids)}", manifest.version, REASON)
        kid, hex_sig = sig.get("key_id"), sig.get("ed25519")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise PolicyRefused(f"policy v{manifest.version} is signed by key {str(kid)[:32]!r}, which this robot "
                                f"does not pin (pinned: {', '.join(self.key_ids)})", manifest.version, REASON)
        try:
            key.verify(bytes.fromhex(hex_sig) if isinstance(hex_sig, str) else b"", signed_bytes(manifest))
        except (InvalidSignature, ValueError):
            raise PolicyRefused(f"policy v{manifest.version}: signature by key {kid} does not verify (the manifest "
                                "was changed after signing, or the signature is forged)", manifest.version,
                                REASON) from None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    tighten(fd)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_pair(root: Path) -> str:
    key = Ed25519PrivateKey.generate()
    tmp = root / (PRIVATE_KEY_FILE + ".tmp")
    _write_private(tmp, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pub_tmp = root / (PUBLIC_KEY_FILE + ".tmp")
    pub_tmp.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    os.replace(tmp, root / PRIVATE_KEY_FILE)
    os.replace(pub_tmp, root / PUBLIC_KEY_FILE)
    return key_id(key.public_key())


def make_publisher_key(directory: str | os.PathLike) -> str:
    """Write ``publisher.key`` (0600) and ``publisher.pub`` into ``directory``; return the key id. Refuses to
    replace an existing key (FileExistsError): use :func:`rotate_publisher_key`."""
    root = Path(directory)
    if (root / PRIVATE_KEY_FILE).exists() or (root / PUBLIC_KEY_FILE).exists():
        raise FileExistsError(f"{root / PRIVATE_KEY_FILE} exists: refusing to replace a publisher key (use "
                              f"`fleet certs rotate-publisher-key {root}`)")
    root.mkdir(parents=True, exist_ok=True)
    return _write_pair(root)


def rotate_publisher_key(directory: str | os.PathLike) -> tuple[str, str]:
    """A new publisher key pair in ``directory``; the old public key moves to ``publisher-previous.pub`` (robots
    pin both during the rotation window) and the old private key is replaced. Returns (old id, new id)."""
    root = Path(directory)
    try:
        old = PinnedKeys.from_files([root / PUBLIC_KEY_FILE], "publisher key")
    except ConfigError as exc:
        raise FileNotFoundError(f"no publisher key to rotate in {root} ({exc}): run "
                                f"`fleet certs publisher-key {root}` first") from None
    os.replace(root / PUBLIC_KEY_FILE, root / PREVIOUS_PUBLIC_KEY_FILE)
    return old.key_ids[0], _write_pair(root)
