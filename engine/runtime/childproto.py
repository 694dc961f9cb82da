"""The inference child's messages: what the desktop and its llama.cpp process say.

Frozen dataclasses in a numbered registry, on the wire as the control protocol's messages
are (``[type, {fields}]`` in msgpack frames over a socketpair), validated on decode: a
field of the wrong type is a ProtocolError on the side that reads it, never a KeyError deep
in a handler.

    desktop → child   Load · DryRun · Capabilities · Generate · Cancel · Exit · Embed
    child → desktop   Ready · Progress · Loaded · DryRunReport · Answers · Tokens · Shift ·
                      Done · Failed · Embeddings

Every request gets exactly one final reply: Load → Progress* then Loaded; DryRun →
DryRunReport; Capabilities → Answers; Generate → (Progress | Tokens | Shift)* then Done; any
of them → Failed instead. Several Generates may run at once, one per slot (LoadParams.n_seq):
each carries a number (rid) that every frame of its reply repeats, and the child decodes them
together, a token of each per step. Cancel ends a Generate early (its Done says
"cancelled"); Embed → Embeddings; Exit ends the child. Other requests wait until no reply
runs. Defaults live in one place: `engine.runtime.session.LoadSettings` makes LoadParams,
whose fields the child takes as they are (n_ctx already padded to 256).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from corral.engine.ggml.buildinfo import BuildInfo
from corral.engine.ggml.devices import GgmlDevice
from corral.engine.ggml.kernelcheck import CpuKernels
from corral.engine.protocol.messages import CapabilityQuestion, Message, Registry

CHILD_MESSAGES = Registry("inference child")
_register = CHILD_MESSAGES.register


# ----------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class LoadParams:
    """Everything llama.cpp needs to load (or dry-run) a model; no defaults here."""

    model: str
    rpc: tuple[str, ...]  # endpoints, registered in this order (RPC0, RPC1, ...)
    n_ctx: int  # padded to a multiple of 256 (planner.plan.pad_ctx)
    n_batch: int
    n_ubatch: int
    n_threads: int  # 0: one per core
    n_gpu_layers: int
    tensor_split: tuple[float, ...]  # empty: llama.cpp's own (by free memory)
    type_k: str
    type_v: str
    flash_attn: bool
    swa_full: bool
    n_seq: int  # sequences (slots) decoded together, each with n_ctx / n_seq cells


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class LoadLog:
    """What llama.cpp logged while loading: the devices, layer → device name, and MiB per
    buffer kind (model, KV, compute, output) per buffer name."""

    devices: tuple[GgmlDevice, ...]
    layers: dict[str, str]
    buffers: dict[str, dict[str, float]]
    n_ctx: int


@dataclass(frozen=True, slots=True)
class TokenItem:
    text: str
    id: int
    kv_used: int  # cells of the KV cache in use after this token
    logprob: float = 0.0  # when asked (Generate.logprobs): log-probability of this token
    top: tuple[tuple[int, str, float], ...] = ()  # the most likely tokens: (id, text, logprob)


PROMPT_TOO_LONG = "prompt_too_long"  # Failed.reason: the prompt does not fit the context
BAD_FIELD = "bad_field:"  # Failed.reason prefix: a request field the child cannot honour
BUSY = "busy"  # Failed.reason: every slot holds a reply

# ----------------------------------------------------------------- desktop → child


@_register(1)
@dataclass(frozen=True, slots=True)
class Load(Message):
    params: LoadParams


@_register(2)
@dataclass(frozen=True, slots=True)
class DryRun(Message):
    """llama.cpp's own allocation, simulated (no_alloc): nothing is allocated anywhere."""

    params: LoadParams


@_register(3)
@dataclass(frozen=True, slots=True)
class Capabilities(Message):
    """Ask one of the desktop's own devices (engine.ggml.capabilities)."""

    device: str
    questions: tuple[CapabilityQuestion, ...]


@_register(4)
@dataclass(frozen=True, slots=True)
class Generate(Message):
    """A reply to `messages` (through the model's chat template), or to a raw `prompt`."""

    messages: tuple[ChatTurn, ...] = ()
    prompt: str | None = None
    max_tokens: int = 256
    temp: float = 0.0  # 0: greedy
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.0  # 0: off
    seed: int = -1  # -1: random
    ignore_eos: bool = False  # fixed-length runs for benchmarks
    n_keep: int = -1  # tokens a context shift keeps; -1: the system prompt
    presence_penalty: float = 0.0  # OpenAI's: subtracted once a token has appeared
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token appeared
    penalty_last_n: int = 64  # how far back the penalties look
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); -100: never
    json_schema: str = ""  # the reply is JSON that validates against it ("*": any object)
    logprobs: int = -1  # -1: none; else the chosen token's and this many others' log-probs
    context_shift: bool = True  # at a full context drop older cells and go on; else stop
    rid: int = 0  # the request's number: every frame of its reply carries it

    @classmethod
    def chat(cls, messages: Sequence[Mapping[str, str]], **sampling: Any) -> Generate:
        """A request for a reply to OpenAI-style {role, content} messages."""
        turns = tuple(ChatTurn(str(m["role"]), str(m["content"])) for m in messages)
        return cls(messages=turns, **sampling)


