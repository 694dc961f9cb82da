"""The speed probes read what the model reads: its weight types in its proportions, and its
output layer's type (a CPU may read one k-quant several times slower a byte than another,
so a probe of one type mispredicts a mixed model). Real files: a random llama quantized by
llama.cpp to Q4_K_M (its own mix), and the probes built for it by llama.cpp's quantizer."""

from __future__ import annotations

import collections
from pathlib import Path

from corral.engine.ggml.quantize import quantize
from corral.engine.model.spec import ModelSpec, read_model_spec
from corral.engine.model.synthetic import TinyLlama, write_tiny_llama
from corral.engine.runtime.speeds import probe_bytes, probe_files, probe_key, probe_layers

Q4_K, Q6_K = 12, 14  # ggml types


def _types(spec: ModelSpec) -> collections.Counter[tuple[str, int]]:
    return collections.Counter(wt for layer in spec.layers for wt in layer.weight_types)


def test_probes_carry_the_models_weight_types_and_output_type(tmp_path: Path) -> None:
    src = write_tiny_llama(
        tmp_path / "m.gguf",
        TinyLlama(n_layer=8, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, tied_embeddings=False),
    )
    model = read_model_spec(quantize(src, tmp_path / "m-q4_k_m.gguf", "q4_k_m", threads=1))
    mine = _types(model)
    # llama.cpp's Q4_K_M: some layers' ffn_down and attn_v Q6_K, the rest Q4_K, output Q6_K
    assert mine[("ffn_down.weight", Q6_K)] and mine[("ffn_down.weight", Q4_K)]
    assert model.output_type == Q6_K

    one, small, large, vocab = (read_model_spec(p) for p in probe_files(model, tmp_path / "p"))
    n_small, n_large = probe_layers(model)
    assert (small.n_layer, large.n_layer, vocab.n_layer, one.n_layer) == (
        n_small,
        n_large,
        n_small,
        1,
    )
    # the small probe: the model's proportions (8 layers into n_small, exactly here)
    scale = model.n_layer // n_small
    assert {k: n * scale for k, n in _types(small).items()} == dict(mine)
    # the large: each of the small's layers twice, so their difference reads the same mix
    assert _types(large) == collections.Counter({k: 2 * n for k, n in _types(small).items()})
    assert _types(vocab) == _types(small)
    # the output layer is timed in the model's own type, at the model's vocabulary
    assert vocab.output_type == Q6_K and vocab.n_vocab == model.n_vocab
    blocks, out_scale = probe_bytes(model, probe_files(model, tmp_path / "p"))
    assert blocks[2] - blocks[1] == blocks[1]  # the difference is one small probe's bytes
    assert abs(out_scale - 1.0) < 1e-9  # same type, same shape: nothing to scale


def test_another_mix_is_another_probe(tmp_path: Path) -> None:
    """The cache key names the mix: the same shape quantized otherwise gets its own probes
    (and its own measured speeds)."""
    src = write_tiny_llama(
        tmp_path / "m.gguf", TinyLlama(n_layer=4, n_embd=256, n_ff=512, tied_embeddings=False)
    )
    mixed = read_model_spec(quantize(src, tmp_path / "a.gguf", "q4_k_m", threads=1))
    pure = read_model_spec(quantize(src, tmp_path / "b.gguf", "q4_k_s", threads=1, pure=True))
    assert probe_key(mixed) != probe_key(pure)
    assert probe_key(mixed) == probe_key(read_model_spec(tmp_path / "a.gguf"))
