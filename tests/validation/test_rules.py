"""The validator's rules as pure functions: facts in, verdicts out."""

from __future__ import annotations

from corral.engine.model.spec import LayerSpec, ModelSpec
from corral.engine.planner.plan import Settings
from corral.engine.planner.validate import (
    BuildFacts,
    DeviceFacts,
    check_builds,
    check_cache,
    check_context,
    errors,
    questions,
)


def spec(head_dim: int = 64, n_ctx_train: int = 4096) -> ModelSpec:
    layers = tuple(LayerSpec(i, 1, 8, 2, head_dim, head_dim) for i in range(4))
    return ModelSpec(
        "m",
        "llama",
        "m",
        4,
        512,
        1024,
        1000,
        n_ctx_train,
        layers,
        1,
        1,
        1,
        True,
        0,
        False,
        False,
        0,
        0,
    )


DESK = BuildFacts("this desktop", "0.3.36", "0c1e570", "7.0.0")


def test_same_build_passes_and_any_difference_is_refused_by_name() -> None:
    assert check_builds(DESK, [BuildFacts("a", "0.3.36", "0c1e570", "7.0.0")]) == []
    [v] = check_builds(DESK, [BuildFacts("host-b", "0.3.30", "deadbee", "7.0.0")])
    assert v.level == "error" and v.host == "host-b"
    assert "deadbee" in v.message and "0c1e570" in v.message and "0.3.36" in v.fix
    [v] = check_builds(DESK, [BuildFacts("host-c", "0.3.36", "0c1e570", "6.1.0")])
    assert "protocol 6.1.0" in v.message and "aborts at the handshake" in v.message


def test_quantized_v_needs_flash_attention() -> None:
    [v] = errors(check_cache(spec(), Settings(type_v="q8_0"), []))
    assert "needs flash attention" in v.message and "--flash-attn on" in v.fix
    assert errors(check_cache(spec(), Settings(type_v="q8_0", flash_attn=True), [])) == []
    assert errors(check_cache(spec(), Settings(type_k="q4_0"), [])) == []  # K alone is fine


def test_quantized_cache_needs_head_dims_divisible_by_32_with_or_without_fa() -> None:
    for fa in (False, True):
        bad = errors(check_cache(spec(80), Settings(type_k="q8_0", flash_attn=fa), []))
        assert len(bad) == 1 and "divisible by 32" in bad[0].message and "f16" in bad[0].fix
    both = check_cache(spec(80), Settings(type_k="q4_0", type_v="q8_0", flash_attn=True), [])
    assert len(errors(both)) == 2
    assert errors(check_cache(spec(80), Settings(flash_attn=True), [])) == []
    assert (
        errors(check_cache(spec(64), Settings(type_k="q4_0", type_v="q4_0", flash_attn=True), []))
        == []
    )


def test_the_device_says_no() -> None:
    s = Settings(type_k="iq4_nl", type_v="iq4_nl", flash_attn=True)
    asked = questions(spec(128), s)
    device = DeviceFacts("gpu-a", "RPC0 (CUDA0)", "CUDA", answers={asked[0]: False})
    [v] = errors(check_cache(spec(128), s, [device]))
    assert v.host == "gpu-a" and "RPC0 (CUDA0)" in str(v) and "asked the device" in v.message
    assert "q8_0" in v.fix


def test_cuda_build_without_the_fa_kernel_for_this_pair_warns() -> None:
    s = Settings(type_k="q4_0", type_v="q8_0", flash_attn=True)
    info = "CUDA : ARCHS = 900 | FA_QUANTS = q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16 |"
    device = DeviceFacts(
        "gpu-a", "RPC0 (CUDA0)", "CUDA", info, {q: True for q in questions(spec(), s)}
    )
    [v] = check_cache(spec(), s, [device])
    assert v.level == "warning" and "runs slowly" in v.message and "q8_0/q8_0" in v.fix


def test_context_longer_than_training_warns() -> None:
    [v] = check_context(spec(n_ctx_train=2048), Settings(n_ctx=4096))
    assert v.level == "warning" and "--ctx 2048" in v.fix
