"""What an OpenAI chat-completions request asks for, checked field by field.

Every field a client may send is either honoured or refused with a 400 that names it: a
request is never answered as if part of it had not been sent. Pure (no I/O): `corral serve`
parses each body with `chat_request` and streams or returns what it asked for; `StopWatch`
applies `stop` strings to a reply as it streams, across token boundaries.

Honoured: messages (system, developer as system, user, assistant with or without
tool_calls, tool; text content or text parts; a participant name as "name: " before the
text, since chat templates have no field for it), model (must be the one served), max_tokens /
max_completion_tokens, temperature, top_p, top_k, min_p, seed, stop, n (the choices one
after another, choice i with seed + i), stream, stream_options.include_usage,
presence_penalty and frequency_penalty (llama.cpp's penalties sampler), logit_bias (token
ids; -100 bans), logprobs and top_logprobs (the model's own distribution), response_format
json_object and json_schema (llama.cpp's grammar sampler: the reply always parses), tools
and tool_choice (openai_tools), llama-server's ignore_eos, and the metadata that does not
change a reply (user, metadata, store false, service_tier auto). Refused by name: image or
audio parts and outputs, the old functions/function_call, and any field not known.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .openai_errors import ApiError, refuse
from .openai_tools import Tools, assistant_calls, tools_for, with_system_note, with_tools_system

MAX_STOPS = 4  # as OpenAI's API allows
MAX_N = 8  # choices a request: each is one more reply, read one after another
MAX_TOP_LOGPROBS = 20  # as OpenAI's
MAX_BIAS = 300  # logit_bias entries, as OpenAI's


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: tuple[Mapping[str, str], ...]
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    sampling: Mapping[str, Any] = field(default_factory=dict)  # childproto.Generate fields
    n: int = 1  # choices
    logprobs: bool = False
    tools: Tools | None = None  # the reply is parsed into tool_calls
    prompt: str | None = None  # /v1/completions: a raw prompt, no chat template
    echo: bool = False  # /v1/completions: the prompt comes back before the reply


_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
# fields that do not change a reply, accepted as they are (what OpenAI does with them is
# account-side: abuse monitoring, stored completions, billing tiers)
_METADATA = ("user", "metadata")


def _number(req: Mapping[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise refuse(key, f"must be a number from {lo:g} to {hi:g}, not {value!r}")
    if not lo <= value <= hi:
        raise refuse(key, f"must be from {lo:g} to {hi:g}, not {value!r}")
    return float(value)


def _integer(req: Mapping[str, Any], key: str, lo: int) -> int | None:
    value = req.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise refuse(key, f"must be a whole number of at least {lo}, not {value!r}")
    return value


def _content(i: int, content: Any) -> str:
    """A message's text: a string, or a list of text parts (others refused, named)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise refuse(f"messages[{i}].content", "must be a string or a list of content parts")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise refuse(
                f"messages[{i}].content[{k}]",
                f"content part type {kind!r}: this model reads text only"
                if isinstance(kind, str)
                else "a content part is {'type': 'text', 'text': ...}",
            )
        texts.append(part["text"])
    return "".join(texts)


