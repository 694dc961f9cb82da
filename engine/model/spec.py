"""GGUF metadata → ModelSpec: what the planner needs to know about a model, read once.

Read with our lean header reader over the `gguf` package's type tables (gguf_header.py):
real per-tensor byte sizes, so a mixed-quant model's layers are sized as they are, not as
the file type suggests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .gguf_header import ArrayInfo, HeaderError, read_header

_BLOCK = re.compile(r"blk\.(\d+)\.")


class ModelError(Exception):
    """The file is not a model the planner can read; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class LayerSpec:
    index: int
    weight_bytes: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    is_swa: bool = False
    # (ggml type, bytes) of each 2-D weight: the matmuls llama.cpp may copy into an extra CPU
    # buffer (AMX, CPU_REPACK) when the layer stays on the host
    matmuls: tuple[tuple[int, int], ...] = ()
    # (name within the block, ggml type) of each 2-D weight ("ffn_down.weight", Q6_K): what
    # the speed probes copy, since a device may read one type much faster than another
    weight_types: tuple[tuple[str, int], ...] = ()

    @property
    def n_embd_k_gqa(self) -> int:
        return self.head_dim_k * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        return self.head_dim_v * self.n_head_kv


@dataclass(frozen=True, slots=True)
class ModelSpec:
    path: str
    arch: str
    name: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    layers: tuple[LayerSpec, ...]
    token_embd_bytes: int
    output_bytes: int  # output.weight; with tied embeddings, a copy of token_embd
    output_norm_bytes: int
    tied_embeddings: bool
    other_bytes: int  # tensors outside blocks that are neither embeddings nor output
    swa: bool
    moe: bool
    n_expert: int
    file_bytes: int
    output_type: int = -1  # ggml type of output.weight, or of token_embd when tied
    n_swa: int = 0  # the sliding window of the SWA layers (0: none)
    # the widest FFN a token runs through, in floats: n_ff for a dense layer; for a layer of
    # experts, the experts it uses times their width (and a shared expert's)
    ffn_width: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(layer.weight_bytes for layer in self.layers)


# far above any released model (405B llamas have 126 blocks, embeddings of 16384)
MAX_LAYERS = 4096
MAX_EMBD = 1 << 20


# Interleaved sliding-window attention as llama.cpp 0.3.36's loaders set it up, per
# architecture: (period, dense first, window when the file names none). A period p makes
# layer il windowed when il % p < p - 1 (dense first: when il % p != 0); a GGUF key
# {arch}.attention.sliding_window_pattern (one flag per layer, or a period) overrides it.
# Architectures not listed here ignore a sliding_window key (llama, mistral); the dry run's
# "layer N assigned to device X, is_swa = F" lines are what the exact plan goes by.
SWA_PATTERNS: dict[str, tuple[int, bool, int]] = {
    "gemma2": (2, False, 4096),
    "gemma3": (6, False, 0),
    "gemma3n": (5, False, 0),
    "cohere2": (4, False, 0),
    "cohere2moe": (4, True, 0),
    "olmo2": (4, False, 0),
    "gpt-oss": (2, False, 0),
    "plamo3": (8, False, 0),
}


def swa_flags(arch: str, n_layer: int, window: int, pattern: Any) -> list[bool]:
    """Which layers llama.cpp runs with the sliding window (see SWA_PATTERNS)."""
    if arch not in SWA_PATTERNS or window <= 0:
        return [False] * n_layer
    period, dense_first, _ = SWA_PATTERNS[arch]
    if isinstance(pattern, list):
        if len(pattern) != n_layer:
            raise ModelError(f"sliding_window_pattern has {len(pattern)} entries for {n_layer}")
        return [bool(v) for v in pattern]
    if pattern is not None:
        period = int(pattern)
    if period == 0:
        return [True] * n_layer
    if dense_first:
        return [il % period != 0 for il in range(n_layer)]
    return [il % period < period - 1 for il in range(n_layer)]


def _per_layer(value: Any, n_layer: int, name: str) -> list[int]:
    if isinstance(value, list):
        if len(value) != n_layer:
            raise ModelError(f"{name} has {len(value)} entries for {n_layer} layers")
        return [int(v) for v in value]
    return [int(value)] * n_layer


def read_model_spec(path: str | Path) -> ModelSpec:
    """Read a GGUF file's metadata and tensor table (no weights are loaded)."""
    path = Path(path)
    try:
        meta, tensors = read_header(path)
    except (OSError, HeaderError) as exc:
        raise ModelError(f"{path} is not a readable GGUF file ({exc})") from None
    try:
        return _spec(path, meta, tensors)
    except (TypeError, ValueError, OverflowError) as exc:  # a value of the wrong kind
        raise ModelError(f"{path} has a damaged header ({exc}): download the model again") from None


