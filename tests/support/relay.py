"""The native relay's record format written independently of engine/security/_relay.c, with
the `cryptography` package's AES-GCM: tests and the fuzzer check the relay against it.

A record: 4-byte big-endian length (the additional data), ciphertext, 16-byte tag; the nonce
is the direction's IV XOR the record's sequence number in its last 8 bytes."""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def nonce(iv: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, bytes(4) + seq.to_bytes(8, "big"), strict=True))


def seal(key: bytes, iv: bytes, seq: int, data: bytes) -> bytes:
    head = struct.pack(">I", len(data))
    return head + AESGCM(key).encrypt(nonce(iv, seq), data, head)
