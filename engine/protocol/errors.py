"""Error codes that travel on the wire, and the exception root for protocol failures."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Numbered error codes; never renumber, only append."""

    BAD_FRAME = 1  # length prefix too large, or bytes that are not msgpack
    BAD_MESSAGE = 2  # well-formed msgpack that is not a known message of the right shape
    VERSION_MISMATCH = 3  # protocol major differs
    NOT_READY = 4  # hello not yet exchanged
    WORKER_FAILED = 5  # the RPC worker could not start or died
    UNKNOWN_DEVICE = 6  # a device name the agent does not have
    BUSY = 7  # leased to another desktop session
    INTERNAL = 8  # a bug on the remote side; its log has the details
    NOT_PAIRED = 9  # a request from a desktop this agent has not paired with
    PAIRING_REFUSED = 10  # no code, expired, locked after wrong tries, or a wrong code
    IN_USE = 11  # the workers are leased to another desktop session


class ProtocolError(Exception):
    """A frame or message that breaks the protocol; carries the code to answer with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RemoteError(Exception):
    """The peer answered a request with an error reply."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
