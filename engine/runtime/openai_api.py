"""What an OpenAI chat-completions request asks for, checked field by field.

Every field a client may send is either honoured or refused with a 400 that names it: a
request is never answered as if part of it had not been sent. Pure (no I/O): `corral serve`
parses each body with `chat_request` and streams or returns what it asked for; `StopWatch`
applies `stop` strings to a reply as it streams, across token boundaries.

Honoured: messages (system, developer as system, user, assistant; text content or text
parts), model (must be the one served), max_tokens / max_completion_tokens, temperature,
top_p, top_k, min_p, seed, stop, n (1), stream, stream_options.include_usage, and the
metadata that does not change a reply (user, metadata, store false, service_tier auto).
Refused until built (issue #24 tracks them): n above 1, logprobs, logit_bias,
presence/frequency penalties, response_format other than text, tools and tool messages,
image or audio parts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ApiError(Exception):
    """A request the API refuses: the HTTP status, the message, the field it concerns."""

    def __init__(self, status: int, message: str, param: str = "", code: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param or None,
                "code": self.code or None,
            }
        }


MAX_STOPS = 4  # as OpenAI's API allows


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: tuple[Mapping[str, str], ...]
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    sampling: Mapping[str, Any] = field(default_factory=dict)  # childproto.Generate fields


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_NOT_YET = "not supported by corral serve yet"
# fields that do not change a reply, accepted as they are (what OpenAI does with them is
# account-side: abuse monitoring, stored completions, billing tiers)
_METADATA = ("user", "metadata")


def _refuse(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param)


def _number(req: Mapping[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _refuse(key, f"must be a number from {lo:g} to {hi:g}, not {value!r}")
    if not lo <= value <= hi:
        raise _refuse(key, f"must be from {lo:g} to {hi:g}, not {value!r}")
    return float(value)


def _integer(req: Mapping[str, Any], key: str, lo: int) -> int | None:
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise _refuse(key, f"must be a whole number of at least {lo}, not {value!r}")
    return value


def _content(i: int, content: Any) -> str:
    """A message's text: a string, or a list of text parts (others refused, named)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise _refuse(f"messages[{i}].content", "must be a string or a list of content parts")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise _refuse(
                f"messages[{i}].content[{k}]",
                f"content part type {kind!r}: this model reads text only"
                if isinstance(kind, str)
                else "a content part is {'type': 'text', 'text': ...}",
            )
        texts.append(part["text"])
    return "".join(texts)


def _messages(raw: Any) -> tuple[Mapping[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise _refuse("messages", "must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _refuse(f"messages[{i}]", "must be an object with a role and content")
        role = m.get("role")
        if role == "tool" or "tool_calls" in m or "function_call" in m:
            raise _refuse(f"messages[{i}]", f"tool calls and tool messages are {_NOT_YET}")
        if role not in _ROLES:
            raise _refuse(
                f"messages[{i}].role",
                f"{role!r}: use system, developer, user or assistant",
            )
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise _refuse(f"messages[{i}].{extra[0]}", f"{_NOT_YET} in a message")
        if "name" in m:
            raise _refuse(
                f"messages[{i}].name",
                "participant names are not part of the "
                "model's chat template here; put the name in the content",
            )
        out.append({"role": _ROLES[role], "content": _content(i, m.get("content"))})
    return tuple(out)


def chat_request(req: Mapping[str, Any], model_id: str) -> ChatRequest:
    """The request, checked; ApiError names the first field refused."""
    model = req.get("model")
    if model is not None and model != model_id:
        raise ApiError(
            404,
            f"model {model!r} is not served here; this server serves {model_id!r} (GET /v1/models)",
            "model",
            "model_not_found",
        )
    messages = _messages(req.get("messages"))
    limit = _integer(req, "max_completion_tokens", 1)
    if limit is None:
        limit = _integer(req, "max_tokens", 1)
    temp = _number(req, "temperature", 0.0, 2.0)
    top_p = _number(req, "top_p", 0.0, 1.0)
    min_p = _number(req, "min_p", 0.0, 1.0)
    top_k = _integer(req, "top_k", 0)
    seed = req.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _refuse("seed", f"must be a whole number, not {seed!r}")
    n = _integer(req, "n", 1)
    if n is not None and n > 1:
        raise _refuse("n", f"{n} choices: one choice per request here; send {n} requests")
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise _refuse("stream", f"must be true or false, not {stream!r}")
    options = req.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _refuse("stream_options", "only with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _refuse("stream_options", "only include_usage is known")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _refuse("stream_options.include_usage", "must be true or false")
    stop = _stops(req.get("stop"))
    _unsupported(req)
    sampling: dict[str, Any] = {"temp": 1.0 if temp is None else temp}
    if limit is not None:
        sampling["max_tokens"] = limit
    for key, value in (("top_p", top_p), ("min_p", min_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            sampling[key] = value
    return ChatRequest(messages, stream, include_usage, stop, sampling)


def _stops(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise _refuse("stop", f"a non-empty string, or a list of up to {MAX_STOPS} of them")
    return tuple(stops)


_KNOWN = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "min_p", "seed", "n", "stream", "stream_options", "stop", *_METADATA,
}  # fmt: skip


def _unsupported(req: Mapping[str, Any]) -> None:
    """Fields that would change the reply and are not built yet (refused unless they ask
    for the default), and fields this server does not know."""
    defaults: dict[str, Any] = {
        "logprobs": (False, None),
        "top_logprobs": (None, 0),
        "logit_bias": (None, {}),
        "presence_penalty": (None, 0, 0.0),
        "frequency_penalty": (None, 0, 0.0),
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "parallel_tool_calls": (None, True, False),
        "functions": (None, []),
        "function_call": (None, "none"),
        "store": (None, False),
        "service_tier": (None, "auto", "default"),
        "response_format": (None, {"type": "text"}),
    }
    for key, allowed in defaults.items():
        if key in req and req[key] not in allowed:
            what = {
                "store": "corral serve keeps no completions (store: false)",
                "service_tier": "there is one tier here (auto)",
                "response_format": "only {'type': 'text'}: a JSON format is " + _NOT_YET,
            }.get(key, _NOT_YET)
            raise _refuse(key, what)
    unknown = sorted(set(req) - _KNOWN - set(defaults))
    if unknown:
        raise _refuse(unknown[0], "not a field corral serve knows; leave it out")


class StopWatch:
    """`stop` strings over a streamed reply: feed each piece of text and get back what may
    be sent now; text that may be the start of a stop string is held until it is not.
    `stopped` is set once a stop string appeared (the reply then ends before it)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""
        self.stopped = False
        self.keep = max((len(s) for s in stops), default=1) - 1

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            out, self.held = self.held[: min(found)], ""
            return out
        # send all but the longest tail that could still begin a stop string
        cut = len(self.held)
        for k in range(min(self.keep, len(self.held)), 0, -1):
            tail = self.held[-k:]
            if any(s.startswith(tail) for s in self.stops):
                cut = len(self.held) - k
                break
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def flush(self) -> str:
        """The reply ended on its own: what was held is sent."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out