def _messages(raw: Any) -> tuple[Mapping[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise refuse("messages", "must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise refuse(f"messages[{i}]", "must be an object with a role and content")
        role = m.get("role")
        if "function_call" in m or role == "function":
            raise refuse(
                f"messages[{i}]", "function_call is OpenAI's old form: use tool_calls and tool"
            )
        if role not in _ROLES:
            raise refuse(
                f"messages[{i}].role",
                f"{role!r}: use system, developer, user, assistant or tool",
            )
        known = {"role", "content", "name"}
        known |= {"tool_calls", "refusal"} if role == "assistant" else set()
        known |= {"tool_call_id"} if role == "tool" else set()
        extra = sorted(set(m) - known)
        if extra:
            raise refuse(f"messages[{i}].{extra[0]}", f"not part of a {role} message")
        name = m.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise refuse(f"messages[{i}].name", "must be a non-empty string")
        content = _content(i, m.get("content"))
        if name:  # chat templates have no field for it: the model reads it before the text
            content = f"{name.strip()}: {content}"
        if role == "assistant" and m.get("tool_calls"):
            # shown to the model in the form it is asked to call tools in (openai_tools)
            content = assistant_calls(i, m["tool_calls"])
        out.append({"role": _ROLES[role], "content": content})
    return tuple(out)


def chat_request(req: Mapping[str, Any], model_id: str) -> ChatRequest:
    """The request, checked; ApiError names the first field refused."""
    _model(req, model_id)
    messages = _messages(req.get("messages"))
    limit = _integer(req, "max_completion_tokens", 1)
    if limit is None:
        limit = _integer(req, "max_tokens", 1)
    n, stream, include_usage = _choices_and_stream(req)
    stop = _stops(req.get("stop"))
    _unsupported(req)
    sampling = _sampling(req, limit)
    logprobs = _flag(req, "logprobs")
    top = _integer(req, "top_logprobs", 0)
    if top is not None:
        if not logprobs:
            raise refuse("top_logprobs", "only with logprobs: true")
        if top > MAX_TOP_LOGPROBS:
            raise refuse("top_logprobs", f"at most {MAX_TOP_LOGPROBS}")
    if logprobs:
        sampling["logprobs"] = top or 0
    tools = tools_for(req)
    schema = _response_format(req.get("response_format"))
    if tools is not None:
        if schema:
            raise refuse("response_format", "not with tools: the tools' form is JSON already")
        messages = with_tools_system(messages, tools)
        schema = json.dumps(tools.schema)
    elif schema:
        # the grammar holds the reply to the schema; the model is also told it, or a small
        # one fills the first string it opens until max_tokens
        what = "a JSON object" if schema == "*" else f"JSON that matches this schema: {schema}"
        messages = with_system_note(messages, f"Reply with {what}")
    if schema:
        sampling["json_schema"] = schema
    return ChatRequest(messages, stream, include_usage, stop, sampling, n, logprobs, tools)


def _choices_and_stream(req: Mapping[str, Any]) -> tuple[int, bool, bool]:
    """(n, stream, stream_options.include_usage), as chat and text completions take them."""
    n = _integer(req, "n", 1) or 1
    if n > MAX_N:
        raise refuse("n", f"at most {MAX_N} choices a request")
    stream = _flag(req, "stream")
    options = req.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise refuse("stream_options", "only with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise refuse("stream_options", "only include_usage is known")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise refuse("stream_options.include_usage", "must be true or false")
    return n, stream, include_usage


def _model(req: Mapping[str, Any], model_id: str) -> None:
    model = req.get("model")
    if model is not None and model != model_id:
        raise ApiError(
            404,
            f"model {model!r} is not served here; this server serves {model_id!r} (GET /v1/models)",
            "model",
            "model_not_found",
        )


def _flag(req: Mapping[str, Any], key: str) -> bool:
    value = req.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise refuse(key, f"must be true or false, not {value!r}")
    return value


def _sampling(req: Mapping[str, Any], limit: int | None) -> dict[str, Any]:
    """The fields that choose tokens, as childproto.Generate's."""
    temp = _number(req, "temperature", 0.0, 2.0)
    sampling: dict[str, Any] = {"temp": 1.0 if temp is None else temp}
    if limit is not None:
        sampling["max_tokens"] = limit
    seed = req.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise refuse("seed", f"must be a whole number, not {seed!r}")
    for key, value in (
        ("top_p", _number(req, "top_p", 0.0, 1.0)),
        ("min_p", _number(req, "min_p", 0.0, 1.0)),
        ("top_k", _integer(req, "top_k", 0)),
        ("seed", seed),
        ("presence_penalty", _number(req, "presence_penalty", -2.0, 2.0)),
        ("frequency_penalty", _number(req, "frequency_penalty", -2.0, 2.0)),
    ):
        if value is not None:
            sampling[key] = value
    if _flag(req, "ignore_eos"):  # llama-server's: fixed-length replies, for benchmarks
        sampling["ignore_eos"] = True
    bias = req.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > MAX_BIAS:
            raise refuse("logit_bias", f"a map of up to {MAX_BIAS} token ids to -100..100")
        pairs = []
        for token, value in bias.items():
            if not str(token).isdigit():
                raise refuse("logit_bias", f"{token!r} is not a token id")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise refuse("logit_bias", f"the bias of {token} must be a number")
            if not -100 <= value <= 100:
                raise refuse("logit_bias", f"the bias of {token} must be from -100 to 100")
            # -100 bans the token outright, as OpenAI's does in effect
            pairs.append((int(token), float("-inf") if value <= -100 else float(value)))
        sampling["logit_bias"] = tuple(pairs)
    return sampling


def _response_format(raw: Any) -> str:
    """The JSON schema the reply must keep ("*": any object; "": free text)."""
    if raw is None:
        return ""
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return ""
    if kind == "json_object":
        return "*"
    if kind == "json_schema":
        spec = raw.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise refuse("response_format.json_schema", "needs {name, schema: {...}}")
        return json.dumps(schema)
    raise refuse("response_format", "is {type: text}, {type: json_object} or {type: json_schema}")


def _stops(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise refuse("stop", f"a non-empty string, or a list of up to {MAX_STOPS} of them")
    return tuple(stops)


_KNOWN = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "min_p", "seed", "n", "stream", "stream_options", "stop", "presence_penalty",
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format",
    "tools", "tool_choice", "parallel_tool_calls", "ignore_eos", *_METADATA,
}  # fmt: skip


def _unsupported(req: Mapping[str, Any]) -> None:
    """Fields refused unless they ask for the default, and fields this server does not
    know."""
    defaults: dict[str, Any] = {
        "functions": (None, []),
        "function_call": (None, "none"),
        "store": (None, False),
        "service_tier": (None, "auto", "default"),
        "modalities": (None, ["text"]),
        "audio": (None,),
        "prediction": (None,),
        "web_search_options": (None,),
    }
    for key, allowed in defaults.items():
        if key in req and req[key] not in allowed:
            what = {
                "store": "corral serve keeps no completions (store: false)",
                "service_tier": "there is one tier here (auto)",
                "functions": "OpenAI's old form: use tools",
                "function_call": "OpenAI's old form: use tool_choice",
                "modalities": "this model writes text only",
                "audio": "this model writes text only",
            }.get(key, "not available from a local model")
            raise refuse(key, what)
    unknown = sorted(set(req) - _KNOWN - set(defaults))
    if unknown:
        raise refuse(unknown[0], "not a field corral serve knows; leave it out")


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


def completion_request(req: Mapping[str, Any], model_id: str) -> ChatRequest:
    """A legacy /v1/completions request (a raw prompt, no chat template), checked."""
    _model(req, model_id)
    raw = req.get("prompt")
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        raw = raw[0]
    if not isinstance(raw, str) or not raw:
        raise refuse(
            "prompt",
            "a non-empty string (or a list of one); token arrays and several prompts: send "
            "one request each",
        )
    for key, allowed in (("suffix", (None, "")), ("best_of", (None, 1))):
        if req.get(key) not in allowed:
            raise refuse(key, "not available here (fill-in-the-middle, server-side best-of)")
    unknown = sorted(set(req) - _COMPLETION_FIELDS)
    if unknown:
        raise refuse(unknown[0], "not a field of /v1/completions corral serve knows")
    limit = _integer(req, "max_tokens", 1)
    n, stream, include_usage = _choices_and_stream(req)
    # OpenAI's default for the legacy endpoint: 16 tokens
    sampling = _sampling(req, 16 if limit is None else limit)
    top = _integer(req, "logprobs", 0)
    if top is not None:
        if top > MAX_LEGACY_LOGPROBS:
            raise refuse("logprobs", f"at most {MAX_LEGACY_LOGPROBS}")
        sampling["logprobs"] = top
    echo = _flag(req, "echo")
    return ChatRequest(
        (),
        stream,
        include_usage,
        _stops(req.get("stop")),
        sampling,
        n,
        top is not None,
        None,
        prompt=raw,
        echo=echo,
    )


MAX_LEGACY_LOGPROBS = 5  # as OpenAI's /v1/completions
_COMPLETION_FIELDS = {
    "model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n",
    "stream", "stream_options", "logprobs", "echo", "stop", "presence_penalty",
    "frequency_penalty", "best_of", "logit_bias", "seed", "ignore_eos", *_METADATA,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    texts: tuple[str, ...]
    base64: bool = False  # encoding_format "base64": little-endian float32, base64


MAX_INPUTS = 256  # texts an embeddings request may carry


def embedding_request(req: Mapping[str, Any], model_id: str, n_embd: int) -> EmbeddingRequest:
    """A /v1/embeddings request, checked (`n_embd`: the model's vector size)."""
    _model(req, model_id)
    raw = req.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(texts, list)
        or not texts
        or len(texts) > MAX_INPUTS
        or not all(isinstance(t, str) and t for t in texts)
    ):
        raise refuse(
            "input",
            f"a non-empty string or a list of up to {MAX_INPUTS} of them (token arrays: send "
            "the text)",
        )
    encoding = req.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise refuse("encoding_format", "is float or base64")
    dims = req.get("dimensions")
    if dims is not None and dims != n_embd:
        raise refuse("dimensions", f"this model's vectors have {n_embd}; leave it out")
    unknown = sorted(set(req) - {"model", "input", "encoding_format", "dimensions", "user"})
    if unknown:
        raise refuse(unknown[0], "not a field of /v1/embeddings corral serve knows")
    return EmbeddingRequest(tuple(texts), encoding == "base64")
