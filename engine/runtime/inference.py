"""Parent side of the inference child: start it, talk to it, survive and explain its death."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import socket
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TypeVar

from corral.engine.aio import within
from corral.engine.ggml.kernelcheck import crash_hint
from corral.engine.procs import RPC_PROCESS_ENV, exit_text, last_words, omp_env
from corral.engine.protocol import (
    CapabilityQuestion,
    Message,
    ProtocolError,
    encode_frame,
    read_frame,
    to_wire,
)
from corral.engine.security.tunnel import shim_env

from .childproto import (
    BAD_FIELD,
    CHILD_MESSAGES,
    PROMPT_TOO_LONG,
    Answers,
    Cancel,
    Capabilities,
    Done,
    DryRun,
    DryRunReport,
    Embed,
    Embeddings,
    Event,
    Exit,
    Failed,
    Generate,
    Load,
    Loaded,
    LoadParams,
    Progress,
    Ready,
    Shift,
    StepTimes,
    TimeSteps,
    Token,
    Tokens,
)
from .errors import (
    FieldRefused,
    InferenceCrashed,
    InferenceError,
    InferenceTimeout,
    PromptTooLong,
    ReplyStalled,
)
from .stall import StallWatch

R = TypeVar("R", bound=Message)
R2 = TypeVar("R2")

_READY_TIMEOUT = 60.0
# How long a cancelled or abandoned reply may take to stop before the child is killed. The
# child stops at the next token (or prompt batch); llama.cpp waiting on a worker that stopped
# answering checks for nothing, and only this ends the wait.
STOP_GRACE = 15.0
_LOG_TAIL = 4000
# A load or dry run with no frame for this long is stuck (a worker stopped answering): the
# load reports progress per tensor sent; what follows it (the cache, the graph, a warm-up
# decode) takes seconds even on large models over slow links.
LOAD_STALL = 120.0


class InferenceProcess:
    """One child process holding llama.cpp: one load, dry run or question at a time; while a
    model is loaded, up to `slots` replies at once (each frame of a reply carries its
    request's number, and goes to that reply's queue)."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL)
        self._frames: asyncio.Queue[Message | None] = asyncio.Queue()
        self._replies: dict[int, asyncio.Queue[Message | None]] = {}  # by request number
        self._rid = 0
        self.slots = 1  # replies the loaded model decodes together
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._dead: InferenceCrashed | None = None

    async def start(self) -> Ready:
        """Spawn the child and wait for its Ready (its llama.cpp build and local devices)."""
        ours, theirs = socket.socketpair()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "corral.engine.runtime.child",
                "--fd",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(
                    os.environ, PYTHONUNBUFFERED="1", **RPC_PROCESS_ENV, **omp_env(), **shim_env()
                ),
            )
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=ours)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._pump_log()),
            loop.create_task(self._pump_frames(reader)),
        ]
        return await self._expect(Ready, _READY_TIMEOUT)

    async def _pump_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.log.append(raw.decode(errors="replace").rstrip("\n"))

    async def _pump_frames(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await read_frame(reader)
                if frame is None:
                    break
                msg = CHILD_MESSAGES.from_wire(frame)
                rid = getattr(msg, "rid", -1)
                if rid > 0:  # a reply's frame; one for a reply already abandoned is dropped
                    reply = self._replies.get(rid)
                    if reply is not None:
                        reply.put_nowait(msg)
                else:
                    self._frames.put_nowait(msg)
        except (ProtocolError, OSError):
            pass  # garbage from the child ends the channel: it is treated as a crash
        self._frames.put_nowait(None)
        for reply in self._replies.values():
            reply.put_nowait(None)

    async def _crashed(self) -> InferenceCrashed:
        if self._dead is None:
            assert self.proc is not None
            try:
                code = await within(self.proc.wait(), 5)
                how = exit_text(code)
            except TimeoutError:
                how = "closed its channel but is still running"
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await within(self._tasks[0], 1)  # let the last log lines arrive
            tail = last_words(self.log)  # llama.cpp's abort line last, not faulthandler's
            hint = crash_hint(how, list(self.log))  # a native crash: which kernels, what next
            message = f"the inference process died ({how})" + (f" {hint}" if hint else "")
            self._dead = InferenceCrashed(message, how, tail)
        return self._dead

    async def _next(
        self, timeout: float | None = None, frames: asyncio.Queue[Message | None] | None = None
    ) -> Message:
        if self._dead is not None:
            raise self._dead
        try:
            frame = await within((frames or self._frames).get(), timeout)
        except TimeoutError:
            raise InferenceTimeout(
                f"the inference process did not answer within {timeout:.0f} s"
            ) from None
        if frame is None:
            raise await self._crashed()
        if isinstance(frame, Failed):
            if frame.reason == PROMPT_TOO_LONG:
                raise PromptTooLong(frame.message)
            if frame.reason.startswith(BAD_FIELD):
                raise FieldRefused(frame.message, frame.reason.removeprefix(BAD_FIELD))
            raise InferenceError(frame.message)
        return frame

    async def _expect(self, kind: type[R], timeout: float | None = None) -> R:
        return _as(kind, await self._next(timeout))

    def _send(self, msg: Message) -> None:
        if self._dead is not None:
            raise self._dead
        assert self._writer is not None
        self._writer.write(encode_frame(to_wire(msg)))

    async def load(
        self, params: LoadParams, on_progress: Callable[[float], None] | None = None
    ) -> Loaded:
        """Load a model; `on_progress(fraction)` hears llama.cpp's load progress (the upload
        to workers included)."""
        self._send(Load(params))
        while True:
            frame = await self._stalling(self._next(LOAD_STALL), LOAD_STALL, "the load")
            if not isinstance(frame, Progress):
                loaded = _as(Loaded, frame)
                self.slots = loaded.n_seq
                return loaded
            if on_progress is not None:
                on_progress(frame.fraction)

    async def dry_run(self, params: LoadParams) -> DryRunReport:
        """llama.cpp's simulated allocation for these load params (nothing is allocated)."""
        self._send(DryRun(params))
        return _as(
            DryRunReport, await self._stalling(self._next(LOAD_STALL), LOAD_STALL, "the dry run")
        )

    async def time_steps(
        self, sizes: Sequence[int], reps: int, generate: bool = False
    ) -> list[float]:
        """Seconds of a step of each size on the loaded model (TimeSteps: the median of its
        decodes; with `generate`, a size of 1 as the mean of a reply's steps)."""
        self._send(TimeSteps(tuple(sizes), reps, generate))
        frame = await self._stalling(self._next(LOAD_STALL), LOAD_STALL, "timing the probe")
        return list(_as(StepTimes, frame).seconds)

    async def capabilities(self, device: str, asked: list[CapabilityQuestion]) -> list[bool]:
        """Ask one of the desktop's own devices (see engine.ggml.capabilities)."""
        self._send(Capabilities(device, tuple(asked)))
        return list((await self._expect(Answers)).answers)

    async def _stalling(self, step: Awaitable[R2], bound: float, what: str) -> R2:
        """`step`, or ReplyStalled after `bound` s without a frame: llama.cpp waiting on a
        worker that stopped answering (during a load, a dry run) waits forever; the child
        is killed."""
        try:
            return await step
        except InferenceTimeout:
            self.kill()
            raise ReplyStalled(
                f"{what} made no progress for {bound:.0f} s, so the inference process was killed",
                bound,
            ) from None

    async def generate(
        self,
        request: Generate,
        watch: StallWatch | None = None,
        on_rid: Callable[[int], None] | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Yield a Token per token (with the KV cells in use), a Shift per context shift,
        then Done. Up to `slots` run at once; each gets its own number here.

        `watch`: no frame for `watch.bound()` s (the prompt read in batches, tokens, shifts
        all count) is a stall: the child is killed, since llama.cpp waiting on a worker that
        stopped answering looks at no cancel, and ReplyStalled says after how long.

        Close it (`contextlib.aclosing`) rather than drop it: a consumer that leaves early
        has the rest of the reply stopped (and its frames dropped)."""
        self._rid += 1
        rid = self._rid
        frames: asyncio.Queue[Message | None] = asyncio.Queue()
        self._replies[rid] = frames
        self._send(dataclasses.replace(request, rid=rid))
        if on_rid is not None:  # whoever may want to stop this reply alone
            on_rid(rid)
        if watch is not None:
            watch.begin()
        ended = False
        try:
            while True:
                bound = watch.bound() if watch is not None else None
                try:
                    frame = await self._next(bound, frames)
                except InferenceTimeout:
                    ended = True
                    assert watch is not None and bound is not None
                    self.kill()
                    raise ReplyStalled(
                        f"the reply made no progress for {bound:.0f} s ({watch.describe()}), "
                        "so the inference process was killed",
                        bound,
                    ) from None
                except (InferenceError, InferenceCrashed):
                    ended = True  # the child ended the operation, or died
                    raise
                if watch is not None:
                    _saw(watch, frame)
                if isinstance(frame, Done):
                    ended = True
                for event in self._events(frame):
                    yield event
                if ended:
                    return
        finally:
            if not ended:
                await self._abandon(rid, frames)
            self._replies.pop(rid, None)

    async def embed(self, texts: list[str]) -> Embeddings:
        """Embeddings of `texts` by the loaded model (they wait for running replies)."""
        self._rid += 1
        rid = self._rid
        frames: asyncio.Queue[Message | None] = asyncio.Queue()
        self._replies[rid] = frames
        try:
            self._send(Embed(tuple(texts), rid))
            return _as(Embeddings, await self._next(None, frames))
        finally:
            self._replies.pop(rid, None)

    @staticmethod
    def _events(frame: Message) -> list[Event]:
        if isinstance(frame, Tokens):
            return [
                Token(t.text, t.id, t.kv_used, frame.n_ctx, frame.slot, t.logprob, t.top)
                for t in frame.items
            ]
        if isinstance(frame, Shift | Done):
            return [frame]
        if isinstance(frame, Progress):  # the prompt being read: for the stall watch only
            return []
        raise InferenceError(f"the inference process said {type(frame).__name__} mid-reply")

    async def _abandon(self, rid: int, frames: asyncio.Queue[Message | None]) -> None:
        """A reply's consumer left before `done`: stop the reply and read its frames to the
        end, so its slot is free before the next request wants it; kill the child if it
        will not stop (llama.cpp waiting on a worker that stopped answering)."""
        if self._dead is not None or self.proc is None or self.proc.returncode is not None:
            return
        self.cancel(rid)
        try:
            async with asyncio.timeout(STOP_GRACE):
                while not isinstance(await self._next(None, frames), Done):
                    pass
        except (InferenceError, InferenceCrashed):
            pass  # it ended with an error (in step again) or died
        except TimeoutError:
            self.kill()

    def kill(self) -> bool:
        """SIGKILL the child now (a reply stuck in llama.cpp); False if it was not running.
        The operation waiting on it then fails with InferenceCrashed."""
        if self.proc is None or self.proc.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        return True

    def cancel(self, rid: int = -1) -> None:
        """Stop reply `rid` at its next step (-1: every reply)."""
        if self._dead is None and self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode_frame(to_wire(Cancel(rid))))

    async def close(self) -> None:
        """Ask the child to exit; kill it if it does not within 3 s."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self._send(Exit())
            try:
                await within(self.proc.wait(), 3)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._writer is not None:
            self._writer.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _saw(watch: StallWatch, frame: Message) -> None:
    """What a frame of a reply tells the stall watch."""
    if isinstance(frame, Progress):
        watch.saw("prompt")
        if frame.fraction >= 1.0:
            watch.after_prompt()
    elif isinstance(frame, Tokens):
        watch.saw("token", len(frame.items))
    else:
        watch.saw("token", 0)


def _as(kind: type[R], frame: Message) -> R:
    """`frame` if it is the reply expected, else InferenceError naming both."""
    if not isinstance(frame, kind):
        raise InferenceError(
            f"the inference process said {type(frame).__name__} instead of {kind.__name__}"
        )
    return frame
