"""The inference child process: llama-cpp-python with RPC devices, driven over a socket.

llama.cpp aborts the whole process when an RPC server dies or a kernel is missing, so it runs
here and nowhere near the GUI or the agent. The parent passes one end of a socketpair (--fd);
the messages each way are engine.runtime.childproto's typed ones (its docstring lists them
and which reply each request gets).

stdout and stderr carry llama.cpp's log; the parent keeps the tail for crash reports.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import ctypes
import faulthandler
import os
import queue
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from corral.engine.procs import die_with_parent
from corral.engine.protocol import FrameDecoder, Message, ProtocolError, encode_frame, to_wire

from .childproto import (
    CHILD_MESSAGES,
    PROMPT_TOO_LONG,
    Answers,
    Cancel,
    Capabilities,
    Done,
    DryRun,
    DryRunReport,
    Exit,
    Failed,
    Generate,
    Load,
    Loaded,
    LoadLog,
    LoadParams,
    Progress,
    Ready,
    Shift,
    TokenItem,
    Tokens,
)

_FLUSH_S = 0.03  # at most ~33 token frames a second: smooth to read, cheap to receive


class _Channel:
    """Blocking frame I/O on the socket; a reader thread queues frames and flags cancel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # requests in order; a ProtocolError for a frame that was not one (answered Failed)
        self.inbox: queue.Queue[Message | ProtocolError | None] = queue.Queue()
        self.cancel = threading.Event()
        threading.Thread(target=self._read, name="child-reader", daemon=True).start()

    def _read(self) -> None:
        decoder = FrameDecoder()
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                for frame in decoder.feed(data):
                    try:
                        msg = CHILD_MESSAGES.from_wire(frame)
                    except ProtocolError as exc:
                        self.inbox.put(exc)
                        continue
                    if isinstance(msg, Cancel):
                        self.cancel.set()
                    else:
                        self.inbox.put(msg)
        except Exception:  # the parent went away or sent garbage: either way we are done
            pass
        self.cancel.set()  # stop a generation nobody will read
        self.inbox.put(None)

    def send(self, msg: Message) -> None:
        self.sock.sendall(encode_frame(to_wire(msg)))


