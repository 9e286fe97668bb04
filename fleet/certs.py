"""A development PKI for the fleet: a CA, the gateway's certificate, one certificate and token per robot.

``fleet certs init DIR --hosts gateway.example,10.0.0.5 --robots r1,r2`` writes::

    DIR/ca.pem  ca-key.pem          the CA (keep ca-key.pem offline in production)
    DIR/gateway.pem  gateway-key.pem    server certificate for --hosts (DNS names and IPs)
    DIR/token.key                   the secret that signs robot tokens (gateways only)
    DIR/robots/<id>/ca.pem cert.pem key.pem token    what one robot needs, nothing else

``fleet certs robot DIR --robot_id r3`` adds a robot later. Keys are ECDSA P-256
and written with mode 0600 (existing files are tightened to it). A robot certificate's common name is its robot id;
the gateway checks that it matches the token's robot. For production use your
own CA (cert-manager, a cloud PKI): the gateway only needs PEM files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet import tokens
from fleet.secret_files import tighten

log = logging.getLogger(__name__)

CA_DAYS = 3650
LEAF_DAYS = 397


@dataclass(frozen=True)
class RobotCredentials:
    robot_id: str
    directory: Path
    token_id: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    tighten(fd)  # O_CREAT's mode applies only to a new file: an existing one keeps its own
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str = "fleet development CA", days: int = CA_DAYS):
    """A self-signed CA key and certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue_cert(ca_key, ca_cert: x509.Certificate, common_name: str, hosts: tuple[str, ...] = (),
               server: bool = False, days: int = LEAF_DAYS):
    """A leaf certificate: ``server`` for the gateway (SANs from ``hosts``), else a robot's client certificate."""
    if not common_name:
        raise ValueError("common_name must not be empty")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    if not server:
        sans.append(x509.UniformResourceIdentifier(f"spiffe://fleet/robot/{common_name}"))
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _load_ca(directory: Path):
    try:
        key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no CA in {directory}: run `fleet certs init {directory}` first ({exc})") from None
    return key, cert


def add_robot(directory: str | os.PathLike, robot_id: str, token_ttl_s: float = 0.0) -> RobotCredentials:
    """Issue a certificate and a token for ``robot_id`` from the CA and token key in ``directory``."""
    root = Path(directory)
    if not robot_id or "/" in robot_id or robot_id.startswith("."):
        raise ValueError(f"robot_id {robot_id!r} must be a non-empty name without '/'")
    ca_key, ca_cert = _load_ca(root)
    key, cert = issue_cert(ca_key, ca_cert, robot_id)
    out = root / "robots" / robot_id
    out.mkdir(parents=True, exist_ok=True)
    (out / "ca.pem").write_bytes(_cert_pem(ca_cert))
    (out / "cert.pem").write_bytes(_cert_pem(cert))
    _write_private(out / "key.pem", _key_pem(key))
    token, claims = tokens.issue(tokens.load_key(root / "token.key"), robot_id, ttl_s=token_ttl_s)
    _write_private(out / "token", (token + "\n").encode())
    log.info("robot %s: certificate and token %s in %s", robot_id, claims.token_id, out)
    return RobotCredentials(robot_id, out, claims.token_id)


def refresh_token(directory: str | os.PathLike, robot_id: str, token_ttl_s: float) -> tuple[Path, tokens.TokenClaims]:
    """A fresh token for a robot of ``directory``, replacing its token file atomically (an edge reading it
    sees the old or the new token, never half of one; it re-reads the file when it changes)."""
    root = Path(directory)
    out = root / "robots" / robot_id
    if not (out / "cert.pem").exists():
        raise FileNotFoundError(f"robot {robot_id!r} has no credentials in {root}: `fleet certs robot` first")
    token, claims = tokens.issue(tokens.load_key(root / "token.key"), robot_id, ttl_s=token_ttl_s)
    tmp = out / ".token.new"
    _write_private(tmp, (token + "\n").encode())
    os.replace(tmp, out / "token")
    log.info("robot %s: new token %s in %s", robot_id, claims.token_id, out)
    return out / "token", claims


def init_pki(directory: str | os.PathLike, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
             robots: tuple[str, ...] = (), token_ttl_s: float = 0.0) -> list[RobotCredentials]:
    """Create the CA, the gateway certificate for ``hosts``, the token key and each robot's credentials."""
    root = Path(directory)
    if (root / "ca.pem").exists():
        raise FileExistsError(f"{root / 'ca.pem'} exists: refusing to replace a CA (use `fleet certs robot`)")
    if not hosts:
        raise ValueError("hosts must name at least one DNS name or IP of the gateway")
    root.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca()
    (root / "ca.pem").write_bytes(_cert_pem(ca_cert))
    _write_private(root / "ca-key.pem", _key_pem(ca_key))
    key, cert = issue_cert(ca_key, ca_cert, hosts[0], hosts=hosts, server=True)
    (root / "gateway.pem").write_bytes(_cert_pem(cert))
    _write_private(root / "gateway-key.pem", _key_pem(key))
    tokens.write_key(root / "token.key", tokens.new_key())
    return [add_robot(root, rid, token_ttl_s) for rid in robots]
