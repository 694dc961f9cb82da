"""The speed model's pure functions: prediction, the search, what leaving a host out does.
(That the figures hold against real loads is bench/placement.py's and
tests/runtime/test_speed_plan.py's business.)"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from corral.engine.planner.placement import split_for_counts
from corral.engine.planner.plan import (
    Device,
    MiB,
    Settings,
    compute_bytes,
    estimate,
    kv_bytes,
    weight_bytes,
)
from corral.engine.planner.speed import (
    DeviceSpeed,
    LinkSpeed,
    Speeds,
    describe_speed,
    fastest,
    predict,
    speed_plan,
    step_time,
    without_each,
)
from tests.planner.test_plan import GiB, spec

S = Settings(n_ctx=512)


def devices(*free_gib: float) -> list[Device]:
    return [
        Device(f"RPC{i}", f"host{i}", f"10.0.0.{i}:50052", int(f * GiB), int(f * GiB))
        for i, f in enumerate(free_gib)
    ]


def speeds(layer_ms: list[float], hop_ms: list[float], rtt_ms: float = 0.2) -> Speeds:
    return Speeds(
        base=0.0005,
        devices={
            f"RPC{i}": DeviceSpeed(hop=h / 1000, layer=x / 1000)
            for i, (x, h) in enumerate(zip(layer_ms, hop_ms, strict=True))
        },
        links={f"host{i}": LinkSpeed(rtt_ms / 1000, 1e8) for i in range(len(layer_ms))},
    )


def test_a_step_is_the_base_each_used_devices_hop_and_layers_and_the_logits() -> None:
    m = spec(n_layer=10)
    devs = devices(8, 8)
    sp = speeds([1.0, 2.0], [0.5, 0.7])
    t, shares = step_time(m, devs, [4, 7], sp)  # the output layer with the second device
    output = 2.0e-3 * 30 / 100  # its bytes over a layer's, at that device's layer time
    logits = 4 * m.n_vocab / 1e8
    expected = 0.0005 + 0.5e-3 + 4 * 1e-3 + 0.7e-3 + 6 * 2e-3 + output + logits
    assert abs(t - expected) < 1e-7  # the output norm's bytes count too
    assert abs(sum(s.seconds for s in shares) - t) < 1e-9
    assert shares[0].what.startswith("RPC1")  # the largest share first: the bottleneck
    # a device that holds nothing costs nothing
    t1, _ = step_time(m, devs, [11, 0], sp)
    assert abs(t1 - (0.0005 + 0.5e-3 + 10e-3 + 1e-3 * 0.3 + logits)) < 1e-7


def test_speed_puts_every_layer_on_the_fastest_device_that_holds_them() -> None:
    m = spec(n_layer=10)
    found = fastest(m, devices(8, 8, 8), S, speeds([3.0, 1.0, 2.0], [0.3, 0.3, 0.3]))
    assert found is not None and found[0] == [0, 11, 0]


def test_speed_fills_the_fast_device_to_its_memory_then_the_next_fastest() -> None:
    m = spec(n_layer=20, layer_bytes=100 * MiB)
    # the fast device holds about 6 layers (1 GiB less the reserve and its compute buffer)
    devs = devices(1, 8, 8)
    sp = speeds([1.0, 3.0, 2.0], [0.3, 0.3, 0.3])
    counts, _ = fastest(m, devs, S, sp) or ([], 0.0)
    assert counts[1] == 0 and counts[0] > 0 and counts[2] > 0 and sum(counts) == 21
    plan = speed_plan(m, devs, S, sp)
    assert plan.fits
    # nothing that fits is faster: every split of the 21 layers over the three, checked
    best = min(
        step_time(m, devs, c, sp)[0]
        for c in itertools.product(range(22), repeat=2)
        for c in [(*c, 21 - sum(c))]
        if min(c) >= 0 and estimate(m, devs, S, "x", split_for_counts(c)).fits
    )
    got = step_time(m, devs, [len(plan.layers_of(i)) for i in range(3)], sp)[0]
    assert abs(got - best) < 1e-9


def test_a_slow_link_makes_one_device_better_than_two() -> None:
    m = spec(n_layer=10)
    devs = devices(8, 8)
    # the second device is a little faster per layer but costs 10 ms a step to reach
    sp = speeds([1.0, 0.9], [0.3, 10.0])
    found = fastest(m, devs, S, sp)
    assert found is not None and found[0] == [11, 0]
    # with a fast link it takes every layer
    found = fastest(m, devs, S, speeds([1.0, 0.9], [0.3, 0.3]))
    assert found is not None and found[0] == [0, 11]


def test_prediction_names_the_bottleneck_and_needs_every_used_device_measured() -> None:
    m = spec(n_layer=10)
    devs = devices(8, 8)
    plan = estimate(m, devs, S, "balanced", split_for_counts([5, 6]))
    sp = speeds([1.0, 4.0], [0.3, 0.3])
    p = predict(m, plan, sp)
    assert p is not None and p.tokens_per_s == 1 / p.step
    assert p.bottleneck() is not None and p.bottleneck().what.startswith("RPC1")
    partial = dataclasses.replace(sp, devices={"RPC0": sp.devices["RPC0"]})
    assert predict(m, plan, partial) is None


def test_a_prediction_says_how_uncertain_its_probes_left_it_and_whose_probes() -> None:
    """Each device's probe noise (seconds a step, a layer, the output layer) adds up over the
    layers the plan gives it; a prediction more uncertain than 15 % says so, naming the
    device whose noise counts most and what to do, where it once was silently wrong (the
    H100 host's CPU probes moved 15-35 % between passes)."""
    m = spec(n_layer=10)
    devs = devices(8, 8)
    plan = estimate(m, devs, S, "balanced", split_for_counts([5, 6]))
    sp = speeds([1.0, 1.0], [0.3, 0.3])
    out = dataclasses.replace(sp.devices["RPC1"], output=1e-3)  # its output layer measured
    sp = dataclasses.replace(sp, devices={**sp.devices, "RPC1": out})
    quiet = predict(m, plan, sp)
    assert quiet is not None and quiet.uncertainty == 0.0
    assert not any("uncertain" in line for line in describe_speed(sp, quiet))
    noisy = dataclasses.replace(
        sp,
        devices={
            "RPC0": dataclasses.replace(sp.devices["RPC0"], noise_hop=1e-4, noise_layer=1e-5),
            "RPC1": dataclasses.replace(
                sp.devices["RPC1"], noise_hop=1e-4, noise_layer=0.3e-3, noise_output=2e-4
            ),
        },
        base_noise=1e-4,
    )
    p = predict(m, plan, noisy)
    assert p is not None and p.step == quiet.step  # the figures themselves unchanged
    # RPC1 holds 5 blocks and the output layer: 0.1 + 5 x 0.3 + 0.2 ms; RPC0 0.1 + 5 x 0.01
    expected = (0.1 + 0.15 + 0.1 + 1.5 + 0.2) * 1e-3 / p.step
    assert abs(p.uncertainty - expected) < 1e-9 and p.noisiest == "RPC1"
    lines = describe_speed(noisy, p)
    assert f"(± {100 * expected:.0f} %)" in lines[-3], lines  # beside the prediction
    warned = [line for line in lines if line.startswith("uncertain:")]
    assert len(warned) == 1 and "RPC1" in warned[0] and "--remeasure" in warned[0], lines


def test_leaving_out_a_host_says_what_it_would_cost_or_that_it_would_not_fit() -> None:
    m = spec(n_layer=20, layer_bytes=100 * MiB)
    devs = devices(1, 8)
    sp = speeds([1.0, 3.0], [0.3, 0.3])
    plan = speed_plan(m, devs, S, sp)
    changes = dict(without_each(m, plan, S, sp))
    assert changes["host0"] is not None and changes["host0"] < 0  # slower without the fast one
    assert changes["host1"] is None  # the small one alone cannot hold the model


def test_the_search_over_many_devices_samples_candidate_sets() -> None:
    m = spec(n_layer=40, layer_bytes=10 * MiB)
    devs = devices(*([2] * 20))
    sp = speeds([1.0 + i / 10 for i in range(20)], [0.3] * 20)
    found = fastest(m, devs, S, sp)
    assert found is not None and found[0][0] == 41  # the fastest holds all


def test_a_split_measured_faster_than_the_prediction_is_taken() -> None:
    """A split a reply was timed on before beats a prediction: where the measured step of
    another split that fits is shorter than the chosen one's (as measured, or else as
    predicted), speed takes it; a measured split that is slower changes nothing."""
    m = spec(n_layer=10)
    devs = devices(8, 8)
    sp = speeds([1.0, 1.5], [0.5, 0.5])
    plain = speed_plan(m, devs, S, sp)
    chosen = tuple(len(plain.layers_of(i)) for i in range(2))
    assert chosen == (11, 0)
    predicted = step_time(m, devs, list(chosen), sp)[0]
    # the chosen split ran at a third of its prediction; the other device alone ran fine
    measured = {chosen: 3 * predicted, (0, 11): 1.2 * predicted}
    steered = speed_plan(m, devs, S, sp, measured)
    assert [len(steered.layers_of(i)) for i in range(2)] == [0, 11]
    # measured slower than the prediction of the choice: the choice stays
    assert speed_plan(m, devs, S, sp, {(0, 11): 2 * predicted}).tensor_split == plain.tensor_split
    # a measured split that does not fit (device 1 has room for nothing) is not taken
    small = devices(8, 0.01)
    kept = speed_plan(m, small, S, sp, {chosen: 3 * predicted, (0, 11): predicted / 2})
    assert [len(kept.layers_of(i)) for i in range(2)] == [11, 0]


def test_a_device_in_the_middle_has_room_for_what_the_logits_take_on_the_last() -> None:
    """Only the last device in use holds the output layer and the logits (n_ubatch x
    n_vocab floats in its compute buffer: 96 MiB here). A device in the middle is not
    charged them, so a split that needs its room is found (it was refused as not fitting)."""
    m = spec(n_layer=30, layer_bytes=2 * MiB)
    per = (weight_bytes(m, range(30)) + kv_bytes(m, range(30), S)) / 30
    c_mid = compute_bytes(m, range(30), S, host=False)
    c_last = compute_bytes(m, range(31), S, host=False)
    assert c_last - c_mid > 20 * per  # the logits outweigh 20 layers here
    mid = int(S.reserve + c_mid + 20 * per)
    last = int(S.reserve + c_last + m.output_bytes + 14 * per)
    devs = [
        Device("RPC0", "host0", "10.0.0.0:50052", mid, mid),
        Device("RPC1", "host1", "10.0.0.1:50052", last, last),
    ]
    plan = speed_plan(m, devs, S, speeds([1.0, 1.0], [0.5, 0.5]))
    counts = [len(plan.layers_of(i)) for i in range(2)]
    assert plan.fits and sum(counts) == 31 and min(counts) > 0, counts


def test_each_device_after_the_first_costs_its_switch_and_one_device_none() -> None:
    """Speeds.switch: measured on a probe split over the devices, it charges a step for each
    device after the first; a plan on one device pays none, so a costly switch keeps the
    layers together where splitting them saved less."""
    m = spec(n_layer=10)
    devs = devices(8, 8, 8)
    plain = speeds([1.0, 1.0, 1.0], [0.3, 0.3, 0.3])
    sp = dataclasses.replace(plain, switch=2e-3, switch_batch=5e-3, switch_noise=1e-3)
    for counts in ([11, 0, 0], [4, 7, 0], [3, 4, 4]):
        used = sum(c > 0 for c in counts)
        t0, _ = step_time(m, devs, counts, plain)
        t, shares = step_time(m, devs, counts, sp)
        assert t == pytest.approx(t0 + 2e-3 * (used - 1))
        assert abs(sum(s.seconds for s in shares) - t) < 1e-9
        assert any(s.what == f"passing between {used} devices" for s in shares) == (used > 1)
        tb0, _ = step_time(m, devs, counts, plain, batch=True)
        tb, _ = step_time(m, devs, counts, sp, batch=True)
        assert tb == pytest.approx(tb0 + 5e-3 * (used - 1))
        # its noise counts in the prediction's uncertainty, once for each switch
        plan = estimate(m, devs, S, "x", split_for_counts(counts))
        p0, p = predict(m, plan, plain), predict(m, plan, sp)
        assert p0 is not None and p is not None
        assert p.uncertainty * p.step == pytest.approx(p0.uncertainty * p0.step + 1e-3 * (used - 1))
    # the fast device holds about 6 of the 20 layers: splitting saves some 12 ms a token,
    # which a 20 ms switch takes back, and every layer goes on the slower device
    m = spec(n_layer=20, layer_bytes=100 * MiB)
    devs = devices(1, 8)
    two = speeds([1.0, 3.0], [0.3, 0.3])
    found = fastest(m, devs, S, two)
    assert found is not None and found[0][0] > 0 and found[0][1] > 0, found
    found = fastest(m, devs, S, dataclasses.replace(two, switch=20e-3))
    assert found is not None and found[0] == [0, 21], found
    lines = describe_speed(sp, None)
    assert any("passing between devices: 2.00 ms" in line for line in lines), lines
    assert not any("passing between" in line for line in describe_speed(plain, None))
