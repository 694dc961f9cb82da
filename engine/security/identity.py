"""A key and a self-signed certificate per agent and per desktop, made on first run.

Identity is the certificate's SHA-256 fingerprint, pinned by the peer at pairing. Nothing
about the certificate's names or dates is trusted: mDNS names and addresses are hints only.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .files import SecurityFileError, write_private


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, lowercase hex: the identity a peer pins."""
    return hashlib.sha256(der).hexdigest()


def short(fp: str) -> str:
    """The first 16 hex digits in groups of four, for people comparing on two screens."""
    return ":".join(fp[i : i + 4] for i in range(0, 16, 4))


@dataclass(frozen=True)
class Identity:
    name: str  # shown to peers: "alice@studio" for a desktop, the hostname for an agent
    key_path: Path
    cert_path: Path
    cert_der: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_der)


def default_name(role: str) -> str:
    host = socket.gethostname() or "localhost"
    if role == "desktop":
        user = os.environ.get("USER") or os.environ.get("USERNAME") or "user"
        return f"{user}@{host}"
    return host


def load_or_create(directory: Path, role: str, name: str = "") -> Identity:
    """The identity in `directory` (key.pem, cert.pem, owner-only), created when missing.

    A damaged pair raises SecurityFileError naming the files: replacing an identity silently
    would break every pairing, so the user decides (delete both files and pair again).
    """
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    if key_path.exists() or cert_path.exists():
        return _load(key_path, cert_path)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    # a unique subject: OpenSSL finds a trust anchor by subject name, and two desktops may
    # well both be called "alice@laptop"
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name or default_name(role)),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(16)),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * 30))
        # self-signed and pinned: it is its own trust anchor for OpenSSL's chain check
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return _load(key_path, cert_path)


def _load(key_path: Path, cert_path: Path) -> Identity:
    fix = f"delete {key_path} and {cert_path} to make a new identity, then pair again"
    try:
        key_pem = key_path.read_bytes()
        cert_pem = cert_path.read_bytes()
    except OSError as exc:
        raise SecurityFileError(
            f"cannot read this identity ({exc.strerror or exc}): {fix}"
        ) from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SecurityFileError(f"the identity files are damaged ({exc}): {fix}") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise SecurityFileError(f"{key_path} does not belong to {cert_path}: {fix}")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else ""
    return Identity(name, key_path, cert_path, cert.public_bytes(serialization.Encoding.DER))
