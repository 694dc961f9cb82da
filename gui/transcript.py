"""The chat as message blocks: the speaker on a line of its own, the text below it.

A reply streams in as plain text (no Markdown half-parsed, no bold carried over from the
speaker's line) and is rendered as Markdown once it is complete. A context shift is a
divider inside the reply, where it happened; a reply cut short (stopped, crashed, out of
length) says so under it. Each block has a "copy" link that puts its text on the clipboard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PySide6.QtCore import QUrl
from PySide6.QtGui import QGuiApplication, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import QTextBrowser

SPEAKERS = {"user": "You", "assistant": "Assistant", "system": "System"}


@dataclass
class Block:
    """One message: `parts` are its text runs, an int between two runs is a context shift
    (the tokens it dropped); `note` says how it ended when that was not by itself."""

    role: str
    parts: list[str | int] = field(default_factory=lambda: [""])
    note: str = ""
    streaming: bool = False

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))


def _divider(dropped: int) -> str:
    return f"context shift: the oldest {dropped} tokens were dropped to go on"


class Transcript(QTextBrowser):
    """The chat's blocks, drawn; the window feeds it and reads `blocks` back."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[Block] = []
        self.setOpenLinks(False)
        self.anchorClicked.connect(self._link)
        self.setPlaceholderText("The chat appears here once a model is deployed.")

    # ------------------------------------------------------------------ feeding

    def set_messages(self, messages: list[tuple[str, str]]) -> None:
        """Start over from (role, text) pairs (a saved chat, a new one)."""
        self.blocks = [Block(role, [text]) for role, text in messages]
        self.render()

    def add(self, role: str, text: str) -> None:
        self.blocks.append(Block(role, [text]))
        self.render()

    def start_reply(self) -> None:
        self.blocks.append(Block("assistant", [""], streaming=True))
        self.render()

    def _streaming(self) -> Block | None:
        return self.blocks[-1] if self.blocks and self.blocks[-1].streaming else None

    def append(self, text: str) -> None:
        """More of the reply under way, added as plain text at the end."""
        block = self._streaming()
        if block is None:
            return
        if isinstance(block.parts[-1], int):
            block.parts.append("")
        block.parts[-1] = str(block.parts[-1]) + text
        cursor = self.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertText(text, QTextCharFormat())
        self.setTextCursor(cursor)

    def shift(self, dropped: int) -> None:
        """A context shift, where the reply under way has got to."""
        block = self._streaming()
        if block is None:
            return
        block.parts.append(dropped)
        self.render()

    def finish(self, content: str, note: str = "") -> None:
        """The reply is complete: `content` is its whole text (the child's own), kept with the
        shift dividers where they fell."""
        block = self._streaming()
        if block is None:
            return
        block.streaming = False
        block.note = note
        if content.startswith(block.text):  # the child's text is the truth
            if content != block.text:
                block.parts.append(content[len(block.text) :])
        else:  # (never seen): its text, the dividers after it
            block.parts = [content, *(p for p in block.parts if isinstance(p, int))]
        self.render()

    def interrupt(self, why: str) -> None:
        """The reply under way ended without finishing: keep what came, and say why."""
        block = self._streaming()
        if block is not None:
            block.streaming = False
            block.note = f"interrupted: {why}"
            self.render()

    def drop_last_exchange(self) -> None:
        """Regenerate: the last user message and what answered it go."""
        users = [i for i, b in enumerate(self.blocks) if b.role == "user"]
        if users:
            del self.blocks[users[-1] :]
            self.render()

    def last_reply(self) -> str:
        replies = [b.text for b in self.blocks if b.role == "assistant" and b.text]
        return replies[-1] if replies else ""

    # ------------------------------------------------------------------ drawing

    def markdown(self) -> str:
        """The whole chat as Markdown (what `render` shows; a streaming reply as its text)."""
        out = []
        for i, b in enumerate(self.blocks):
            speaker = SPEAKERS.get(b.role, b.role.capitalize())
            out.append(f"**{speaker}** &nbsp; [copy](copy:{i})")
            for part in b.parts:
                if isinstance(part, int):
                    out.append(f"---\n\n*{_divider(part)}*\n\n---")
                elif part:
                    out.append(part)
            if b.note:
                out.append(f"*({b.note})*")
        return "\n\n".join(out)

    def render(self) -> None:
        streaming = self._streaming()
        if streaming is None:
            self.setMarkdown(self.markdown())
        else:  # the reply under way stays plain text: drawn before it, then inserted
            earlier, self.blocks = self.blocks, self.blocks[:-1]
            try:
                self.setMarkdown(self.markdown())
            finally:
                self.blocks = earlier
            cursor = self.textCursor()
            cursor.movePosition(QTextCursor.MoveOperation.End)
            plain = QTextCharFormat()
            bold = QTextCharFormat()
            bold.setFontWeight(700)
            if len(self.blocks) > 1:
                cursor.insertBlock()
            cursor.insertText("Assistant", bold)
            cursor.insertBlock()
            for part in streaming.parts:
                if isinstance(part, int):
                    cursor.insertText(f"\n— {_divider(part)} —\n", plain)
                else:
                    cursor.insertText(part, plain)
            self.setTextCursor(cursor)
        self.moveCursor(QTextCursor.MoveOperation.End)

    def _link(self, url: QUrl) -> None:
        if url.scheme() == "copy":
            i = int(url.path() or url.toString().split(":", 1)[1])
            if 0 <= i < len(self.blocks):
                QGuiApplication.clipboard().setText(self.blocks[i].text)
