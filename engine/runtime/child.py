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
import dataclasses
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

from corral.engine.procs import die_with_parent, usable_cores
from corral.engine.protocol import FrameDecoder, Message, ProtocolError, encode_frame, to_wire

from .childproto import (
    BAD_FIELD,
    BUSY,
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
    StepTimes,
    TimeSteps,
    TokenItem,
    Tokens,
)

_FLUSH_S = 0.03  # at most ~33 token frames a second: smooth to read, cheap to receive
# A long prompt is read in chunks of about CHUNK_STEPS single-token steps' time, so a request
# that comes while it is read waits about half of one chunk for its turn. The chunk's size
# follows the time the last chunks took (read after llama_synchronize: a decode over RPC
# returns before the workers finish), since what a step costs grows with the depth the
# prompt has reached; it starts at UNTIMED_CHUNK and stays within MIN_CHUNK (below it a step
# is mostly fixed cost) and n_batch. A prompt of at most SHORT_PROMPT tokens that has just
# come is read first, whole.
CHUNK_STEPS = 3.0
MIN_CHUNK = 32
UNTIMED_CHUNK = 64
SHORT_PROMPT = 256


class _Channel:
    """Blocking frame I/O on the socket; a reader thread queues frames and flags cancel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # requests in order (Cancel too, seen between steps); a ProtocolError for a frame
        # that was not one (answered Failed)
        self.inbox: queue.Queue[Message | ProtocolError | None] = queue.Queue()
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
                    self.inbox.put(msg)
        except Exception:  # the parent went away or sent garbage: either way we are done
            pass
        self.inbox.put(None)  # the parent is gone: stop whatever runs

    def send(self, msg: Message) -> None:
        self.sock.sendall(encode_frame(to_wire(msg)))


class _Discard(_Channel):
    """A channel that sends nowhere: the frames of a reply only timed (TimeSteps)."""

    def __init__(self) -> None:  # no socket, no reader
        pass

    def send(self, msg: Message) -> None:
        pass


class _Engine:
    """One loaded model and the tokens its KV cache holds (sequence 0)."""

    def __init__(self, chan: _Channel) -> None:
        import llama_cpp

        self.L = llama_cpp
        self.chan = chan
        self.llm: Any = None
        self.registered: list[str] = []  # RPC endpoints this process's ggml knows
        self.swa_full = True  # sliding-window layers keep the whole context (else the window)
        self.n_ctx = 0
        self.n_ctx_seq = 0  # each slot's share of the context
        self.n_batch = 0
        self.slots: list[_Slot] = []  # one per sequence (LoadParams.n_seq)
        self.jobs: list[_Job] = []  # requests in their slots, in the order they came
        self.batch: Any = None  # one llama_batch, reused by every step
        self.vocab: Any = None
        self.n_vocab = 0
        self.piece = ctypes.create_string_buffer(256)
        self.np: Any = None
        self.token_step = 0.0  # seconds a step of one generated token takes (recent)
        self.chunk = UNTIMED_CHUNK  # prompt tokens of a long prompt's next chunk
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
        with self._model_params(kernels.extra_buffers, params.n_seq):
            self._construct(params)
        load_s = time.perf_counter() - t0
        L, ctx = self.L, self.llm.ctx
        self.n_ctx = int(L.llama_n_ctx(ctx))
        self.n_ctx_seq = int(L.llama_n_ctx_seq(ctx))
        self.n_batch = int(L.llama_n_batch(ctx))
        self.slots = [_Slot(seq) for seq in range(int(L.llama_n_seq_max(ctx)))]
        # the pace of the model before (a speed probe's, timed as a reply) is not this one's
        self.token_step, self.chunk = 0.0, UNTIMED_CHUNK
        self.jobs = []
        if self.batch is not None:
            L.llama_batch_free(self.batch)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.vocab = L.llama_model_get_vocab(self.llm.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        # numpy only now, after llama.cpp's libraries: imported first, it made CUDA model
        # loads crash (SIGSEGV) in this process on an H200 (docs/GPU.md)
        import numpy

        self.np = numpy
        from corral.engine.ggml import parse_load_log

        self.chan.send(
            Loaded(
                log=self._load_log(parse_load_log(capture.since(mark)), self.n_ctx),
                n_layer=int(self.L.llama_model_n_layer(self.llm.model)),
                n_vocab=int(self.llm.n_vocab()),
                load_s=load_s,
                cpu_kernels=kernels,
                n_seq=len(self.slots),
                n_ctx_seq=self.n_ctx_seq,
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
    def _model_params(self, extra_buffers: bool, n_seq: int) -> Iterator[None]:
        """Llama() takes no use_extra_bufts, no progress callback and no n_seq_max: set them
        in the model and context params it starts from. Progress goes out as `progress`
        frames (tensors read and uploaded to every device, RPC workers included), at most
        one per percent. `n_seq` sequences each get their own share of the cache
        (kv_unified off: n_ctx / n_seq cells a slot, as llama-server's slots)."""
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

        context_original = low.llama_context_default_params

        def context_params() -> Any:
            c = context_original()
            c.n_seq_max = n_seq
            c.kv_unified = False
            return c

        low.llama_model_default_params = params
        low.llama_context_default_params = context_params
        try:
            yield
        finally:
            low.llama_model_default_params = original
            low.llama_context_default_params = context_original

    def _construct(self, p: LoadParams) -> None:
        from corral.engine.planner.kvtypes import ggml_type

        threads = p.n_threads or usable_cores()
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
            cparams.n_seq_max = p.n_seq
            cparams.kv_unified = False
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

    def _sampler(self, req: Generate) -> Any:
        """llama.cpp's sampler chain for a request: the JSON grammar, the penalties and the
        logit bias first, then greedy or top-k, top-p, min-p, temperature and a seeded
        draw. _Refused (naming the field) for what llama.cpp cannot build."""
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        try:
            if req.json_schema:
                L.llama_sampler_chain_add(chain, self._grammar(req.json_schema))
            if req.presence_penalty or req.frequency_penalty:
                L.llama_sampler_chain_add(
                    chain,
                    L.llama_sampler_init_penalties(
                        self.n_vocab,
                        req.penalty_last_n,
                        1.0,
                        req.frequency_penalty,
                        req.presence_penalty,
                    ),
                )
            if req.logit_bias:
                bad = [t for t, _ in req.logit_bias if not 0 <= t < self.n_vocab]
                if bad:
                    raise _Refused(
                        f"logit_bias: token {bad[0]} is not in this model's vocabulary "
                        f"(0 to {self.n_vocab - 1})",
                        BAD_FIELD + "logit_bias",
                    )
                biases = (L.llama_logit_bias * len(req.logit_bias))(
                    *(L.llama_logit_bias(t, b) for t, b in req.logit_bias)
                )
                L.llama_sampler_chain_add(
                    chain,
                    L.llama_sampler_init_logit_bias(self.n_vocab, len(req.logit_bias), biases),
                )
        except BaseException:
            L.llama_sampler_free(chain)
            raise
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

    def _grammar(self, schema: str) -> Any:
        """A grammar sampler that lets through only JSON valid against `schema` ("*": any
        JSON object), by llama.cpp's grammar engine (GBNF from llama-cpp-python's JSON
        schema converter)."""
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        try:
            gbnf = json_schema_to_gbnf('{"type": "object"}' if schema == "*" else schema)
            ignored = [] if schema == "*" else _ignored_keywords(schema, json_schema_to_gbnf)
        except Exception as exc:  # the converter raises plain errors for what it lacks
            raise _Refused(
                f"response_format.json_schema: this schema cannot be turned into a grammar ({exc})",
                BAD_FIELD + "response_format",
            ) from None
        if ignored:  # the reply could break them: refused, never silently not held
            raise _Refused(
                f"response_format.json_schema: {', '.join(ignored)} cannot be held by the "
                "grammar (llama-cpp-python's schema converter ignores them): remove them, "
                "or check that part of the reply yourself",
                BAD_FIELD + "response_format",
            )
        sampler = self.L.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        if not sampler:
            raise _Refused(
                "response_format.json_schema: llama.cpp could not parse the grammar made "
                "from this schema",
                BAD_FIELD + "response_format",
            )
        return sampler

    def _logprobs(self, job: _Job, index: int, tok: int) -> None:
        """The chosen token's log-probability and the `logprobs` most likely tokens', from
        the model's own distribution (the raw logits at batch `index`, before sampling)."""
        np = self.np
        raw = self.L.llama_get_logits_ith(self.llm.ctx, index)
        shifted = np.ctypeslib.as_array(raw, (self.n_vocab,)).astype(np.float64)
        shifted -= shifted.max()
        logz = float(np.log(np.exp(shifted).sum()))
        job.logprob = float(shifted[tok] - logz)
        job.top = ()
        k = min(job.req.logprobs, self.n_vocab - 1)
        if k > 0:
            best = np.argpartition(-shifted, k)[:k]
            best = best[np.argsort(-shifted[best])]
            job.top = tuple(
                (
                    int(t),
                    self._piece(int(t)).decode("utf-8", errors="replace"),
                    float(shifted[t] - logz),
                )
                for t in best
            )

    def _piece(self, tok: int) -> bytes:
        """A token's text as the vocabulary holds it (bytes: a character may span tokens)."""
        n = self.L.llama_token_to_piece(self.vocab, tok, self.piece, 256, 0, False)
        return ctypes.string_at(self.piece, max(n, 0))

    def _n_keep(self, req: Generate, prompt: list[int]) -> int:
        """Tokens a context shift keeps: --n-keep, or by default the system prompt."""
        if req.n_keep >= 0:
            return min(req.n_keep, self.n_ctx_seq)
        if req.prompt is not None or not req.messages or req.messages[0].role != "system":
            return 0
        head = self._prompt_tokens(Generate(messages=req.messages[:1]), False)
        n = 0
        while n < min(len(head), len(prompt)) and head[n] == prompt[n]:
            n += 1
        return n

    def _shift(self, job: _Job) -> None:
        """Drop half of what follows the kept prefix and slide the rest down (llama-server's
        n_discard), so the reply goes on past the slot's context; works over RPC buffers."""
        L, slot = self.L, job.slot
        mem = L.llama_get_memory(self.llm.ctx)
        n_past = len(slot.tokens)
        n_discard = (n_past - job.n_keep) // 2
        L.llama_memory_seq_rm(mem, slot.seq, job.n_keep, job.n_keep + n_discard)
        L.llama_memory_seq_add(mem, slot.seq, job.n_keep + n_discard, n_past, -n_discard)
        del slot.tokens[job.n_keep : job.n_keep + n_discard]
        slot.shifts += 1
        self.chan.send(
            Shift(job.n_keep, n_discard, slot.shifts, len(slot.tokens), self.n_ctx_seq, job.rid)
        )

    def _reusable(self, seq: int, keep: int) -> int:
        """How much of the cached prefix can be kept: with a windowed sliding-window cache,
        the cells the next token attends to (the window before `keep`) may be gone once the
        chat went further; then the prompt is read again from its start (as llama-server
        does), never decoded against a cache that lacks them."""
        n_swa = int(self.L.llama_model_n_swa(self.llm.model)) if not self.swa_full else 0
        if keep == 0 or n_swa <= 0:
            return keep
        oldest = int(self.L.llama_memory_seq_pos_min(self.L.llama_get_memory(self.llm.ctx), seq))
        return 0 if oldest > max(0, keep - n_swa) else keep

    def kv_used(self, seq: int) -> int:
        mem = self.L.llama_get_memory(self.llm.ctx)
        return int(self.L.llama_memory_seq_pos_max(mem, seq)) + 1

    # ------------------------------------------------------------------ the scheduler

    def start(self, req: Generate) -> None:
        """Take a request into a free slot (the one whose cache shares the longest prefix
        with its prompt, as llama-server picks): its prompt is read in the next steps."""
        if self.llm is None:
            raise _Refused("no model is loaded")
        if any(job.rid == req.rid for job in self.jobs):
            raise _Refused(f"request {req.rid} is already running")
        free = [slot for slot in self.slots if slot.job is None]
        if not free:
            raise _Refused(
                f"all {len(self.slots)} slots are busy (load with a larger --parallel to "
                "serve more requests at once)",
                BUSY,
            )
        prompt = self._prompt_tokens(req)
        if len(prompt) >= self.n_ctx_seq:
            each = " per slot" if len(self.slots) > 1 else ""
            raise _Refused(
                f"the prompt is {len(prompt)} tokens, the context {self.n_ctx_seq}{each}: "
                "start a new chat or load with a larger --ctx",
                PROMPT_TOO_LONG,
            )
        slot = max(free, key=lambda s: (_common(s.tokens, prompt), -s.used))
        # reuse the cached prefix; decode at least one token for logits
        keep = self._reusable(slot.seq, min(_common(slot.tokens, prompt), len(prompt) - 1))
        L = self.L
        L.llama_memory_seq_rm(L.llama_get_memory(self.llm.ctx), slot.seq, keep, -1)
        del slot.tokens[keep:]
        job = _Job(req, slot, prompt, keep, self._n_keep(req, prompt))
        job.sampler = self._sampler(req)
        job.can_shift = bool(L.llama_memory_can_shift(L.llama_get_memory(self.llm.ctx)))
        slot.job, slot.used = job, time.monotonic()
        self.jobs.append(job)

    def embed(self, req: Embed) -> None:
        """Embeddings of `req.texts`, in the least used free slot (its cached prompt is
        dropped): the model's own pooling where it has one, else the mean of the token
        vectors of its last layer; each normalized to length 1."""
        if self.llm is None:
            raise _Refused("no model is loaded")
        L, ctx, np = self.L, self.llm.ctx, self.np
        slot = min(self.slots, key=lambda s: len(s.tokens))
        pooled = int(L.llama_pooling_type(ctx)) not in (0, -1)  # NONE, UNSPECIFIED
        n_embd = int(L.llama_model_n_embd(self.llm.model))
        mem = L.llama_get_memory(ctx)
        vectors, n_tokens = [], 0
        L.llama_set_embeddings(ctx, True)
        try:
            for i, text in enumerate(req.texts):
                tokens = list(self.llm.tokenize(text.encode(), add_bos=True, special=False))
                limit = int(L.llama_n_ubatch(ctx)) if pooled else self.n_ctx_seq
                if not tokens or len(tokens) > limit:
                    raise _Refused(
                        f"input[{i}]: {len(tokens)} tokens; this model embeds 1 to {limit}",
                        BAD_FIELD + "input",
                    )
                L.llama_memory_seq_rm(mem, slot.seq, 0, -1)
                slot.tokens.clear()
                total = np.zeros(n_embd, dtype=np.float64)
                for start in range(0, len(tokens), self.n_batch):
                    chunk = tokens[start : start + self.n_batch]
                    entries = [
                        _Entry(_NO_JOB, t, start + k, True, True) for k, t in enumerate(chunk)
                    ]
                    self._decode(entries, slot.seq)
                    if not pooled:
                        for k in range(len(chunk)):
                            row = L.llama_get_embeddings_ith(ctx, k)
                            total += np.ctypeslib.as_array(row, (n_embd,))
                if pooled:
                    total = np.ctypeslib.as_array(
                        L.llama_get_embeddings_seq(ctx, slot.seq), (n_embd,)
                    ).astype(np.float64)
                norm = float(np.linalg.norm(total)) or 1.0
                vectors.append(tuple(float(x) for x in total / norm))
                n_tokens += len(tokens)
        finally:
            L.llama_memory_seq_rm(mem, slot.seq, 0, -1)
            L.llama_set_embeddings(ctx, False)
        self.chan.send(Embeddings(tuple(vectors), n_tokens, req.rid))

    def time_steps(self, req: TimeSteps) -> None:
        """Median seconds of `req.reps` decodes of each size (slot 0, emptied after): a
        generated token's step after a 16-token prompt, or a prompt batch from position 0.
        Each is read after llama_synchronize (a decode over RPC returns before the workers
        finish)."""
        if self.llm is None:
            raise _Refused("no model is loaded")
        L, ctx = self.L, self.llm.ctx
        mem = L.llama_get_memory(ctx)
        if not 0 < req.reps <= 64 or any(not 0 < n <= self.n_batch for n in req.sizes):
            raise _Refused(f"TimeSteps: sizes 1..{self.n_batch} and 1..64 repetitions")
        slot = self.slots[0]
        job = _Job(Generate(), slot, [], 0, 0)
        tok = min(self.n_vocab - 1, 300)  # an ordinary token of any vocabulary
        out = []
        try:
            for n in req.sizes:
                if n == 1 and req.generate:
                    out.append(self._time_generated(slot, tok, req.reps))
                    continue
                times = []
                for r in range(req.reps):
                    if n > 1 or r == 0:
                        L.llama_memory_seq_rm(mem, slot.seq, 0, -1)
                    if n == 1 and r == 0:  # a short prompt first, untimed
                        self._decode([_Entry(job, tok, i, i == 15, True) for i in range(16)])
                        L.llama_synchronize(ctx)
                    pos = 16 + r if n == 1 else 0
                    entries = [_Entry(job, tok, pos + i, i == n - 1, True) for i in range(n)]
                    t0 = time.perf_counter()
                    if not self._decode(entries):
                        raise _Refused(f"llama_decode failed while timing {n} tokens")
                    L.llama_synchronize(ctx)
                    times.append(time.perf_counter() - t0)
                out.append(sorted(times)[len(times) // 2])
        finally:
            L.llama_memory_seq_rm(mem, slot.seq, 0, -1)
            slot.tokens.clear()
        self.chan.send(StepTimes(tuple(out)))

    def _time_generated(self, slot: _Slot, tok: int, reps: int) -> float:
        """Seconds from one step of a greedy reply to the next, `reps` of them after a
        16-token prompt, through `step` as every reply's tokens go: the time a reply's
        token takes, its frames discarded (nobody asked for this reply)."""
        req = Generate(max_tokens=reps + 1, ignore_eos=True, rid=-2)
        job = _Job(req, slot, [tok] * 16, 0, 0)
        job.sampler = self._sampler(req)
        slot.job = job
        self.jobs.append(job)
        chan, self.chan = self.chan, _Discard()
        starts = []
        try:
            while job in self.jobs:
                starts.append(time.perf_counter())
                self.step()
        finally:
            self.chan = chan
            if job in self.jobs:
                self.jobs.remove(job)
                self.L.llama_sampler_free(job.sampler)
            slot.job = None
        if job.error or len(starts) < 3:
            raise _Refused(f"{job.error or job.stop}, while timing generated tokens")
        # after the prompt; their mean, as a reply's tokens/s is: its slow steps count (on
        # the noisy fifth H100 host (12-06) a median of bare decodes ran 0.4-2.8 ms a token
        # faster than the replies' mean), and a pass out of line is what speeds.centre drops
        return (starts[-1] - starts[1]) / (len(starts) - 2)

    def run_step(self) -> None:
        """A step; whatever goes wrong in it ends the replies in it, never the process."""
        try:
            self.step()
        except Exception as exc:  # a bug or llama.cpp refusing: every reply hears why
            for job in list(self.jobs):
                job.stop, job.error = "error", f"the reply failed: {exc}"
                self._finish(job)

    def cancel(self, rid: int) -> None:
        """Stop a request (every one: rid -1) at its next step."""
        for job in self.jobs:
            if rid < 0 or job.rid == rid:
                job.stop = "cancelled"

    def step(self) -> None:
        """One llama_decode for every running request: the token each generating one
        sampled last, and prompt tokens of those still reading theirs. A short prompt that
        has just come goes first, alone with the generating tokens; a long prompt is read
        in chunks sized to take about CHUNK_STEPS token steps, so a request that comes
        while it is read waits for little of it (time to first token under load)."""
        for job in [j for j in self.jobs if j.stop]:
            self._finish(job)
        entries = [
            _Entry(job, job.next_token, len(job.slot.tokens), True, False)
            for job in self.jobs
            if job.next_token is not None
        ]
        budget = self.n_batch - len(entries)
        reading = sorted((j for j in self.jobs if j.pending), key=lambda j: len(j.pending))
        fresh = [j for j in reading if j.read == 0 and len(j.pending) <= SHORT_PROMPT]
        chunk = self.chunk
        for job in fresh or reading:
            if budget <= 0:
                break
            take = min(budget, len(job.pending), len(job.pending) if job in fresh else chunk)
            last = take == len(job.pending)
            pos = len(job.slot.tokens)
            entries.extend(
                _Entry(job, t, pos + i, last and i == take - 1, True)
                for i, t in enumerate(job.pending[:take])
            )
            del job.pending[:take]
            job.read += take
            budget -= take
        t0 = time.perf_counter()
        if entries and self._decode(entries):
            if not any(e.logits for e in entries):
                self.L.llama_synchronize(self.llm.ctx)  # the step's time, read below
            now = time.perf_counter()
            for i, entry in enumerate(entries):
                job = entry.job
                job.slot.tokens.append(entry.token)
                if entry.prompt:
                    if entry.logits:  # the prompt is read
                        job.t1 = now
                        self.chan.send(Progress(1.0, job.rid))
                        if job.req.max_tokens > 0:
                            self._sample(job, i)
                        else:
                            job.stop = "length"
                    continue
                job.next_token = None
                if job.n_gen >= job.req.max_tokens:
                    job.stop = "length"
                elif not job.stop:
                    self._sample(job, i)
            self._timed(entries, time.perf_counter() - t0, 0 if fresh else len(reading))
            for job in reading:
                if job.pending:
                    self.chan.send(Progress(job.read / len(job.prompt), job.rid))
        for job in [j for j in self.jobs if j.stop]:
            self._finish(job)

    def _timed(self, entries: list[_Entry], seconds: float, readers: int) -> None:
        """Pace of recent steps (each read after its results were back): a step of one
        generated token (what a request alone waits for a token); after a step that read a
        chunk of each of `readers` long prompts, the next chunks' size, toward CHUNK_STEPS
        such steps' time (by half the way, in ratio: one stalled step does not halve it)."""
        if len(entries) == 1 and not entries[0].prompt:
            self.token_step = _recent(self.token_step, seconds)
        elif readers and self.token_step and seconds > 0:
            read = sum(e.prompt for e in entries)
            goal = read * CHUNK_STEPS * self.token_step / seconds / readers
            self.chunk = max(MIN_CHUNK, min(self.n_batch, round((self.chunk * goal) ** 0.5)))

    def _decode(self, entries: list[_Entry], seq: int = -1) -> bool:
        """One llama_decode of `entries` (in their jobs' slots, or all in sequence `seq`);
        False (their requests ended with an error) if it failed."""
        batch = self.batch
        batch.n_tokens = len(entries)
        for i, e in enumerate(entries):
            batch.token[i] = e.token
            batch.pos[i] = e.pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = e.job.slot.seq if seq < 0 else seq
            batch.logits[i] = e.logits
        rc = self.L.llama_decode(self.llm.ctx, batch)
        if rc == 0:
            return True
        if seq >= 0:
            raise _Refused(f"llama_decode returned {rc} while embedding")
        for e in entries:
            e.job.error = f"llama_decode returned {rc} (KV cache full or compute failed)"
            e.job.stop = "error"
        return False

    def _sample(self, job: _Job, index: int) -> None:
        """The next token of `job`, from the logits at batch `index`: sent at once, decoded
        into the cache in the next step. An end of generation ends the reply; a full slot
        shifts (drops older cells) or, where that is off, ends it."""
        L, ctx = self.L, self.llm.ctx
        slot = job.slot
        if len(slot.tokens) >= self.n_ctx_seq:
            if not job.req.context_shift or not job.can_shift or len(slot.tokens) - job.n_keep < 2:
                job.stop = "context_full"
                return
            self._flush(job)
            self._shift(job)
        if job.greedy:
            # the first largest logit, read in place (what llama.cpp's greedy sampler picks,
            # without building its candidate array: ~40 us a token on a 32k vocabulary)
            logits = self.np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, index), (self.n_vocab,))
            tok = int(logits.argmax())
        else:
            tok = int(L.llama_sampler_sample(job.sampler, ctx, index))
        if L.llama_vocab_is_eog(self.vocab, tok) and not job.req.ignore_eos:
            job.stop = "eos"
            return
        if job.req.logprobs >= 0:
            self._logprobs(job, index, tok)
        job.next_token = tok
        self._emit(job, tok)

    def _emit(self, job: _Job, tok: int) -> None:
        """A token just sampled: its text goes out (in batches of ~30 ms) before the next
        step writes it to the cache."""
        text = job.utf8.decode(self._piece(tok))
        job.n_gen += 1
        job.pieces.append(text)
        # its cell counts as in use: the next step writes it (the reply's last token too)
        job.batch.append(TokenItem(text, tok, len(job.slot.tokens) + 1, job.logprob, job.top))
        now = time.perf_counter()
        if now - job.flushed >= _FLUSH_S:
            self._flush(job)
            job.flushed = now

    def _flush(self, job: _Job) -> None:
        if job.batch:
            self.chan.send(Tokens(tuple(job.batch), self.n_ctx_seq, job.rid, job.slot.seq))
            job.batch = []

    def _finish(self, job: _Job) -> None:
        """Send what is left of `job`'s reply and its Done (or Failed), free its slot."""
        L = self.L
        self.jobs.remove(job)
        slot = job.slot
        slot.job = None
        self.L.llama_sampler_free(job.sampler)
        if job.stop == "error":
            L.llama_memory_seq_rm(L.llama_get_memory(self.llm.ctx), slot.seq, 0, -1)
            slot.tokens.clear()
            self._flush(job)
            self.chan.send(Failed(job.error, "", job.rid))
            return
        self._flush(job)
        L.llama_synchronize(self.llm.ctx)
        t2 = time.perf_counter()
        tail = job.utf8.decode(b"", final=True)
        if tail:
            job.pieces.append(tail)
        t1 = job.t1 or t2
        self.chan.send(
            Done(
                content="".join(job.pieces),
                stop=job.stop,
                n_tokens=job.n_gen,
                prompt_tokens=len(job.prompt),
                cached_tokens=job.keep,
                shifts=slot.shifts,
                n_keep=job.n_keep,
                kv_head=tuple(slot.tokens[: job.n_keep]),
                kv_pos_min=int(
                    L.llama_memory_seq_pos_min(L.llama_get_memory(self.llm.ctx), slot.seq)
                ),
                kv_used=self.kv_used(slot.seq),
                n_ctx=self.n_ctx_seq,
                prompt_s=t1 - job.t0,
                gen_s=t2 - t1,
                rid=job.rid,
                slot=slot.seq,
            )
        )


@dataclasses.dataclass
class _Slot:
    """One sequence of the context: its cells of the KV cache and what they hold."""

    seq: int
    tokens: list[int] = dataclasses.field(default_factory=list)  # what the cache holds
    used: float = 0.0  # when a request last took it
    shifts: int = 0  # context shifts since the model was loaded
    job: _Job | None = None


class _Job:
    """A request in its slot: the prompt still to read, the reply so far."""

    def __init__(self, req: Generate, slot: _Slot, prompt: list[int], keep: int, n_keep: int):
        self.req, self.rid, self.slot, self.prompt = req, req.rid, slot, prompt
        self.keep, self.n_keep = keep, n_keep
        self.pending = prompt[keep:]  # prompt tokens not yet in the cache
        self.read = 0  # of them, read so far
        self.next_token: int | None = None  # sampled, to decode in the next step
        # greedy by reading the logits in place, where no sampler would change them
        self.greedy = req.temp <= 0 and not (
            req.json_schema or req.logit_bias or req.presence_penalty or req.frequency_penalty
        )
        self.logprob: float = 0.0  # of the token sampled last (Generate.logprobs)
        self.top: tuple[tuple[int, str, float], ...] = ()
        self.sampler: Any = None
        self.can_shift = False
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pieces: list[str] = []
        # tokens go out in small batches: a frame per token wakes the parent for each one,
        # and on a small machine that wake-up competes with the compute threads
        self.batch: list[TokenItem] = []
        self.flushed = 0.0  # the first token is sent at once
        self.n_gen = 0
        self.stop = ""  # why it ended, once it has
        self.error = ""
        self.t0, self.t1 = time.perf_counter(), 0.0


# JSON Schema's validation keywords (annotations such as title or description constrain
# nothing); one whose removal leaves the converter's grammar the same is not held by it
_VALIDATION = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "minItems",
        "maxItems",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "minProperties",
        "maxProperties",
        "dependentRequired",
        "dependentSchemas",
        "propertyNames",
        "not",
        "if",
        "then",
        "else",
    }
)
# keywords whose value maps names to schemas (the names are not keywords)
_BY_NAME = frozenset(
    {
        "properties",
        "patternProperties",
        "$defs",
        "definitions",
        "dependentSchemas",
    }
)