class _Engine:
    """One loaded model and the tokens its KV cache holds (sequence 0)."""

    def __init__(self, chan: _Channel) -> None:
        import llama_cpp

        self.L = llama_cpp
        self.chan = chan
        self.llm: Any = None
        self.tokens: list[int] = []  # what the KV cache holds, in order
        self.registered: list[str] = []  # RPC endpoints this process's ggml knows
        self.shifts = 0  # context shifts since the model was loaded
        self.swa_full = True  # sliding-window layers keep the whole context (else the window)
        self.n_ctx = 0
        self.cpu_kernels: Any = None  # CpuKernels: the self-test's verdict, once asked

    # ------------------------------------------------------------------ load

    def _register(self, endpoints: list[str]) -> None:
        from corral.engine.ggml import add_rpc_server

        for endpoint in endpoints:
            # registering an endpoint twice would list its devices twice
            if endpoint not in self.registered:
                add_rpc_server(endpoint)
                self.registered.append(endpoint)

    def load(self, params: LoadParams, capture: Any) -> None:
        self._register(list(params.rpc))
        self.swa_full = params.swa_full
        kernels = self._cpu_kernels()
        mark = capture.count
        t0 = time.perf_counter()
        with self._model_params(kernels.extra_buffers):
            self._construct(params)
        load_s = time.perf_counter() - t0
        self.n_ctx = int(self.L.llama_n_ctx(self.llm.ctx))
        self.tokens = []
        from corral.engine.ggml import parse_load_log

        self.chan.send(
            Loaded(
                log=self._load_log(parse_load_log(capture.since(mark)), self.n_ctx),
                n_layer=int(self.L.llama_model_n_layer(self.llm.model)),
                n_vocab=int(self.llm.n_vocab()),
                load_s=load_s,
                cpu_kernels=kernels,
            )
        )

    @staticmethod
    def _load_log(report: Any, n_ctx: int) -> LoadLog:
        """What llama.cpp logged (a parsed LoadReport), with the devices it sees now."""
        from corral.engine.ggml import list_devices

        return LoadLog(
            devices=tuple(list_devices()),
            layers={str(k): v for k, v in report.layers.items()},
            buffers=report.buffers,
            n_ctx=n_ctx,
        )

    def _cpu_kernels(self) -> Any:
        """Whether llama.cpp may put CPU weights in its extra buffers (AMX, CPU_REPACK) here:
        the CPU-kernel self-test's verdict for this build and CPU (run once if not cached)."""
        if self.cpu_kernels is None:
            from corral.engine.ggml.kernelcheck import extra_buffers_setting

            self.cpu_kernels = extra_buffers_setting()
        return self.cpu_kernels

    @contextlib.contextmanager
    def _model_params(self, extra_buffers: bool) -> Iterator[None]:
        """Llama() takes no use_extra_bufts and no progress callback: set both in the model
        params it starts from. Progress goes out as `progress` frames (tensors read and
        uploaded to every device, RPC workers included), at most one per percent."""
        import llama_cpp.llama_cpp as low

        last = [-1]

        def report(fraction: float, _user: Any) -> bool:
            pct = int(fraction * 100)
            if pct != last[0]:
                last[0] = pct
                self.chan.send(Progress(float(fraction)))
            return True  # go on

        callback = low.llama_progress_callback(report)
        original = low.llama_model_default_params

        def params() -> Any:
            p = original()
            p.progress_callback = callback
            p.use_extra_bufts = extra_buffers
            # every tensor's data checked as it loads (NaN or infinity in a scale: a damaged
            # file), in llama.cpp's own threads: a few seconds on a large model, once
            p.check_tensors = True
            return p

        low.llama_model_default_params = params
        try:
            yield
        finally:
            low.llama_model_default_params = original

    def _construct(self, p: LoadParams) -> None:
        from corral.engine.planner.kvtypes import ggml_type

        threads = p.n_threads or (os.cpu_count() or 1)
        self.llm = self.L.Llama(
            model_path=p.model,
            n_gpu_layers=p.n_gpu_layers,
            tensor_split=list(p.tensor_split) or None,
            n_ctx=p.n_ctx,
            n_batch=p.n_batch,
            n_ubatch=p.n_ubatch,
            type_k=ggml_type(p.type_k),
            type_v=ggml_type(p.type_v),
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=p.flash_attn,
            swa_full=p.swa_full,
            verbose=True,  # verbose=False would point fds 1/2 at /dev/null during load
        )

    def dry_run(self, p: LoadParams, capture: Any) -> None:
        """llama.cpp's own allocation, simulated (no_alloc): layer map and buffer sizes.

        Nothing is allocated on any device, so this is safe to run before a load that would
        not fit; it does talk to the RPC workers (memory, alignment), so they must be up.
        """
        from corral.engine.planner.kvtypes import ggml_type

        L = self.L
        self._register(list(p.rpc))
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = p.n_gpu_layers
        if p.tensor_split:
            arr = (ctypes.c_float * L.LLAMA_MAX_DEVICES)(*p.tensor_split)
            mparams.tensor_split = arr
        mparams.no_alloc = True
        mparams.use_extra_bufts = self._cpu_kernels().extra_buffers  # as the load will
        mparams.load_mode = L.LLAMA_LOAD_MODE_NONE  # a mapped load asserts under no_alloc
        mark = capture.count
        model = L.llama_model_load_from_file(p.model.encode(), mparams)
        if not model:
            raise _Refused("llama.cpp could not read the model for the dry run")
        try:
            cparams = L.llama_context_default_params()
            cparams.n_ctx = p.n_ctx
            cparams.n_batch = p.n_batch
            cparams.n_ubatch = p.n_ubatch
            cparams.type_k = ggml_type(p.type_k)
            cparams.type_v = ggml_type(p.type_v)
            cparams.flash_attn_type = (
                L.LLAMA_FLASH_ATTN_TYPE_ENABLED
                if p.flash_attn
                else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            cparams.swa_full = p.swa_full
            ctx = L.llama_init_from_model(model, cparams)
            if not ctx:
                raise _Refused(
                    "llama.cpp refused this context (cache type, flash attention or size)"
                )
            L.llama_free(ctx)
            n_swa = int(L.llama_model_n_swa(model))
        finally:
            L.llama_model_free(model)
        from corral.engine.ggml import parse_load_log

        report = parse_load_log(capture.since(mark))
        self.chan.send(
            DryRunReport(
                log=self._load_log(report, p.n_ctx),
                swa_layers=tuple(report.swa),
                n_swa=n_swa,
                cpu_extra=self._cpu_kernels().factors,
            )
        )

    # ------------------------------------------------------------------ generate

    def _prompt_tokens(self, req: Generate, add_generation_prompt: bool = True) -> list[int]:
        if req.prompt is not None:
            return list(self.llm.tokenize(req.prompt.encode(), add_bos=True, special=True))
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        messages: list[Any] = [{"role": m.role, "content": m.content} for m in req.messages]
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return list(self.llm.tokenize(text.encode(), add_bos=True, special=True))
        model = self.llm._model
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(self.llm.token_eos()),
            bos_token=model.token_get_text(self.llm.token_bos()),
            add_generation_prompt=add_generation_prompt,
        )
        result = formatter(messages=messages)
        return list(
            self.llm.tokenize(
                result.prompt.encode(), add_bos=not result.added_special, special=True
            )
        )

    def _decode(
        self,
        tokens: list[int],
        n_batch: int,
        stop: threading.Event | None = None,
        progress: bool = False,
    ) -> None:
        """Decode `tokens` in batches of `n_batch`; a set `stop` ends it between batches (a
        long prompt on slow workers takes a while: a cancel need not wait for all of it).
        `progress`: a Progress frame after each batch, and Progress(1.0) at the end, so the
        parent's stall watch sees the prompt move."""
        L = self.L
        for i in range(0, len(tokens), n_batch):
            if stop is not None and stop.is_set():
                return
            chunk = tokens[i : i + n_batch]
            arr = (L.llama_token * len(chunk))(*chunk)
            rc = L.llama_decode(self.llm.ctx, L.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                raise _Refused(f"llama_decode returned {rc} (KV cache full or compute failed)")
            self.tokens.extend(chunk)
            if progress and i + n_batch < len(tokens):
                L.llama_synchronize(self.llm.ctx)
                self.chan.send(Progress((i + len(chunk)) / len(tokens)))
        if progress:
            L.llama_synchronize(self.llm.ctx)
            self.chan.send(Progress(1.0))

    def _sampler(self, req: Generate) -> Any:
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if req.temp <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(req.top_k))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(req.top_p, 1))
            if req.min_p > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(req.min_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(req.temp))
            seed = req.seed
            L.llama_sampler_chain_add(
                chain, L.llama_sampler_init_dist(seed if seed >= 0 else 0xFFFFFFFF)
            )
        return chain

    def _n_keep(self, req: Generate, prompt: list[int]) -> int:
        """Tokens a context shift keeps: --n-keep, or by default the system prompt."""
        if req.n_keep >= 0:
            return min(req.n_keep, self.n_ctx)
        if req.prompt is not None or not req.messages or req.messages[0].role != "system":
            return 0
        head = self._prompt_tokens(Generate(messages=req.messages[:1]), False)
        n = 0
        while n < min(len(head), len(prompt)) and head[n] == prompt[n]:
            n += 1
        return n

    def _shift(self, n_keep: int) -> None:
        """Drop half of what follows the kept prefix and slide the rest down (llama-server's
        n_discard), so the chat goes on past n_ctx; works over RPC buffers too."""
        L = self.L
        mem = L.llama_get_memory(self.llm.ctx)
        n_past = len(self.tokens)
        n_discard = (n_past - n_keep) // 2
        L.llama_memory_seq_rm(mem, 0, n_keep, n_keep + n_discard)
        L.llama_memory_seq_add(mem, 0, n_keep + n_discard, n_past, -n_discard)
        del self.tokens[n_keep : n_keep + n_discard]
        self.shifts += 1
        self.chan.send(Shift(n_keep, n_discard, self.shifts, len(self.tokens), self.n_ctx))

    def _reusable(self, keep: int) -> int:
        """How much of the cached prefix can be kept: with a windowed sliding-window cache,
        the cells the next token attends to (the window before `keep`) may be gone once the
        chat went further; then the prompt is read again from its start (as llama-server
        does), never decoded against a cache that lacks them."""
        n_swa = int(self.L.llama_model_n_swa(self.llm.model)) if not self.swa_full else 0
        if keep == 0 or n_swa <= 0:
            return keep
        oldest = int(self.L.llama_memory_seq_pos_min(self.L.llama_get_memory(self.llm.ctx), 0))
        return 0 if oldest > max(0, keep - n_swa) else keep

    def kv_used(self) -> int:
        mem = self.L.llama_get_memory(self.llm.ctx)
        return int(self.L.llama_memory_seq_pos_max(mem, 0)) + 1

    def generate(self, req: Generate) -> None:
        if self.llm is None:
            raise _Refused("no model is loaded")
        L = self.L
        ctx = self.llm.ctx
        vocab = L.llama_model_get_vocab(self.llm.model)
        prompt = self._prompt_tokens(req)
        n_keep = self._n_keep(req, prompt)
        can_shift = bool(L.llama_memory_can_shift(L.llama_get_memory(ctx)))
        if len(prompt) >= self.n_ctx:
            raise _Refused(
                f"the prompt is {len(prompt)} tokens, the context {self.n_ctx}: "
                "start a new chat or load with a larger --ctx",
                PROMPT_TOO_LONG,
            )
        # Reuse the cached prefix of the previous turn; decode at least one token for logits.
        keep = 0
        limit = min(len(self.tokens), len(prompt) - 1)
        while keep < limit and self.tokens[keep] == prompt[keep]:
            keep += 1
        keep = self._reusable(keep)
        L.llama_memory_seq_rm(L.llama_get_memory(ctx), 0, keep, -1)
        del self.tokens[keep:]
        n_batch = int(L.llama_n_batch(ctx))
        max_tokens, ignore_eos = req.max_tokens, req.ignore_eos
        self.chan.cancel.clear()
        t0 = time.perf_counter()
        self._decode(prompt[keep:], n_batch, self.chan.cancel, progress=True)
        t1 = time.perf_counter()
        sampler = self._sampler(req)
        # Greedy: the first largest logit, read in place (what llama.cpp's greedy sampler
        # picks, without building its candidate array: ~40 us a token on a 32k vocabulary,
        # 1 % of a token on a GPU)
        greedy = req.temp <= 0
        n_vocab = int(L.llama_vocab_n_tokens(vocab))
        # numpy only now, after llama.cpp's libraries: imported first, it made CUDA model
        # loads crash (SIGSEGV) in this process on an H200 (docs/GPU.md)
        import numpy as np

        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        buf = ctypes.create_string_buffer(256)
        one = (L.llama_token * 1)()  # reused: the per-token path allocates nothing in ctypes
        pieces: list[str] = []
        # Tokens go out in small batches: a frame per token wakes the parent for each one,
        # and on a small machine that wake-up competes with the compute threads.
        batch: list[TokenItem] = []
        flushed = 0.0  # the first token is sent at once
        stop = "length"
        n_gen = 0
        try:
            while n_gen < max_tokens:
                if self.chan.cancel.is_set():
                    stop = "cancelled"
                    break
                if greedy:
                    logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), (n_vocab,))
                    tok = int(logits.argmax())
                else:
                    tok = int(L.llama_sampler_sample(sampler, ctx, -1))
                if L.llama_vocab_is_eog(vocab, tok) and not ignore_eos:
                    stop = "eos"
                    break
                n = L.llama_token_to_piece(vocab, tok, buf, 256, 0, False)
                text = utf8.decode(ctypes.string_at(buf, max(n, 0)))
                if len(self.tokens) >= self.n_ctx:
                    if not can_shift or len(self.tokens) - n_keep < 2:
                        stop = "context_full"
                        break
                    if batch:
                        self.chan.send(Tokens(tuple(batch), self.n_ctx))
                        batch = []
                    self._shift(n_keep)
                one[0] = tok
                if L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) != 0:
                    raise _Refused("llama_decode failed during generation")
                self.tokens.append(tok)
                n_gen += 1
                pieces.append(text)
                batch.append(TokenItem(text, tok, len(self.tokens)))
                now = time.perf_counter()
                if now - flushed >= _FLUSH_S:
                    self.chan.send(Tokens(tuple(batch), self.n_ctx))
                    batch, flushed = [], now
        finally:
            L.llama_sampler_free(sampler)
            if batch:
                self.chan.send(Tokens(tuple(batch), self.n_ctx))
        L.llama_synchronize(ctx)
        t2 = time.perf_counter()
        tail = utf8.decode(b"", final=True)
        if tail:
            pieces.append(tail)
        self.chan.send(
            Done(
                content="".join(pieces),
                stop=stop,
                n_tokens=n_gen,
                prompt_tokens=len(prompt),
                cached_tokens=keep,
                shifts=self.shifts,
                n_keep=n_keep,
                kv_head=tuple(self.tokens[:n_keep]),
                kv_pos_min=int(L.llama_memory_seq_pos_min(L.llama_get_memory(ctx), 0)),
                kv_used=self.kv_used(),
                n_ctx=self.n_ctx,
                prompt_s=t1 - t0,
                gen_s=t2 - t1,
            )
        )


