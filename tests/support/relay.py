"""The native relay's record format written independently of engine/security/_relay.c, with
the `cryptography` package's AES-GCM: tests and the fuzzer check the relay against it.

A record: 4-byte big-endian length (the additional data), ciphertext, 16-byte tag; the nonce
is the direction's IV XOR the record's sequence number in its last 8 bytes."""

from __future__ import annotations

import socket
import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def nonce(iv: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, bytes(4) + seq.to_bytes(8, "big"), strict=True))


def seal(key: bytes, iv: bytes, seq: int, data: bytes) -> bytes:
    head = struct.pack(">I", len(data))
    return head + AESGCM(key).encrypt(nonce(iv, seq), data, head)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def read_record(sock: socket.socket, key: bytes, iv: bytes, seq: int) -> bytes:
    """The next record on `sock`, opened (InvalidTag when it does not authenticate)."""
    head = recv_exactly(sock, 4)
    body = recv_exactly(sock, int.from_bytes(head, "big") + 16)
    return AESGCM(key).decrypt(nonce(iv, seq), body, head)
