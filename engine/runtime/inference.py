"""Parent side of the inference child: start it, talk to it, survive and explain its death."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import sys
from collections.abc import AsyncGenerator, Callable
from typing import Any

from corral.engine.aio import within
from corral.engine.ggml.kernelcheck import crash_hint
from corral.engine.procs import RPC_PROCESS_ENV, exit_text
from corral.engine.protocol import ProtocolError, encode_frame, read_frame
from corral.engine.security.tunnel import shim_env

from .errors import InferenceCrashed, InferenceError

_READY_TIMEOUT = 60.0
# How long a cancelled or abandoned reply may take to stop before the child is killed. The
# child stops at the next token (or prompt batch); llama.cpp waiting on a worker that stopped
# answering checks for nothing, and only this ends the wait.
STOP_GRACE = 15.0
_LOG_TAIL = 4000


class InferenceProcess:
    """One child process holding llama.cpp; one operation at a time."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL)
        self.build: dict[str, Any] = {}
        self._frames: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._dead: InferenceCrashed | None = None

    async def start(self) -> dict[str, Any]:
        """Spawn the child and wait for its `ready` (which carries its llama.cpp build)."""
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
                env=dict(os.environ, PYTHONUNBUFFERED="1", **RPC_PROCESS_ENV, **shim_env()),
            )
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=ours)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._pump_log()),
            loop.create_task(self._pump_frames(reader)),
        ]
        ready = await self._next(_READY_TIMEOUT)
        if ready.get("op") != "ready":
            raise InferenceError(f"the inference process said {ready.get('op')!r} instead of ready")
        self.build = dict(ready.get("build", {}))
        return ready

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
                if isinstance(frame, dict):
                    self._frames.put_nowait(frame)
        except (ProtocolError, OSError):
            pass
        self._frames.put_nowait(None)

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
            tail = [line for line in self.log if line.strip()][-12:]
            hint = crash_hint(how, list(self.log))  # a native crash: which kernels, what next
            message = f"the inference process died ({how})" + (f" {hint}" if hint else "")
            self._dead = InferenceCrashed(message, how, tail)
        return self._dead

    async def _next(self, timeout: float | None = None) -> dict[str, Any]:
        if self._dead is not None:
            raise self._dead
        try:
            frame = await within(self._frames.get(), timeout)
        except TimeoutError:
            raise InferenceError(
                f"the inference process did not answer within {timeout:.0f} s"
            ) from None
        if frame is None:
            raise await self._crashed()
        if frame.get("op") == "error":
            raise InferenceError(str(frame.get("message", "unknown error")))
        return frame

    def _send(self, op: str, **fields: Any) -> None:
        if self._dead is not None:
            raise self._dead
        assert self._writer is not None
        self._writer.write(encode_frame({"op": op, **fields}))

    async def load(
        self, on_progress: Callable[[float], None] | None = None, **params: Any
    ) -> dict[str, Any]:
        """Load a model (params as in the child's `load`); returns the `loaded` report.
        `on_progress(fraction)` hears llama.cpp's load progress (upload to workers included)."""
        self._send("load", **params)
        while True:
            frame = await self._next()
            if frame.get("op") != "progress":
                return frame
            if on_progress is not None:
                on_progress(float(frame["fraction"]))

    async def dry_run(self, **params: Any) -> dict[str, Any]:
        """llama.cpp's simulated allocation for these load params (nothing is allocated)."""
        self._send("dry_run", **params)
        return await self._next()

    async def capabilities(
        self, device: str, asked: list[tuple[str, str, int, bool]]
    ) -> list[bool]:
        """Ask one of the desktop's own devices (see engine.ggml.capabilities)."""
        self._send("capabilities", device=device, questions=[list(q) for q in asked])
        return [bool(a) for a in (await self._next())["answers"]]

    async def generate(self, **params: Any) -> AsyncGenerator[dict[str, Any], None]:
        """Yield one `token` event per token (with the KV cells in use), then `done`.

        Close it (`contextlib.aclosing`) rather than drop it: a consumer that leaves early
        has the rest of the reply stopped and read here, or the next operation would read
        it as its own."""
        self._send("generate", **params)
        ended = False
        try:
            while True:
                try:
                    frame = await self._next()
                except (InferenceError, InferenceCrashed):
                    ended = True  # the child ended the operation, or died
                    raise
                if frame.get("op") == "done":
                    ended = True
                for event in self._events(frame):
                    yield event
                if ended:
                    return
        finally:
            if not ended:
                await self._abandon()

    @staticmethod
    def _events(frame: dict[str, Any]) -> list[dict[str, Any]]:
        if frame.get("op") == "tokens":
            n_ctx = frame["n_ctx"]
            return [
                {"op": "token", "text": text, "id": token_id, "kv_used": kv_used, "n_ctx": n_ctx}
                for text, token_id, kv_used in frame["items"]
            ]
        return [frame]

    async def _abandon(self) -> None:
        """A generation's consumer left before `done`: stop the reply and read its frames to
        the end, so the child and this side agree again; kill the child if it will not stop
        (llama.cpp waiting on a worker that stopped answering)."""
        if self._dead is not None or self.proc is None or self.proc.returncode is not None:
            return
        self.cancel()
        try:
            async with asyncio.timeout(STOP_GRACE):
                while (await self._next()).get("op") != "done":
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

    def cancel(self) -> None:
        if self._dead is None and self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode_frame({"op": "cancel"}))

    async def close(self) -> None:
        """Ask the child to exit; kill it if it does not within 3 s."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self._send("exit")
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
