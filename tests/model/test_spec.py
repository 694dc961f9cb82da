"""ModelSpec from real GGUF files, checked against the gguf package's own reader."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from corral.engine.model import ModelError, read_model_spec
from corral.engine.model.synthetic import TinyLlama, write_tiny_llama


def _reference(path: Path) -> tuple[list[int], int, int]:
    reader = gguf.GGUFReader(str(path))
    n_layer = int(reader.fields["llama.block_count"].contents())
    per = [0] * n_layer
    for t in reader.tensors:
        if t.name.startswith("blk."):
            per[int(t.name.split(".")[1])] += int(t.n_bytes)
    embd = next(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
    out = sum(int(t.n_bytes) for t in reader.tensors if t.name == "output.weight")
    return per, embd, out


def test_smollm2(smollm2: Path) -> None:
    spec = read_model_spec(smollm2)
    per, embd, _ = _reference(smollm2)
    assert [layer.weight_bytes for layer in spec.layers] == per
    assert spec.token_embd_bytes == embd and spec.tied_embeddings
    assert spec.output_bytes == embd  # tied: the output device holds a copy
    assert (spec.n_layer, spec.n_embd, spec.n_vocab, spec.n_ctx_train) == (30, 576, 49152, 8192)
    assert (spec.layers[0].n_head, spec.layers[0].n_head_kv, spec.layers[0].head_dim_k) == (
        9,
        3,
        64,
    )
    assert not spec.swa and not spec.moe


def test_untied_gqa_and_odd_head_dims(tmp_path: Path) -> None:
    path = write_tiny_llama(
        tmp_path / "m.gguf",
        TinyLlama(
            n_layer=5,
            n_embd=256,
            n_head=4,
            n_head_kv=1,
            head_dim=80,
            n_ff=512,
            tied_embeddings=False,
            dtype="f16",
        ),
    )
    spec = read_model_spec(path)
    per, embd, out = _reference(path)
    assert [layer.weight_bytes for layer in spec.layers] == per
    assert not spec.tied_embeddings and spec.output_bytes == out > 0 and embd > 0
    assert spec.layers[0].head_dim_k == 80 and spec.layers[0].n_embd_k_gqa == 80


@pytest.mark.parametrize("cut", [3, 100, 5000])
def test_truncated_or_foreign_files_are_a_model_error(
    tmp_path: Path, tiny_model: Path, cut: int
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_model.read_bytes()[:cut])
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        read_model_spec(bad)
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(ModelError, match="bad magic"):
        read_model_spec(bad)


def test_a_damaged_layer_count_is_refused_before_anything_is_sized_by_it(
    tmp_path: Path, tiny_model: Path
) -> None:
    """The fuzzer's find: block_count overwritten with 2**32-1 made the reader build lists
    of four billion layers (gigabytes, seconds). Now a ModelError, at once."""
    data = bytearray(tiny_model.read_bytes())
    key = b"llama.block_count"
    at = data.index(key) + len(key)
    assert int.from_bytes(data[at : at + 4], "little") == 4  # GGUF_TYPE_UINT32
    data[at + 4 : at + 8] = (2**32 - 1).to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"block_count 4294967295 .* out of range.*download"):
        read_model_spec(bad)


def test_sliding_window_layers_follow_each_architectures_pattern() -> None:
    from corral.engine.model.spec import swa_flags

    assert swa_flags("gemma3", 12, 1024, None) == [il % 6 < 5 for il in range(12)]
    assert swa_flags("gemma2", 4, 4096, None) == [True, False, True, False]
    assert swa_flags("cohere2moe", 8, 512, None) == [il % 4 != 0 for il in range(8)]
    assert swa_flags("gemma3", 3, 1024, [1, 0, 1]) == [True, False, True]  # the file's flags
    assert swa_flags("gemma3", 4, 1024, 2) == [True, False, True, False]  # the file's period
    assert swa_flags("gemma3", 4, 0, None) == [False] * 4  # no window: no SWA
    assert swa_flags("llama", 4, 4096, None) == [False] * 4  # llama ignores the key