def _ignored_keywords(schema: str, convert: Any) -> list[str]:
    """Validation keywords of `schema` (JSON text) that `convert` (JSON schema to GBNF)
    ignores, as paths ("properties.age.maximum"): each is taken out in turn and the grammar
    compared with the whole schema's."""
    import json

    root = json.loads(schema)
    whole = convert(schema)
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")
            return
        if not isinstance(node, dict):
            return
        for key, value in list(node.items()):
            where = f"{path}.{key}" if path else key
            if key in _VALIDATION:
                kept = list(node.items())
                del node[key]
                if convert(json.dumps(root)) == whole:
                    found.append(where)
                node.clear()
                node.update(kept)
            if key in _BY_NAME and isinstance(value, dict):
                for name, sub in value.items():
                    walk(sub, f"{where}.{name}")
            elif isinstance(value, dict | list):
                walk(value, where)

    walk(root, "")
    return found


def _recent(average: float, value: float) -> float:
    """An exponential moving average (the first value taken as it is)."""
    return value if not average else 0.8 * average + 0.2 * value


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


_NO_JOB: Any = None  # an embedding's tokens belong to no reply


@dataclasses.dataclass(slots=True)
class _Entry:
    """One token of a step's batch."""

    job: _Job
    token: int
    pos: int
    logits: bool  # its logits are read (a generated token; a prompt's last)
    prompt: bool  # a prompt token (else the token the request sampled last)


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
    later: list[Message | ProtocolError] = []  # other requests wait for the replies to end
    while True:
        if engine.jobs:  # take every request that came, then one step for all replies
            try:
                req = chan.inbox.get_nowait()
            except queue.Empty:
                engine.run_step()
                continue
        else:
            req = later.pop(0) if later else chan.inbox.get()
        if req is None or isinstance(req, Exit):
            return 0
        if isinstance(req, Cancel):
            engine.cancel(req.rid)
            continue
        if engine.jobs and not isinstance(req, Generate | ProtocolError):
            later.append(req)
            continue
        mark = capture.count
        rid = req.rid if isinstance(req, Generate | Embed) else -1
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
            elif isinstance(req, Embed):
                engine.embed(req)
            elif isinstance(req, TimeSteps):
                engine.time_steps(req)
            elif isinstance(req, Generate):
                engine.start(req)
            else:
                raise _Refused(f"{type(req).__name__} is not a request")
        except _Refused as exc:
            chan.send(Failed(str(exc), exc.reason, rid))
        except (GgmlError, UnknownCacheType) as exc:
            chan.send(Failed(str(exc), "", rid))
        except Exception as exc:
            if rid < 0 and not isinstance(exc, ValueError):
                raise
            if rid >= 0:  # a bug, or llama.cpp refusing: this request fails, not the process
                chan.send(Failed(f"the request failed: {type(exc).__name__}: {exc}", "", rid))
                continue
            # llama-cpp-python's "Failed to load model from file" etc.
            hint = ""
            if isinstance(req, Load):
                hint = load_failure(capture.since(mark)) or (
                    ": the file may be truncated or damaged (download it again), or use a "
                    "model architecture this llama.cpp build supports"
                )
            chan.send(Failed(f"{exc}{hint}", "", rid))


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