class _Refused(Exception):
    """A request this child cannot serve; reported to the parent, the child lives on.
    `reason`: Failed.reason, for a refusal the parent tells apart."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral-inference")
    parser.add_argument("--fd", type=int, required=True)
    opts = parser.parse_args(argv)
    die_with_parent()
    # A native crash (SIGSEGV, SIGILL in a kernel) prints the Python frame it happened under
    # to stderr, which the parent keeps: its message says loading vs computing a reply.
    faulthandler.enable()
    sock = socket.socket(fileno=opts.fd)
    chan = _Channel(sock)

    from corral.engine.ggml import GgmlError, LogCapture, build_info
    from corral.engine.planner.kvtypes import UnknownCacheType

    capture = LogCapture(mirror_fd=2)
    capture.install()
    engine = _Engine(chan)
    from corral.engine.ggml import list_devices

    chan.send(Ready(build=build_info(), pid=os.getpid(), devices=tuple(list_devices())))
    while True:
        req = chan.inbox.get()
        if req is None or isinstance(req, Exit):
            return 0
        mark = capture.count
        try:
            if isinstance(req, ProtocolError):
                raise _Refused(f"malformed request: {req}")
            if isinstance(req, Load):
                engine.load(req.params, capture)
            elif isinstance(req, DryRun):
                engine.dry_run(req.params, capture)
            elif isinstance(req, Capabilities):
                from corral.engine.ggml.capabilities import Question, ask
                from corral.engine.planner.kvtypes import ggml_type

                qs = [
                    Question(ggml_type(q.type_k), ggml_type(q.type_v), q.head_dim, q.flash_attn)
                    for q in req.questions
                ]
                chan.send(Answers(tuple(ask(req.device, qs))))
            elif isinstance(req, Generate):
                engine.generate(req)
            else:
                raise _Refused(f"{type(req).__name__} is not a request")
        except _Refused as exc:
            chan.send(Failed(str(exc), exc.reason))
        except (GgmlError, UnknownCacheType) as exc:
            chan.send(Failed(str(exc)))
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file" etc.
            hint = ""
            if isinstance(req, Load):
                hint = load_failure(capture.since(mark)) or (
                    ": the file may be truncated or damaged (download it again), or use a "
                    "model architecture this llama.cpp build supports"
                )
            chan.send(Failed(f"{exc}{hint}"))


def load_failure(lines: list[str]) -> str:
    """Why llama.cpp refused a load, from its log: a tensor whose data failed its check
    (check_tensors: NaN or infinity, a damaged file), else its own 'error loading model'."""
    for line in reversed(lines):
        found = re.search(r"tensor '([^']+)' has invalid data", line)
        if found:
            return (
                f": the model file is damaged: tensor {found.group(1)} holds NaN or infinity "
                "(llama.cpp checks every tensor as it loads); download it again, or compare "
                "its sha256 with the publisher's"
            )
    for line in reversed(lines):
        if "error loading model:" in line:
            return f": llama.cpp says {line.split('error loading model:', 1)[1].strip()}"
    return ""


if __name__ == "__main__":
    sys.exit(main())
