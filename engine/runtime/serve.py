"""An OpenAI-compatible HTTP endpoint for the loaded model, for other tools.

`GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions` (streamed as
server-sent events, or whole; every field honoured or refused by name: openai_api),
`GET /metrics` (Prometheus text) and `GET /health` (no key: for supervisors). Web pages may
call it only from the origins `--cors` names.
Plain asyncio on the engine's loop; up to the model's slots (`--parallel`) replies at once,
decoded together (a token of each per llama.cpp step, each slot with its own share of the
KV cache), later requests wait in a queue; bound to 127.0.0.1 unless told otherwise; an
optional API key (Bearer).

A reply never ends looking complete when it is not: a failure after the stream began is an
OpenAI-style error event (`data: {"error": …}`, which the SDKs raise) and the stream ends
without `[DONE]`. When the model is lost (a worker or an agent died, a reply stalled) it is
loaded again on what answers (`ChatSession.recover`) while later requests wait; a client
that hangs up has its reply stopped; at most `queue` requests wait, and none runs past its
`deadline`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import contextvars
import dataclasses
import json
import logging
import secrets
import struct
import time
from collections.abc import Callable
from typing import Any

from corral.engine.aio import within

from .childproto import Done, Token
from .errors import FieldRefused, InferenceCrashed, PromptTooLong, RuntimeFailure
from .openai_api import (
    ApiError,
    ChatRequest,
    StopWatch,
    chat_request,
    completion_request,
    embedding_request,
)
from .openai_tools import parse_reply
from .session import ChatSession

log = logging.getLogger(__name__)

_MAX_HEAD = 64 * 1024
_MAX_BODY = 4 * 1024 * 1024  # a long chat history, not a file upload
_REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    403: "Forbidden",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_PATHS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/metrics")
QUEUE = 32  # requests that may wait for the model at once; more get 429
DEADLINE = 600.0  # seconds a request may wait and run in all
HEAD_WAIT = 0.5  # a stream's head waits this long for the prompt to be accepted
_RECOVER_AGAIN = 10.0  # a model that could not be loaded again is retried this often at most


class _HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class ApiServer:
    def __init__(
        self,
        session: ChatSession,
        model_id: str,
        api_key: str | None = None,
        queue: int = QUEUE,
        deadline: float = DEADLINE,
        cors: tuple[str, ...] = (),
        slots: int = 0,
    ):
        """`slots`: replies at once (default: every slot of the loaded model; the window
        keeps one for its own chat)."""
        self.session = session
        self.model_id = model_id
        self.api_key = api_key
        self.queue, self.deadline = queue, deadline
        self.cors = cors  # browser origins allowed ("*": any); none by default
        # a reply holds one of the model's slots; healing the model holds them all
        self._n_slots = max(1, slots or session.slots)
        self._slots = asyncio.Semaphore(self._n_slots)
        self._healthy = asyncio.Event()  # clear while the model is being loaded again
        self._healthy.set()
        self._ready_lock = asyncio.Lock()  # one request at a time retries a lost model
        self._running = 0  # replies holding a slot
        self.slot_kv: dict[int, tuple[int, int]] = {}  # slot: (cells in use, its cells)
        self.busy_slots: set[int] = set()  # slots a reply is being written in
        self._server: asyncio.Server | None = None
        self._waiting = 0
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False
        self._broken = ""  # why the model is not loaded and could not be loaded again
        self._broken_at = 0.0
        self._healing: asyncio.Task[None] | None = None
        self.events: list[str] = []  # what happened to the model, one line each (and logged)
        self.counts: collections.Counter[str] = collections.Counter()  # for /metrics
        # called with each finished reply (after its slot's KV use was noted): the terminal's
        # per-reply line in corral serve
        self.on_reply: Callable[[Done], None] | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 8080) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening; requests in flight end with an error saying so (a stream gets an
        error event, not a second HTTP response inside its body)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2)
        if self._healing is not None:
            self._healing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._healing
        if self._server is not None:
            with contextlib.suppress(Exception):
                await within(self._server.wait_closed(), 2)

    def _say(self, line: str) -> None:
        self.events.append(line)
        log.warning("%s", line)

    # ------------------------------------------------------------------ HTTP

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        answered = [False]  # a response (or a stream's head) has been written
        try:
            method, path, headers, body = await self._read_request(reader)
            if self._browser(method, headers):
                await self._preflight(writer)
                return
            await self._route(method, path, headers, body, reader, writer, answered)
        except _HttpError as exc:
            await self._json(
                writer, exc.status, {"error": {"message": exc.message, "type": exc.kind}}
            )
        except ApiError as exc:  # a field refused, named (openai_api)
            await self._json(writer, exc.status, exc.body())
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # shutting down: say so where nothing was sent yet
            if not answered[0]:
                with contextlib.suppress(Exception):
                    await self._json(writer, 503, _error("corral serve is shutting down"))
        except RuntimeFailure as exc:
            if not answered[0]:
                await self._json(writer, 503, _error(str(exc)))
        except Exception:  # a bug: answer 500, keep serving
            log.exception("internal error in the HTTP API")
            if not answered[0]:
                with contextlib.suppress(Exception):
                    await self._json(writer, 500, _error("internal error"))
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _read_request(
        self, reader: asyncio.StreamReader
    ) -> tuple[str, str, dict[str, str], bytes]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _HttpError(413, "request headers too large") from None
        if len(head) > _MAX_HEAD:
            raise _HttpError(413, "request headers too large")
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _ = lines[0].split(" ", 2)
        except ValueError:
            raise _HttpError(400, "malformed request line") from None
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        raw = headers.get("content-length", "0") or "0"
        if not raw.isdigit():
            raise _HttpError(400, f"Content-Length {raw!r}: give the body's size in bytes")
        if headers.get("transfer-encoding", "").lower() not in ("", "identity"):
            raise _HttpError(
                400,
                f"Transfer-Encoding {headers['transfer-encoding']!r}: send the body with a "
                "Content-Length",
            )
        length = int(raw)
        if length > _MAX_BODY:
            raise _HttpError(413, f"request body over {_MAX_BODY} bytes")
        body = await reader.readexactly(length) if length else b""
        return method, target.split("?", 1)[0], headers, body

    def _authorized(self, headers: dict[str, str]) -> bool:
        if not self.api_key:
            return True
        given = headers.get("authorization", "")
        return secrets.compare_digest(given, f"Bearer {self.api_key}")

    async def _route(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        answered: list[bool],
    ) -> None:
        if path == "/health":  # for load balancers and supervisors: no key needed
            if method != "GET":
                raise _HttpError(405, "use GET")
            ok = not self._broken and self.session.result is not None
            why = self._broken or ("" if ok else "the model is being loaded again")
            await self._json(
                writer,
                200 if ok else 503,
                {"status": "ok" if ok else "error"} | ({"message": why} if why else {}),
            )
            return
        if not self._authorized(headers):
            raise _HttpError(401, "missing or wrong API key", "authentication_error")
        self.counts[f'requests_total{{path="{path if path in _PATHS else "other"}"}}'] += 1
        if path == "/metrics":
            if method != "GET":
                raise _HttpError(405, "use GET")
            await _respond(
                writer, 200, self.metrics().encode(), b"Content-Type: text/plain; version=0.0.4\r\n"
            )
        elif path == f"/v1/models/{self.model_id}":
            if method != "GET":
                raise _HttpError(405, "use GET")
            await self._json(writer, 200, self._model())
        elif path.startswith("/v1/models/"):
            raise ApiError(
                404,
                f"model {path.removeprefix('/v1/models/')!r} is not served here; this server "
                f"serves {self.model_id!r}",
                "model",
                "model_not_found",
            )
        elif path == "/v1/models":
            if method != "GET":
                raise _HttpError(405, "use GET")
            await self._json(
                writer,
                200,
                {
                    "object": "list",
                    "data": [self._model()],
                },
            )
        elif path == "/v1/chat/completions":
            if method != "POST":
                raise _HttpError(405, "use POST")
            # ApiError: a 400 naming the field
            await self._chat(chat_request(json_body(body), self.model_id), reader, writer, answered)
        elif path == "/v1/embeddings":
            if method != "POST":
                raise _HttpError(405, "use POST")
            await self._embeddings(json_body(body), writer)
        elif path == "/v1/completions":
            if method != "POST":
                raise _HttpError(405, "use POST")
            asked = completion_request(json_body(body), self.model_id)
            await self._chat(asked, reader, writer, answered)
        else:
            raise _HttpError(404, f"no route {path}")

    def _browser(self, method: str, headers: dict[str, str]) -> bool:
        """A request from a web page (it sends Origin): allowed only from the origins
        `--cors` names, since any page the user opens could otherwise use (and read) a
        local API without a key. True for a preflight to answer."""
        origin = headers.get("origin", "")
        if not origin:
            return False
        if origin not in self.cors and "*" not in self.cors:
            raise _HttpError(
                403,
                f"requests from web pages at {origin} are not allowed: start corral serve "
                f"with --cors {origin}",
                "permission_error",
            )
        _ORIGIN.set(origin)
        return method == "OPTIONS"

    async def _preflight(self, writer: asyncio.StreamWriter) -> None:
        await _respond(
            writer,
            204,
            b"",
            b"Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n"
            b"Access-Control-Allow-Headers: Authorization, Content-Type\r\n"
            b"Access-Control-Max-Age: 600\r\n",
        )

    def _model(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": 0, "owned_by": "corral"}

    def metrics(self) -> str:
        """Prometheus text: requests, replies, tokens, errors, the queue, the model's state."""
        result = self.session.result
        gauges = {
            "requests_waiting": self._waiting,
            "queue_limit": self.queue,
            "model_loaded": int(result is not None and not self._broken),
            "context_size": result.n_ctx if result is not None else 0,
            "reloads_total": len(self.events),
            "slots": self._n_slots,
            "replies_running": self._running,
        }
        for slot, (used, cells) in sorted(self.slot_kv.items()):
            gauges[f'slot_kv_used{{slot="{slot}"}}'] = used
            gauges[f'slot_kv_cells{{slot="{slot}"}}'] = cells
        lines = []
        for name, value in sorted({**dict(self.counts), **gauges}.items()):
            base = name.split("{")[0]
            kind = "counter" if base.endswith("_total") else "gauge"
            lines.append(f"# TYPE corral_{base} {kind}")
            lines.append(f"corral_{name} {value}")
        return "\n".join(dict.fromkeys(lines)) + "\n"

    def _count(self, done: Any) -> None:
        """A finished reply's tokens, for /metrics."""
        self.counts["prompt_tokens_total"] += done.prompt_tokens
        self.counts["completion_tokens_total"] += done.n_tokens
        self.counts["replies_total"] += 1
        if self.on_reply is not None:
            self.on_reply(done)

    def slots_line(self) -> str:
        """Each slot's KV use, as the terminal shows it: "slot 0 230/4096 writing · slot 1
        37/4096" ("writing": a reply is coming from it)."""
        cells = next(iter(self.slot_kv.values()), (0, 0))[1]
        parts = []
        for slot in range(self.session.slots):
            used, n = self.slot_kv.get(slot, (0, cells))
            state = " writing" if slot in self.busy_slots else ""
            parts.append(f"slot {slot} {used}/{n}{state}" if n else f"slot {slot} empty")
        return " · ".join(parts)

    async def _json(self, writer: asyncio.StreamWriter, status: int, obj: Any) -> None:
        if status >= 400:
            self.counts[f'errors_total{{status="{status}"}}'] += 1
        await _respond(writer, status, json.dumps(obj).encode(), _JSON)

    # ------------------------------------------------------------------ chat

    async def _chat(
        self,
        asked: ChatRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        answered: list[bool],
    ) -> None:
        """A chat or text completion: queued for a slot, then streamed or sent whole."""
        prefix = "cmpl" if asked.prompt is not None else "chatcmpl"
        ident = f"{prefix}-{secrets.token_hex(12)}"
        created = int(time.time())
        if self._waiting >= self.queue:
            raise _HttpError(
                429,
                f"{self._waiting} requests are already waiting for the model (the queue holds "
                f"{self.queue}); try again shortly",
                "rate_limit_error",
            )
        self._waiting += 1
        queued = True
        try:
            async with asyncio.timeout(self.deadline):
                await self._take_slot()
                self._waiting -= 1
                queued = False
                self._running += 1
                try:
                    async with self._ready_lock:
                        await self._ready()
                    if asked.stream:
                        await self._stream(asked, writer, ident, created, answered)
                    else:
                        await self._whole(asked, reader, writer, ident, created)
                finally:
                    self._running -= 1
                    self._slots.release()
        except TimeoutError:
            if answered[0]:
                return  # the stream said so in an error event
            raise _HttpError(
                504,
                f"the request passed its deadline of {self.deadline:g} s (corral serve "
                "--deadline) waiting for the model or generating",
                "timeout_error",
            ) from None
        finally:
            if queued:
                self._waiting -= 1

    async def _ready(self) -> None:
        """Under _ready_lock: a model that was lost and could not be loaded again is tried
        again (at most every _RECOVER_AGAIN s); RuntimeFailure says why it is not there."""
        if not self._broken:
            return
        if time.monotonic() - self._broken_at < _RECOVER_AGAIN:
            raise RuntimeFailure(self._broken)
        try:
            self._say(await self.session.recover("the model was not loaded"))
        except RuntimeFailure as exc:
            self._broken, self._broken_at = f"the model is not loaded: {exc}", time.monotonic()
            raise RuntimeFailure(self._broken) from None
        self._broken = ""

    async def _embeddings(self, req: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        """Vectors of the texts, by the served model (mean of its last layer, or its own
        pooling), each of length 1; they wait for a slot like a reply."""
        spec = self.session.spec
        asked = embedding_request(req, self.model_id, spec.n_embd if spec else 0)
        await self._take_slot()
        try:
            async with self._ready_lock:
                await self._ready()
            try:
                got = await self.session.embed(list(asked.texts))
            except FieldRefused as exc:
                raise ApiError(400, str(exc), exc.param) from None
        finally:
            self._slots.release()
        data = []
        for i, vector in enumerate(got.vectors):
            value: Any = list(vector)
            if asked.base64:
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        usage = {"prompt_tokens": got.n_tokens, "total_tokens": got.n_tokens}
        await self._json(
            writer, 200, {"object": "list", "data": data, "model": self.model_id, "usage": usage}
        )

    async def _take_slot(self) -> None:
        """One of the model's slots, once the model is not being loaded again."""
        while True:
            await self._healthy.wait()
            await self._slots.acquire()
            if self._healthy.is_set():
                return
            self._slots.release()

    def _lost(self, crash: InferenceCrashed) -> None:
        """The model went down with a request: load it again while later requests wait
        (the other replies it took down heard the crash too: one reload heals them all)."""
        self._say(f"lost the model: {crash}")
        if self._closing or (self._healing is not None and not self._healing.done()):
            return
        self._healthy.clear()  # no reply starts until the model is back

        async def heal() -> None:
            # every slot: the replies that were running when it died end first
            for _ in range(self._n_slots):
                await self._slots.acquire()
            try:
                self._say(await self.session.recover(crash.cause))
                self._broken = ""
            except RuntimeFailure as exc:
                self._broken = f"the model is not loaded: {exc}"
                self._broken_at = time.monotonic()
                self._say(self._broken)
            finally:
                for _ in range(self._n_slots):
                    self._slots.release()
                self._healthy.set()

        self._healing = asyncio.get_running_loop().create_task(heal())

    async def _whole(
        self,
        asked: ChatRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ident: str,
        created: int,
    ) -> None:
        """A reply sent whole (its `n` choices one after another); stopped when the client
        hangs up before it is ready."""
        choices: list[_Choice] = []

        async def generate() -> None:
            for i in range(asked.n):
                choice = _Choice(StopWatch(asked.stop))
                meter = self.session.reply_meter()
                async with contextlib.aclosing(self._frames(asked, i)) as frames:
                    async for frame in frames:
                        update = meter.feed(frame)
                        choice.text.append(self._watched(choice.watch, update.text))
                        if asked.logprobs and isinstance(frame, Token):
                            choice.logprobs.append(_logprob(frame))
                choice.text.append(choice.watch.flush())
                choice.done = meter.finished()
                self._count(choice.done)
                choices.append(choice)

        reply = asyncio.ensure_future(generate())
        hangup = asyncio.ensure_future(reader.read(1))  # b"": the client went away
        try:
            while True:
                await asyncio.wait({reply, hangup}, return_when=asyncio.FIRST_COMPLETED)
                if reply.done():
                    break
                if hangup.result() == b"":
                    log.warning("a client left before its reply: the reply is stopped")
                    reply.cancel()  # closing the reply stops it in the inference process
                    with contextlib.suppress(asyncio.CancelledError):
                        await reply
                    return
                hangup = asyncio.ensure_future(reader.read(1))
        finally:
            hangup.cancel()
            if not reply.done():
                reply.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reply
        try:
            reply.result()
        except InferenceCrashed as crash:
            self._lost(crash)
            raise
        except PromptTooLong as exc:
            raise _too_long(exc) from None
        except FieldRefused as exc:
            raise ApiError(400, str(exc), exc.param) from None
        usage = _usage_of([c.done for c in choices if c.done is not None])
        text = asked.prompt is not None
        await self._json(
            writer,
            200,
            {
                "id": ident,
                "object": "text_completion" if text else "chat.completion",
                "created": created,
                "model": self.model_id,
                "choices": [
                    c.text_choice(i, asked) if text else c.message(i, asked)
                    for i, c in enumerate(choices)
                ],
                "usage": usage,
            },
        )

    async def _stream(
        self,
        asked: ChatRequest,
        writer: asyncio.StreamWriter,
        ident: str,
        created: int,
        answered: list[bool],
    ) -> None:
        text_kind = asked.prompt is not None

        def head() -> None:
            """The stream's head, once: at its first event, HEAD_WAIT s after the model
            took the request, or at a failure, whichever comes first (a prompt too long for
            the context, refused as soon as it is tokenized, is a 400 instead)."""
            if answered[0]:
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                + _cors_headers()
                + b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
            )
            answered[0] = True
            for i in range(asked.n):
                if not text_kind:
                    writer.write(chunk({"role": "assistant", "content": ""}, index=i))
                elif asked.echo:
                    writer.write(chunk({"content": asked.prompt or ""}, index=i))

        def chunk(
            delta: dict[str, Any] | None,
            finish: str | None = None,
            usage: Any = None,
            index: int = 0,
            logprobs: Any = None,
        ) -> bytes:
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
            if asked.logprobs:
                choice["logprobs"] = logprobs
            if text_kind and delta is not None:  # /v1/completions' chunk: text, legacy logprobs
                entries = (logprobs or {}).get("content", [])
                choice = {
                    "text": delta.get("content", ""),
                    "index": index,
                    "logprobs": _legacy_logprobs(entries) if asked.logprobs else None,
                    "finish_reason": finish,
                }
            obj: dict[str, Any] = {
                "id": ident,
                "object": "text_completion" if text_kind else "chat.completion.chunk",
                "created": created,
                "model": self.model_id,
                "choices": [] if delta is None else [choice],
            }
            if asked.include_usage:  # null on every chunk but the last, as OpenAI sends it
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n".encode()

        async def fail(message: str) -> None:
            """An error event (the OpenAI SDKs raise it) and the end of the stream: no
            finish_reason, no [DONE]."""
            head()
            writer.write(f"data: {json.dumps(_error(message))}\n\n".encode())
            with contextlib.suppress(Exception):
                await within(writer.drain(), 2)

        stops: list[str] = []
        dones: list[Done] = []
        timer = asyncio.get_running_loop().call_later(HEAD_WAIT, head)
        try:
            for i in range(asked.n):
                stop, meter, watch = "stop", self.session.reply_meter(), StopWatch(asked.stop)
                said: list[str] = []  # with tools: the JSON, parsed once it is whole
                # closed on the way out: a client that hangs up has the rest stopped
                async with contextlib.aclosing(self._frames(asked, i)) as frames:
                    async for frame in frames:
                        head()
                        update = meter.feed(frame)
                        text = self._watched(watch, update.text)
                        if update.stop is not None:
                            text += watch.flush()
                            stop = "stop" if watch.stopped else _finish(update.stop)
                        probs = None
                        if asked.logprobs and isinstance(frame, Token):
                            probs = {"content": [_logprob(frame)]}
                        if asked.tools is not None:
                            said.append(text)
                        elif text or probs:
                            writer.write(chunk({"content": text}, index=i, logprobs=probs))
                            await writer.drain()
                if asked.tools is not None:
                    content, calls = parse_reply("".join(said))
                    if calls:
                        stop = "tool_calls"
                        delta: dict[str, Any] = {
                            "tool_calls": [dict(call, index=k) for k, call in enumerate(calls)]
                        }
                    else:
                        delta = {"content": content or ""}
                    head()
                    writer.write(chunk(delta, index=i))
                stops.append(stop)
                dones.append(meter.finished())
                self._count(dones[-1])
        except asyncio.CancelledError:
            await fail(
                "corral serve is shutting down"
                if self._closing
                else f"the reply passed its deadline of {self.deadline:g} s (corral serve "
                "--deadline)"
            )
            raise
        except InferenceCrashed as crash:
            await fail(f"the reply was cut short: {crash}; the model is being loaded again")
            self._lost(crash)
            return
        except FieldRefused as exc:
            if not answered[0]:
                raise ApiError(400, str(exc), exc.param) from None
            await fail(str(exc))
            return
        except RuntimeFailure as exc:
            if isinstance(exc, PromptTooLong) and not answered[0]:
                raise _too_long(exc) from None
            await fail(f"the reply was cut short: {exc}")
            return
        finally:
            timer.cancel()
        head()
        for i, stop in enumerate(stops):
            writer.write(chunk({}, stop, index=i))
        if asked.include_usage:
            writer.write(chunk(None, usage=_usage_of(dones)))
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()

    async def _frames(self, asked: ChatRequest, choice: int = 0) -> Any:
        """The reply's events (choice `choice` of `n`: its own seed, where one was given);
        each slot's cache use is kept for /metrics. An API reply never shifts the context:
        at a full slot it ends with finish_reason "length" (the client keeps the history)."""
        sampling = dict(asked.sampling, context_shift=False)
        if choice and "seed" in sampling:
            sampling["seed"] += choice
        if asked.prompt is not None:
            sampling["prompt"] = asked.prompt
        async with contextlib.aclosing(
            self.session.complete(list(asked.messages), **sampling)
        ) as frames:
            slot = -1
            try:
                async for frame in frames:
                    if isinstance(frame, Token | Done):
                        slot = frame.slot
                        self.slot_kv[slot] = (frame.kv_used, frame.n_ctx)
                        if isinstance(frame, Token):
                            self.busy_slots.add(slot)
                        else:
                            self.busy_slots.discard(slot)
                    yield frame
            finally:
                self.busy_slots.discard(slot)

    def _watched(self, watch: StopWatch, text: str) -> str:
        """`text` less what a stop string holds back; at a stop string the reply is
        stopped (its last events are still read, for the summary)."""
        if not text:
            return ""
        stopped = watch.stopped
        out = watch.feed(text)
        if watch.stopped and not stopped:
            self.session.cancel()
        return out


