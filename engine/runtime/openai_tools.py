"""Tool calls for `corral serve`, in one JSON form any model can be held to.

A model's own tool-call syntax differs per family (and many small models have none), so the
reply is held by llama.cpp's grammar sampler to one JSON object, as llama-server's generic
format does:

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    {"content": "It is sunny."}                    (tool_choice "auto" only)

The tools, with that form, are described in the system message; earlier assistant turns that
called tools are shown to the model in the same form, and `tool` messages as the role
`tool` (the chat template's own handling). The reply is parsed back into OpenAI's
`tool_calls` with `finish_reason: "tool_calls"`. Pure: no I/O.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .openai_errors import refuse

MAX_CALLS = 4  # tool calls one reply may make at once


@dataclass(frozen=True, slots=True)
class Tools:
    """What a request with tools asks for: the system text and the schema the reply keeps."""

    system: str
    schema: dict[str, Any]
    names: tuple[str, ...]


def tools_for(req: Mapping[str, Any]) -> Tools | None:
    """The request's tools and tool_choice, checked; None when no tool may be called."""
    raw = req.get("tools")
    choice = req.get("tool_choice", "auto" if raw else "none")
    if raw is None or raw == []:
        if choice not in ("none", None):
            raise refuse("tool_choice", "there are no tools to choose from")
        return None
    if not isinstance(raw, list):
        raise refuse("tools", "must be a list of {type: function, function: {...}}")
    functions: list[dict[str, Any]] = []
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise refuse(f"tools[{i}]", "each tool is {type: 'function', function: {name, ...}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise refuse(f"tools[{i}].function.name", "must be a non-empty string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise refuse(f"tools[{i}].function.parameters", "must be a JSON schema object")
        functions.append(
            {"name": name, "description": str(fn.get("description", "")), "parameters": params}
        )
    names = tuple(f["name"] for f in functions)
    if len(set(names)) != len(names):
        raise refuse("tools", "two tools have the same name")
    parallel = req.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise refuse("parallel_tool_calls", "must be true or false")
    if choice == "none":
        return None
    allowed = functions
    if isinstance(choice, dict):
        wanted = (
            (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        )
        if wanted not in names:
            raise refuse(
                "tool_choice",
                f"names no tool given: {wanted!r} (tools: {', '.join(names)})"
                if wanted
                else "is 'none', 'auto', 'required' or {type: 'function', function: {name}}",
            )
        allowed = [f for f in functions if f["name"] == wanted]
    elif choice not in ("auto", "required"):
        raise refuse("tool_choice", "is 'none', 'auto', 'required' or {type: 'function', ...}")
    call = {
        "type": "array",
        "minItems": 1,
        # bounded: a small model otherwise repeats the same call until max_tokens
        "maxItems": MAX_CALLS if parallel else 1,
        "items": {"anyOf": [_call_schema(f) for f in allowed]},
    }
    calling = {"type": "object", "properties": {"tool_calls": call}, "required": ["tool_calls"]}
    answering = {
        "type": "object",
        "properties": {"content": {"type": "string"}},
        "required": ["content"],
    }
    schema = {"anyOf": [calling, answering]} if choice == "auto" else calling
    listed = json.dumps(functions, ensure_ascii=False)
    system = (
        f"You can call these tools:\n{listed}\n"
        'Reply with one JSON object: {"tool_calls": [{"name": ..., "arguments": {...}}]} to '
        "call tools"
        + (', or {"content": "..."} to answer without them.' if choice == "auto" else ".")
    )
    return Tools(system, schema, tuple(f["name"] for f in allowed))


def _call_schema(fn: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
        "required": ["name", "arguments"],
    }


def assistant_calls(i: int, calls: Any) -> str:
    """An earlier assistant turn's tool_calls, as the model is asked to write them."""
    if not isinstance(calls, list) or not calls:
        raise refuse(f"messages[{i}].tool_calls", "must be a non-empty list")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise refuse(f"messages[{i}].tool_calls[{k}]", "needs function.name and arguments")
        args = fn.get("arguments", "{}")
        try:
            parsed = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            raise refuse(
                f"messages[{i}].tool_calls[{k}].function.arguments", "must be a JSON string"
            ) from None
        out.append({"name": fn["name"], "arguments": parsed})
    return json.dumps({"tool_calls": out}, ensure_ascii=False)


def parse_reply(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a reply held to the tools' JSON form. The same call twice
    is one call; a reply cut short by max_tokens keeps the calls it completed (none: the
    text comes back as content)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = {"tool_calls": _complete_calls(text)} if '"tool_calls"' in text else None
        if not obj or not obj["tool_calls"]:
            return text, []
    if isinstance(obj, dict) and isinstance(obj.get("tool_calls"), list):
        seen: list[tuple[str, str]] = []
        calls = []
        for c in obj["tool_calls"]:
            if not isinstance(c, dict):
                continue
            key = (str(c.get("name", "")), json.dumps(c.get("arguments", {}), sort_keys=True))
            if key in seen:
                continue
            seen.append(key)
            calls.append(
                {
                    "id": f"call_{secrets.token_hex(12)}",
                    "type": "function",
                    "function": {
                        "name": key[0],
                        "arguments": json.dumps(c.get("arguments", {}), ensure_ascii=False),
                    },
                }
            )
        return None, calls
    if isinstance(obj, dict) and isinstance(obj.get("content"), str):
        return obj["content"], []
    return text, []


def _complete_calls(text: str) -> list[Any]:
    """The whole call objects at the start of a tool_calls array that was cut short."""
    start = text.find("[", text.find('"tool_calls"'))
    decoder, calls, i = json.JSONDecoder(), [], start + 1
    while 0 < i < len(text):
        while i < len(text) and text[i] in " \t\n\r,":
            i += 1
        try:
            call, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        calls.append(call)
    return calls


def with_tools_system(
    messages: Sequence[Mapping[str, str]], tools: Tools
) -> tuple[Mapping[str, str], ...]:
    """The messages with the tools' description in the system message."""
    return with_system_note(messages, tools.system)


def with_system_note(
    messages: Sequence[Mapping[str, str]], note: str
) -> tuple[Mapping[str, str], ...]:
    """The messages with `note` at the end of the system message (added first where there
    is none)."""
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{note}"
    else:
        out.insert(0, {"role": "system", "content": note})
    return tuple(out)
