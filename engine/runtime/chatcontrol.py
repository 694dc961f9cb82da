"""The desktop window's chat, owned by the engine's loop.

The window (Qt, another thread) never touches a ChatSession: it submits a ChatController
command to the engine loop, with everything the command needs read on the GUI thread first
and passed as arguments, and it sees the chat only through what the command returns (a plan,
a LoadResult, a Replied with a snapshot of the history) and through ReplyUpdates posted
while a reply streams. Every command asserts that it runs on the loop that first used the
controller, so a call from the wrong thread fails loudly instead of racing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.engine.planner.plan import Plan
from corral.engine.planner.speed import host_summary
from corral.engine.planner.validate import Verdict

from .childproto import Done
from .errors import RuntimeFailure, WouldUnload
from .kvstatus import ReplyUpdate
from .session import ChatSession, LoadResult, LoadSettings

if TYPE_CHECKING:
    from .serve import ApiServer

History = tuple[Mapping[str, str], ...]


@dataclass(frozen=True, slots=True)
class Replied:
    """A finished reply and the chat's history after it (a copy: the window's to keep)."""

    done: Done
    history: History


@dataclass(frozen=True, slots=True)
class Recovered:
    """The model loaded again after it was lost: what happened in one line, the new load,
    and the chat it goes on with."""

    line: str
    result: LoadResult
    history: History


class ChatController:
    """One chat session at a time, for the hosts the window names.

    A loaded model is never unloaded as a side effect: planning on other hosts uses a draft
    session of its own (adopted by the next load on those hosts), and a plan that would need
    a host serving the loaded model is refused with WouldUnload. Only `load` (Deploy,
    Apply) and `unload` end a loaded model."""

    def __init__(self) -> None:
        self._session: ChatSession | None = None  # the loaded model's (or the one loading)
        self._draft: ChatSession | None = None  # plans on other hosts, nothing loaded
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api: ApiServer | None = None  # the API served beside the chat, if asked
        self._retiring: set[asyncio.Task[None]] = set()  # sessions out of use, closing

    def _own(self) -> None:
        """On the engine's loop (also true in a callback it runs), or fail."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        assert loop is self._loop, "ChatController is used from the engine's loop only"

    @staticmethod
    def _sound(session: ChatSession | None, addresses: Sequence[str]) -> bool:
        """`session` is for exactly these hosts (in any order: speed may put them in
        another), and still has their workers."""
        return (
            session is not None
            and sorted(c.address for c in session.clients) == sorted(addresses)
            and bool(session.workers or not addresses)
            and not any(c.closed_reason for c in session.clients)
        )

    def _serving(self) -> ChatSession | None:
        """The session whose model is loaded, if one is."""
        session = self._session
        return session if session is not None and session.result is not None else None

    async def _drafting(self, addresses: Sequence[str]) -> ChatSession:
        """A session on these hosts for plans only, while another one serves the model."""
        if self._sound(self._draft, addresses):
            assert self._draft is not None
            return self._draft
        await self._close_draft()
        serving = self._serving()
        assert serving is not None
        shared = [c.name for c in serving.clients if c.address in addresses]
        if shared:
            raise WouldUnload(
                f"{', '.join(shared)} serves the loaded model, and a worker answers one "
                "session at a time: planning there would unload it. Deploy (or Apply) to "
                "replace the loaded model, or Unload it first"
            )
        draft = self._draft = ChatSession(list(addresses))
        await draft.connect()
        return draft

    async def _retire(self, session: ChatSession | None) -> None:
        """Close a session taken out of use, on a task of its own that `close` waits for:
        the window may quit while an Unload (or a load replacing a model) is closing one.
        Left closing when the loop stopped, its inference child's pipes stayed open, and
        the interpreter printed "Exception ignored ... Event loop is closed" at exit (CI,
        12-06: tests/gui/test_trust.py after an unpair's unload)."""
        if session is None:
            return
        task = asyncio.ensure_future(session.close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        await asyncio.shield(task)

    async def _close_draft(self) -> None:
        draft, self._draft = self._draft, None
        await self._retire(draft)

    async def _connected(self, addresses: Sequence[str], fresh: bool) -> ChatSession:
        """The session to load on these hosts: the current one while it is for the same
        hosts, sound and nothing is loaded in it (or not `fresh`); a draft planned on these
        hosts; else a new one (which starts their workers and takes their leases). The
        model loaded before is unloaded first."""
        old = self._session
        if not fresh and self._sound(old, addresses):
            assert old is not None
            return old
        self._session = None
        await self._retire(old)
        if self._sound(self._draft, addresses):
            session, self._draft = self._draft, None
            assert session is not None
            self._session = session
            return session
        await self._close_draft()
        session = ChatSession(list(addresses))
        self._session = session  # closed by close() even if connecting fails half-way
        await session.connect()
        return session

    async def plan(
        self, addresses: Sequence[str], settings: LoadSettings
    ) -> tuple[Plan, list[Verdict], list[str], dict[str, str]]:
        """The exact plan for these hosts and settings, the checks' verdicts, the plan's
        measured speeds and prediction in words (planner.speed.describe_speed) and each
        host's measured figures by address (planner.speed.host_summary); planned in
        the loaded model's session when it is for these hosts, else in a draft (WouldUnload
        when a host serves the loaded model)."""
        self._own()
        if self._serving() is None:
            session = await self._connected(addresses, fresh=False)
        elif self._sound(self._session, addresses):
            assert self._session is not None
            session = self._session
        else:
            session = await self._drafting(addresses)
        _, exact = await session.plan(settings)
        speed = session.speed_lines()
        hosts = {
            c.address: host_summary(session.speeds, exact.devices, c.name) for c in session.clients
        }
        return exact, list(session.verdicts), speed if exact.devices else [], hosts

    async def load(
        self,
        addresses: Sequence[str],
        settings: LoadSettings,
        fresh: bool,
        on_progress: Callable[[float], None] | None = None,
    ) -> LoadResult:
        """Load the model on these hosts (a fresh session when one was loaded before); the
        chat goes on: the history of the model it replaces is the new one's."""
        self._own()
        await self.stop_api()  # it served the model this load replaces
        carried = list(self._session.history) if self._session is not None else []
        session = await self._connected(addresses, fresh)
        result = await session.open_after_connect(settings, on_progress=on_progress)
        session.history = carried
        return result

    async def unload(self) -> None:
        """Unload the model: its session closes (the hosts' workers are free again)."""
        self._own()
        await self.stop_api()
        session, self._session = self._session, None
        await self._retire(session)

    async def ask(
        self, text: str, max_tokens: int, on_update: Callable[[ReplyUpdate], None]
    ) -> Replied:
        """Stream a reply; `on_update` hears every token and context shift (on this loop:
        the window posts them on to its own thread)."""
        self._own()
        session = self._require()
        meter = session.reply_meter()
        async with contextlib.aclosing(session.ask(text, max_tokens=max_tokens)) as frames:
            async for frame in frames:
                update = meter.feed(frame)
                if update.done is None:
                    on_update(update)
        return Replied(meter.finished(), self._history(session))

    async def recover(
        self, cause: str, on_progress: Callable[[float], None] | None = None
    ) -> Recovered:
        """Load again after the model was lost (ChatSession.recover), on the hosts that
        answer, keeping the chat."""
        self._own()
        session = self._require()
        line = await session.recover(cause, on_progress)
        assert session.result is not None
        return Recovered(line, session.result, self._history(session))

    def cancel_reply(self) -> None:
        """Stop the reply under way (a second call kills the inference process)."""
        self._own()
        if self._session is not None:
            self._session.cancel()

    async def take_back(self) -> str:
        """Drop the last exchange; its user message, to be answered again."""
        self._own()
        return self._require().take_back()

    async def set_history(self, messages: Sequence[Mapping[str, str]]) -> History:
        """Start over from these messages (a saved chat, or none for a new chat)."""
        self._own()
        if self._session is None:
            if messages:
                raise RuntimeFailure("deploy a model first, then open the chat to continue it")
            return ()
        self._session.history = [dict(m) for m in messages]
        return self._history(self._session)

    async def start_api(self, port: int) -> str:
        """Serve the loaded model to other tools (corral serve's OpenAI-compatible API, on
        127.0.0.1) beside this chat: its replies take the model's other slots. The URL."""
        self._own()
        session = self._require()
        await self.stop_api()
        if session.slots < 2:
            raise RuntimeFailure(
                "the model has one slot, which this chat uses: set Slots to 2 or more and "
                "Deploy again to serve an API beside the chat"
            )
        from .serve import ApiServer  # the HTTP side, only when asked for

        settings = session.settings
        model_id = settings.model.stem if settings is not None else "model"
        api = ApiServer(session, model_id, slots=session.slots - 1)
        try:
            bound = await api.start("127.0.0.1", port)
        except OSError as exc:
            raise RuntimeFailure(
                f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}; choose another port"
            ) from None
        self._api = api
        return f"http://127.0.0.1:{bound}/v1"

    async def stop_api(self) -> None:
        """Stop serving the API (its replies in flight end with an error saying so)."""
        self._own()
        api, self._api = self._api, None
        if api is not None:
            await api.close()

    def api_slots(self) -> dict[int, tuple[int, int]]:
        """Each slot the API used: (cells in use, its cells)."""
        self._own()
        return dict(self._api.slot_kv) if self._api is not None else {}

    async def close(self) -> None:
        self._own()
        await self.stop_api()
        await self._close_draft()
        session, self._session = self._session, None
        await self._retire(session)
        # and those an unload or a load was still closing
        await asyncio.gather(*self._retiring, return_exceptions=True)

    def _require(self) -> ChatSession:
        if self._session is None:
            raise RuntimeFailure("no model is loaded: press Deploy")
        return self._session

    @staticmethod
    def _history(session: ChatSession) -> History:
        return tuple(dict(m) for m in session.history)
