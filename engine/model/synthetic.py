"""Random-weight llama GGUF models, for the CPU-kernel self-test, tests and benches.

Two architectures: ``llama`` and ``gemma3`` (``arch="gemma3"``: q/k norms, post-attention and
post-FFN norms, and with ``sliding_window`` set, interleaved sliding-window attention: five
windowed layers, then one global, as llama.cpp's gemma3 loader reads it). ``n_expert`` makes
a llama a mixture of experts (Mixtral's layout: a router and stacked expert matrices).

The files load in llama.cpp and generate deterministic gibberish. Vocabulary layout (SPM,
like the original llama tokenizer): ``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens
``<0x00>``..``<0xFF>``, then lowercase letter pieces (``▁``, ``a``..``z``, ``▁a``..``▁z``,
``aa``, ...) up to ``n_vocab``.

The weights are chosen so that greedy decoding behaves well in tests: the rows of the
special tokens are zero (their logit is exactly 0, so EOS is never the argmax and a
generation runs to ``max_tokens``), byte-token rows are scaled down (generated text is
plain ASCII letters and spaces), the vocabulary rows have std 0.1 (tied logits are not
dominated by the last token's own row, which would make greedy output repeat it) and the
layer matrices have std ``1/sqrt(fan_in)`` so every layer changes the output.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import string
from collections.abc import Iterator
from dataclasses import dataclass

import gguf
import numpy as np

N_SPECIAL = 3  # <unk>, <s>, </s>
MIN_VOCAB = N_SPECIAL + 256
EMBD_STD = 0.1  # small, so tied logits are not dominated by the input token's own row
BYTE_ROW_SCALE = 0.05


@dataclass(frozen=True)
class TinyLlama:
    """Hyper-parameters of a tiny llama model; the same spec always gives the same bytes."""

    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int | None = None  # default n_embd // n_head
    n_ff: int = 128
    n_vocab: int = 320  # 3 specials + 256 bytes + 61 letter pieces; must be >= 259
    n_ctx_train: int = 2048
    tied_embeddings: bool = True
    seed: int = 0
    dtype: str = "f32"  # "f32" or "f16" storage of the 2-D tensors (norms stay f32)
    arch: str = "llama"  # or "gemma3"
    sliding_window: int = 0  # gemma3: the window of its SWA layers (0: none)
    n_expert: int = 0  # llama: a mixture of experts (Mixtral's layout) with this many
    n_expert_used: int = 2

    @property
    def n_embd_head(self) -> int:
        """Per-head dimension of q, k and v."""
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    def validate(self) -> None:
        """Raise ValueError if llama.cpp could not load a model with this spec."""
        if self.n_vocab < MIN_VOCAB:
            raise ValueError(f"n_vocab must be >= {MIN_VOCAB} (3 specials + 256 bytes)")
        if self.n_head_kv <= 0 or self.n_head % self.n_head_kv:
            raise ValueError("n_head must be a multiple of n_head_kv")
        if self.arch not in ("llama", "gemma3"):
            raise ValueError(f"arch must be llama or gemma3, not {self.arch!r}")
        if self.sliding_window and self.arch != "gemma3":
            raise ValueError("sliding_window needs arch='gemma3'")
        if self.n_expert and (self.arch != "llama" or not 0 < self.n_expert_used <= self.n_expert):
            raise ValueError("experts need arch='llama' and 0 < n_expert_used <= n_expert")
        if self.n_embd_head <= 0 or self.n_embd_head % 2:
            raise ValueError("head_dim must be a positive even number (rope)")
        if self.dtype not in ("f32", "f16"):
            raise ValueError("dtype must be 'f32' or 'f16'")
        if min(self.n_layer, self.n_embd, self.n_ff, self.n_ctx_train) <= 0:
            raise ValueError("sizes must be positive")


def _pieces() -> Iterator[str]:
    """Yield ``▁``, then letter strings of growing length, each bare and with ``▁``."""
    yield "\u2581"
    for length in itertools.count(1):
        combos = ["".join(c) for c in itertools.product(string.ascii_lowercase, repeat=length)]
        yield from combos
        yield from ("\u2581" + c for c in combos)


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Return the tokens, scores and token types of an SPM vocabulary of n_vocab entries."""
    tt = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL] + [tt.BYTE] * 256
    tokens += itertools.islice(_pieces(), n_vocab - len(tokens))
    types += [tt.NORMAL] * (n_vocab - len(types))
    scores = [0.0] * MIN_VOCAB + [-float(i) for i in range(n_vocab - MIN_VOCAB)]
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama(path: str | os.PathLike[str], spec: TinyLlama = TinyLlama()) -> pathlib.Path:
    """Write a random-weight llama GGUF described by ``spec`` to ``path`` and return the path.

    The output is byte-identical for equal specs. Raises ValueError for an invalid spec.
    """
    spec.validate()
    out = pathlib.Path(path)
    rng = np.random.default_rng(spec.seed)
    wtype = np.float16 if spec.dtype == "f16" else np.float32
    hd, e = spec.n_embd_head, spec.n_embd
    n_q, n_kv = spec.n_head * hd, spec.n_head_kv * hd

    def matrix(rows: int, cols: int) -> np.ndarray:
        # gguf-py shapes are numpy order (rows, cols) == ggml ne {cols, rows}: y = W @ x.
        m: np.ndarray = rng.standard_normal((rows, cols)) / np.sqrt(cols)
        return m.astype(wtype)

    def vocab_matrix() -> np.ndarray:
        m = rng.standard_normal((spec.n_vocab, e)) * EMBD_STD
        m[:N_SPECIAL] = 0.0
        m[N_SPECIAL:MIN_VOCAB] *= BYTE_ROW_SCALE
        return m.astype(wtype)

    def norm(n: int = e) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    gemma = spec.arch == "gemma3"
    w = gguf.GGUFWriter(out, spec.arch)
    w.add_name(f"tiny-{spec.arch}-{spec.n_layer}l-{e}d")
    w.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if spec.dtype == "f16" else gguf.LlamaFileType.ALL_F32
    )
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(e)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    if hd * spec.n_head != e or gemma:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if spec.sliding_window:
        w.add_sliding_window(spec.sliding_window)
    if spec.n_expert:
        w.add_expert_count(spec.n_expert)
        w.add_expert_used_count(spec.n_expert_used)
    tokens, scores, types = _vocab(spec.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    w.add_tensor("token_embd.weight", vocab_matrix())
    w.add_tensor("output_norm.weight", norm())
    if not spec.tied_embeddings:
        w.add_tensor("output.weight", vocab_matrix())
    for i in range(spec.n_layer):
        blk = f"blk.{i}"
        w.add_tensor(f"{blk}.attn_norm.weight", norm())
        w.add_tensor(f"{blk}.attn_q.weight", matrix(n_q, e))
        w.add_tensor(f"{blk}.attn_k.weight", matrix(n_kv, e))
        w.add_tensor(f"{blk}.attn_v.weight", matrix(n_kv, e))
        w.add_tensor(f"{blk}.attn_output.weight", matrix(e, n_q))
        if gemma:
            w.add_tensor(f"{blk}.attn_q_norm.weight", norm(hd))
            w.add_tensor(f"{blk}.attn_k_norm.weight", norm(hd))
            w.add_tensor(f"{blk}.post_attention_norm.weight", norm())
            w.add_tensor(f"{blk}.post_ffw_norm.weight", norm())
        w.add_tensor(f"{blk}.ffn_norm.weight", norm())
        if spec.n_expert:  # numpy (experts, rows, cols) is ggml {cols, rows, experts}
            x = spec.n_expert
            w.add_tensor(f"{blk}.ffn_gate_inp.weight", matrix(x, e).astype(np.float32))
            w.add_tensor(f"{blk}.ffn_gate_exps.weight", np.stack([matrix(spec.n_ff, e)] * x))
            w.add_tensor(f"{blk}.ffn_up_exps.weight", np.stack([matrix(spec.n_ff, e)] * x))
            w.add_tensor(f"{blk}.ffn_down_exps.weight", np.stack([matrix(e, spec.n_ff)] * x))
            continue
        w.add_tensor(f"{blk}.ffn_gate.weight", matrix(spec.n_ff, e))
        w.add_tensor(f"{blk}.ffn_up.weight", matrix(spec.n_ff, e))
        w.add_tensor(f"{blk}.ffn_down.weight", matrix(e, spec.n_ff))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
