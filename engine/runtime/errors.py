"""Exception root of the desktop runtime; every message says what to do next."""

from __future__ import annotations


class RuntimeFailure(Exception):
    """Base: something the desktop runtime could not do."""


class AgentUnreachable(RuntimeFailure):
    """No control connection to an agent (refused, timed out, wrong protocol)."""


class NotPaired(AgentUnreachable):
    """The agent and this desktop have not paired (or one side unpaired the other);
    `fingerprint` is the agent's certificate as this desktop saw it, when it got that far."""

    def __init__(self, message: str, fingerprint: str = "") -> None:
        super().__init__(message)
        self.fingerprint = fingerprint


class PairingFailed(RuntimeFailure):
    """Pairing did not complete: wrong, expired or locked code, or a man in the middle."""


class AgentTimeout(AgentUnreachable):
    """The agent did not answer a request in time (hung host, cut link)."""


class AgentRequestFailed(RuntimeFailure):
    """The agent answered a request with an error."""


class WorkerUnavailable(RuntimeFailure):
    """An RPC worker endpoint does not answer or speaks another ggml RPC protocol."""


class ModelUnreadable(RuntimeFailure):
    """The model file cannot be read (truncated, not GGUF, unknown layout)."""


class PlanRefused(RuntimeFailure):
    """The plan would not fit (or cannot be made); nothing was loaded."""


class WouldUnload(RuntimeFailure):
    """Planning would unload the loaded model (a host serving it answers one session at a
    time, or timing its devices runs probes in its place). Nothing was unloaded."""


class InferenceCrashed(RuntimeFailure):
    """The inference child died (llama.cpp aborted, was killed, or ran out of memory)."""

    def __init__(self, message: str, exit_text: str, log_tail: list[str], cause: str = "") -> None:
        super().__init__(message)
        self.exit_text = exit_text
        self.log_tail = log_tail
        self.cause = cause  # what happened in a few words ("the RPC worker on gpu-b died")


class InferenceError(RuntimeFailure):
    """The inference child refused a request (bad model file, context full, ...)."""


class PromptTooLong(InferenceError):
    """The prompt does not fit the loaded context (nothing was generated)."""


class InferenceTimeout(InferenceError):
    """The inference child said nothing for longer than the caller would wait."""


class ReplyStalled(InferenceError):
    """A reply made no progress for longer than its stall bound; the child was killed."""

    def __init__(self, message: str, after: float) -> None:
        super().__init__(message)
        self.after = after


class FieldRefused(InferenceError):
    """A request field the model cannot honour as sent (a JSON schema its grammar cannot
    express, ...): `param` names it, for a 400 that says which."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param