@_register(5)
@dataclass(frozen=True, slots=True)
class Cancel(Message):
    rid: int = -1  # the request to stop; -1: every one


@_register(6)
@dataclass(frozen=True, slots=True)
class Exit(Message):
    pass


@_register(7)
@dataclass(frozen=True, slots=True)
class Embed(Message):
    """Embeddings of texts by the loaded model (its pooling, or the mean of its last
    layer's token vectors), each normalized to length 1; runs when no reply does."""

    texts: tuple[str, ...]
    rid: int = 0


# ----------------------------------------------------------------- child → desktop


@_register(20)
@dataclass(frozen=True, slots=True)
class Ready(Message):
    build: BuildInfo
    pid: int
    devices: tuple[GgmlDevice, ...]  # the desktop's own, before any RPC endpoint is added


@_register(21)
@dataclass(frozen=True, slots=True)
class Progress(Message):
    fraction: float
    rid: int = -1  # a reply's prompt being read; -1: a load


@_register(22)
@dataclass(frozen=True, slots=True)
class Loaded(Message):
    log: LoadLog
    n_layer: int
    n_vocab: int
    load_s: float
    cpu_kernels: CpuKernels
    n_seq: int = 1  # slots: replies decoded together
    n_ctx_seq: int = 0  # cells of the cache each slot holds


@_register(23)
@dataclass(frozen=True, slots=True)
class DryRunReport(Message):
    log: LoadLog
    swa_layers: tuple[int, ...]  # the layers llama.cpp runs with the sliding window
    n_swa: int
    # no_alloc logs the extra CPU buffers as empty: (ggml type, bytes per byte moved)
    cpu_extra: tuple[tuple[int, float], ...]


@_register(24)
@dataclass(frozen=True, slots=True)
class Answers(Message):
    answers: tuple[bool, ...]


@_register(25)
@dataclass(frozen=True, slots=True)
class Tokens(Message):
    """Tokens in a batch of at most ~30 ms (a frame per token costs the compute threads)."""

    items: tuple[TokenItem, ...]
    n_ctx: int  # the slot's cells
    rid: int = 0
    slot: int = 0


@_register(26)
@dataclass(frozen=True, slots=True)
class Shift(Message):
    """A context shift: n_discard cells after the first n_keep were dropped."""

    n_keep: int
    n_discard: int
    shifts: int  # since the model was loaded
    kv_used: int
    n_ctx: int
    rid: int = 0


@_register(27)
@dataclass(frozen=True, slots=True)
class Done(Message):
    content: str
    stop: str  # eos | length | cancelled | context_full
    n_tokens: int
    prompt_tokens: int
    cached_tokens: int  # prompt tokens reused from the cache
    shifts: int
    n_keep: int
    kv_head: tuple[int, ...]  # the kept prefix's tokens
    kv_pos_min: int
    kv_used: int
    n_ctx: int
    prompt_s: float
    gen_s: float
    rid: int = 0
    slot: int = 0


@_register(28)
@dataclass(frozen=True, slots=True)
class Failed(Message):
    """The request failed; the child lives on (a crash closes the channel instead).
    `reason`: a failure the parent acts on by kind ("prompt_too_long"), else ""."""

    message: str
    reason: str = ""
    rid: int = -1  # the request it ends; -1: the operation under way (a load, ...)


@_register(29)
@dataclass(frozen=True, slots=True)
class Embeddings(Message):
    vectors: tuple[tuple[float, ...], ...]
    n_tokens: int  # the texts' tokens, all together
    rid: int = 0


@_register(30)
@dataclass(frozen=True, slots=True)
class TimeSteps(Message):
    """Time the loaded model's steps (engine.runtime.speeds' probes): for each size in
    `sizes`, `reps` decodes of that many tokens (1: a generated token after a short prompt;
    more: a prompt batch from position 0), each read after its results are back. With
    `generate` a size of 1 is timed as a reply's tokens are made, through the scheduler's
    own step (decode, logits read, sampled, sent on): what a token of a reply costs, where
    a bare decode left 0.2-2.8 ms a token out."""

    sizes: tuple[int, ...]
    reps: int
    generate: bool = False


@_register(31)
@dataclass(frozen=True, slots=True)
class StepTimes(Message):
    """Seconds of each size's step, in TimeSteps' order: the median of its decodes (of a
    generated token with `generate`, the mean of a reply's steps)."""

    seconds: tuple[float, ...]


# ----------------------------------------------------------------- what generate() yields


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token, as InferenceProcess.generate yields it."""

    text: str
    id: int
    kv_used: int
    n_ctx: int  # the slot's cells
    slot: int = 0
    logprob: float = 0.0
    top: tuple[tuple[int, str, float], ...] = ()


Event = Token | Shift | Done
