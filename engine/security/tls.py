"""TLS 1.3 contexts for both sides: certificates are pinned, never checked against names.

The agent asks every client for a certificate (CERT_OPTIONAL) and lets OpenSSL verify it
against the pinned desktop certificates, so an unknown certificate fails the handshake
before one byte of a request is read; a client without one may only pair. The desktop
checks the agent's fingerprint against its pins right after the handshake, before it sends
anything (TLS 1.3 has already verified the agent's signature over the handshake).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable

from .identity import Identity, fingerprint


def server_context(identity: Identity, pinned: Iterable[bytes]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ders = b"".join(pinned)
    if ders:
        ctx.load_verify_locations(cadata=ders)
    ctx.num_tickets = 0  # no resumption: every connection proves its certificate again
    return ctx


def client_context(identity: Identity | None) -> ssl.SSLContext:
    """With `identity`, a paired desktop; without, a desktop that is about to pair."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # pinned by fingerprint after the handshake instead
    if identity is not None:
        ctx.load_cert_chain(identity.cert_path, identity.key_path)
    return ctx


def peer_fingerprint(obj: ssl.SSLObject) -> str:
    """The fingerprint of the certificate the peer proved it holds; "" when it sent none."""
    der = obj.getpeercert(binary_form=True)
    return fingerprint(der) if der else ""