def _spec(path: Path, meta: dict[str, Any], tensors: list[Any]) -> ModelSpec:
    arch = str(meta.get("general.architecture", ""))
    if not arch:
        raise ModelError(f"{path} has no general.architecture: not a llama.cpp model")

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    n_layer = key("block_count")
    n_embd = key("embedding_length")
    if n_layer is None or n_embd is None:
        raise ModelError(f"{path} lacks {arch}.block_count or {arch}.embedding_length")
    n_layer, n_embd = int(n_layer), int(n_embd)  # not numbers: read_model_spec says "damaged"
    # bounds before anything is sized by them: a damaged count must not allocate gigabytes
    if not (0 < n_layer <= MAX_LAYERS and 0 < n_embd <= MAX_EMBD):
        raise ModelError(
            f"{path}: {arch}.block_count {n_layer} or embedding_length {n_embd} is out of "
            f"range (1-{MAX_LAYERS}, 1-{MAX_EMBD}): the file is damaged; download it again"
        )
    heads = _per_layer(key("attention.head_count", 0), n_layer, "head_count")
    heads_kv = _per_layer(key("attention.head_count_kv", heads), n_layer, "head_count_kv")
    default_dim = n_embd // max(1, max(heads) if heads else 1)
    dim_k = int(key("attention.key_length", default_dim))
    dim_v = int(key("attention.value_length", default_dim))
    window = int(key("attention.sliding_window", 0) or 0)
    if not window and arch in SWA_PATTERNS:
        window = SWA_PATTERNS[arch][2]
    pattern = key("attention.sliding_window_pattern")
    if isinstance(pattern, ArrayInfo):  # too long to have been read: the arch's period
        pattern = None
    is_swa = swa_flags(arch, n_layer, window, pattern)
    n_expert = int(key("expert_count", 0) or 0)
    n_ff_raw = key("feed_forward_length", 0)
    n_ff = int(max(n_ff_raw) if isinstance(n_ff_raw, list) else n_ff_raw)
    n_expert_used = int(key("expert_used_count", 0) or 0) if n_expert else 0
    n_ff_exp = int(key("expert_feed_forward_length", 0) or 0) or n_ff
    n_ff_shexp = int(key("expert_shared_feed_forward_length", 0) or 0)

    layer_bytes = [0] * n_layer
    matmuls: list[list[tuple[int, int]]] = [[] for _ in range(n_layer)]
    weight_types: list[list[tuple[str, int]]] = [[] for _ in range(n_layer)]
    routed = [False] * n_layer  # layers with a router: experts
    token_embd = output = output_norm = other = 0
    embd_type = output_type = -1
    n_vocab = 0
    for t in tensors:
        nbytes = t.n_bytes
        m = _BLOCK.match(t.name)
        if m:
            il = int(m.group(1))
            if il >= n_layer:
                raise ModelError(f"tensor {t.name} names a layer past block_count {n_layer}")
            layer_bytes[il] += nbytes
            routed[il] |= t.name.startswith(f"blk.{il}.ffn_gate_inp.")
            if len(t.shape) == 2 and t.name.endswith(".weight"):
                matmuls[il].append((int(t.type), nbytes))
                weight_types[il].append((t.name[m.end() :], int(t.type)))
        elif t.name == "token_embd.weight":
            token_embd, embd_type = nbytes, int(t.type)
            n_vocab = int(t.shape[-1]) if len(t.shape) > 1 else n_vocab
        elif t.name == "output.weight":
            output, output_type = nbytes, int(t.type)
        elif t.name == "output_norm.weight":
            output_norm = nbytes
        else:
            other += nbytes
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, ArrayInfo):
        n_vocab = tokens.count
    tied = output == 0
    ffn_width = n_ff
    if n_expert and any(routed):
        experts = n_ff_exp * max(n_expert_used, 1) + n_ff_shexp
        ffn_width = max(experts, n_ff if not all(routed) else 0)
    layers = tuple(
        LayerSpec(
            il,
            layer_bytes[il],
            heads[il],
            heads_kv[il],
            dim_k,
            dim_v,
            is_swa=is_swa[il],
            matmuls=tuple(matmuls[il]),
            weight_types=tuple(weight_types[il]),
        )
        for il in range(n_layer)
    )
    return ModelSpec(
        path=str(path),
        arch=arch,
        name=str(meta.get("general.name", path.stem)),
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=n_ff,
        n_vocab=n_vocab,
        n_ctx_train=int(key("context_length", 0) or 0),
        layers=layers,
        token_embd_bytes=token_embd,
        output_bytes=output if not tied else token_embd,
        output_norm_bytes=output_norm,
        tied_embeddings=tied,
        other_bytes=other,
        swa=any(is_swa),
        moe=n_expert > 0,
        n_expert=n_expert,
        file_bytes=path.stat().st_size,
        output_type=output_type if not tied else embd_type,
        n_swa=window if any(is_swa) else 0,
        ffn_width=ffn_width,
    )