_ORIGIN: contextvars.ContextVar[str] = contextvars.ContextVar("origin", default="")
_JSON = b"Content-Type: application/json\r\n"


async def _respond(writer: asyncio.StreamWriter, status: int, data: bytes, headers: bytes) -> None:
    """A whole response: the status line, `headers`, this request's CORS headers, the body."""
    writer.write(
        f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n".encode()
        + headers
        + _cors_headers()
        + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()


def _cors_headers() -> bytes:
    """The CORS headers for this request's allowed Origin (each connection is a task with
    its own context), or none."""
    origin = _ORIGIN.get()
    if not origin:
        return b""
    return f"Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n".encode()


def _too_long(exc: PromptTooLong) -> ApiError:
    """The child's refusal of a prompt longer than the context, as OpenAI's 400 (a 503
    made the SDKs retry what can never succeed)."""
    text = str(exc).replace("load with a larger --ctx", "load the model with a larger --ctx")
    return ApiError(400, text, "messages", "context_length_exceeded")


def _usage(done: Done) -> dict[str, int]:
    return _usage_of([done])


def _usage_of(dones: list[Done]) -> dict[str, int]:
    """Tokens of a request's choices: the prompt counted once, as OpenAI does."""
    prompt = dones[0].prompt_tokens if dones else 0
    completion = sum(d.n_tokens for d in dones)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _legacy_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """/v1/completions' logprobs: parallel lists, and the text offset of each token."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


def _logprob(token: Token) -> dict[str, Any]:
    """One token's entry in OpenAI's logprobs.content."""

    def entry(text: str, value: float) -> dict[str, Any]:
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return {
        **entry(token.text, token.logprob),
        "top_logprobs": [entry(text, value) for _, text, value in token.top],
    }


@dataclasses.dataclass
class _Choice:
    """One choice of a whole reply as it is generated."""

    watch: StopWatch
    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    done: Done | None = None

    def message(self, index: int, asked: ChatRequest) -> dict[str, Any]:
        assert self.done is not None
        content: str | None = "".join(self.text)
        finish = "stop" if self.watch.stopped else _finish(self.done.stop)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if asked.tools is not None:
            content, calls = parse_reply(content or "")
            message["content"] = content
            if calls:
                message["tool_calls"] = calls
                finish = "tool_calls"
        return {
            "index": index,
            "finish_reason": finish,
            "message": message,
            "logprobs": {"content": self.logprobs} if asked.logprobs else None,
        }

    def text_choice(self, index: int, asked: ChatRequest) -> dict[str, Any]:
        """The choice as /v1/completions gives it (legacy logprobs)."""
        assert self.done is not None and asked.prompt is not None
        head = asked.prompt if asked.echo else ""
        return {
            "text": head + "".join(self.text),
            "index": index,
            "logprobs": _legacy_logprobs(self.logprobs, len(head)) if asked.logprobs else None,
            "finish_reason": "stop" if self.watch.stopped else _finish(self.done.stop),
        }


def _error(message: str, kind: str = "server_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


def _finish(stop: str) -> str:
    return "length" if stop in ("length", "context_full") else "stop"


def json_body(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body or b"{}")
    except ValueError:
        raise _HttpError(400, "the body is not JSON") from None
    if not isinstance(obj, dict):
        raise _HttpError(400, "the body must be a JSON object")
    return obj
