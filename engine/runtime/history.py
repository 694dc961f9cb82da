"""Chat histories on disk: they outlive the inference process and the app (atomic writes)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import platformdirs

from corral.engine.security.files import SecurityFileError, write_private

Messages = list[dict[str, str]]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class HistoryError(ValueError):
    """A bad chat name or a damaged history file; the message says which and what to do."""


def chats_dir() -> Path:
    return (
        Path(os.environ.get("CORRAL_STATE_DIR") or platformdirs.user_state_dir("corral")) / "chats"
    )


def _path(name: str) -> Path:
    if not _NAME.fullmatch(name):
        raise HistoryError(f"{name!r} is not a chat name: use letters, digits, '.', '_', '-'")
    return chats_dir() / f"{name}.json"


def save(name: str, messages: Messages) -> Path:
    path = _path(name)
    data = json.dumps({"version": 1, "messages": messages}, ensure_ascii=False, indent=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic and owner-only: a full disk or a crash leaves the previous save whole
        write_private(path, data.encode())
    except (OSError, SecurityFileError) as exc:
        raise HistoryError(f"could not save the chat {name!r}: {exc}") from None
    return path


def load(name: str) -> Messages:
    """The saved messages, or [] for a chat not saved yet."""
    path = _path(name)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        messages = data["messages"]
        if not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError("messages are not role/content pairs")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise HistoryError(
            f"the saved chat {path} is damaged ({exc}); move it away to start "
            "over, the file is left as it is"
        ) from None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def names() -> list[str]:
    return sorted(p.stem for p in chats_dir().glob("*.json")) if chats_dir().exists() else []


def to_markdown(name: str, messages: Messages) -> str:
    out = [f"# {name}", ""]
    for m in messages:
        out += [f"**{m['role']}**", "", m["content"], ""]
    return "\n".join(out)
