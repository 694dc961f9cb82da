"""`--strategy speed` over real agents: every device and link is measured through the real
workers and tunnels, the plan avoids the host behind a slow link, the figures are kept and
shown beside every plan, and a reply's measured speed is set beside the prediction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.engine.localagents import LocalAgents

LINKEM = Path(__file__).resolve().parents[2] / "bench" / "linkem.py"


@pytest.fixture(scope="module")
def slow_and_fast() -> Iterator[list[str]]:
    """Two agents: the first behind a link of 15 ms each way, the second direct."""
    with LocalAgents(2) as agents:
        relay = subprocess.Popen(
            [sys.executable, str(LINKEM), agents.addresses[0], "15", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert relay.stdout is not None
            slow = relay.stdout.readline().split()[-1]
            yield [slow, agents.addresses[1]]
        finally:
            relay.kill()
            relay.wait()


def _corral(args: list[str], agents: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    for a in agents:
        args += ["--agent", a]
    return subprocess.run(
        [sys.executable, "-m", "corral.engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, CORRAL_SPEEDS_DIR=str(cache)),
    )


def test_speed_measures_and_avoids_the_slow_link(
    smollm2: Path, slow_and_fast: list[str], tmp_path: Path
) -> None:
    done = _corral(["plan", str(smollm2), "--strategy", "speed", "--json"], slow_and_fast, tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    speed = out["speed"]
    # the relay's 15 ms each way shows in the round trip measured through the agent
    rtts = sorted(link["rtt"] for link in speed["links"].values())
    assert rtts[0] < 0.01 and rtts[1] > 0.025, rtts
    for dev in ("RPC0", "RPC1"):
        assert speed["devices"][dev]["layer"] > 0
        # the rate its layers' weights are read at: to hold against its memory bandwidth
        assert speed["devices"][dev]["weights_read_per_s"] > 1e6
    # the slow-link host's step costs its round trips
    assert speed["devices"]["RPC0"]["hop"] > speed["devices"]["RPC1"]["hop"] + 0.02
    layers = {d["device"]: d["layers"] for d in out["exact"]["devices"]}
    assert layers["RPC0"] == [] and len(layers["RPC1"]) == 31, layers
    predicted = speed["predicted"]
    assert predicted["tokens_per_s"] > 0 and predicted["prompt_tokens_per_s"] > 0
    assert predicted["shares"][0]["seconds"] >= predicted["shares"][-1]["seconds"]
    kept = json.loads((tmp_path / "speeds.json").read_text())["devices"]
    assert len(kept) == 3  # the two workers and this desktop's own part
    # what passing from one device to the next costs, beyond their own figures: timed on
    # the vocabulary probe split over both, kept by their keys in order
    chains = json.loads((tmp_path / "speeds.json").read_text())["chains"]
    ((chain, cost),) = chains.items()
    assert [k.split("|")[0] != "desktop" and k in kept for k in chain.split(";")] == [True] * 2
    assert cost["switch"] >= 0 and cost["noise"] >= 0
    assert speed["switch_s"] == cost["switch"] and speed["switch_noise_s"] == cost["noise"]
    # only the agents that hold layers in the order given are tried last: the fast one,
    # already last; the order stays
    assert len(speed["orders"]) == 1 and not speed["order_note"], speed["orders"]

    # balanced uses both hosts; its prediction comes from the kept figures (the same ones)
    done = _corral(["plan", str(smollm2), "--json"], slow_and_fast, tmp_path)
    assert done.returncode == 0, done.stderr
    balanced = json.loads(done.stdout)["speed"]
    assert balanced["devices"] == speed["devices"]
    assert balanced["predicted"]["tokens_per_s"] < predicted["tokens_per_s"]
    assert {c["host"] for c in balanced["leave_out"]} == set(speed["links"])

    # in words: the link, the devices, the prediction, what leaving a host out would do
    done = _corral(["plan", str(smollm2)], slow_and_fast, tmp_path)
    text = done.stdout
    assert "round trip" in text and "a layer" in text and "predicted:" in text, text
    assert text.count("GB/s)") == 2, text  # each device's weights read at
    assert "leaving out" in text and "% tokens/s" in text, text
    # how far the probes' passes left the figures uncertain: kept with them, and beside
    # the prediction; a host too noisy to predict is named, with what to do
    assert predicted["uncertainty"] >= 0 and predicted["noisiest"] in ("RPC0", "RPC1")
    assert all(speed["devices"][d]["noise_layer"] >= 0 for d in ("RPC0", "RPC1"))
    kept = json.loads((tmp_path / "speeds.json").read_text())
    for dev in kept["devices"].values():
        if dev["layer"] > 0:  # a step and a layer each uncertain by their whole time
            dev["noise_layer"], dev["noise_hop"] = dev["layer"], dev["hop"]
    (tmp_path / "speeds.json").write_text(json.dumps(kept))
    done = _corral(["plan", str(smollm2)], slow_and_fast, tmp_path)
    warned = [line for line in done.stdout.splitlines() if "uncertain:" in line]
    assert len(warned) == 1 and "--remeasure" in warned[0], done.stdout

    # corral agents: each agent's link, and what was measured on its devices
    done = _corral(["agents"], slow_and_fast, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("link from this desktop: round trip") == 2, done.stdout
    assert done.stdout.count("measured: device 0") == 2, done.stdout


def test_a_chat_sets_its_measured_speed_beside_the_prediction(
    smollm2: Path, slow_and_fast: list[str], tmp_path: Path
) -> None:
    args = ["chat", str(smollm2), "--strategy", "speed", "--prompt", "Count to ten."]
    done = _corral([*args, "--max-tokens", "24"], slow_and_fast, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "predicted" in done.stderr and "measured" in done.stderr, done.stderr
    kept = json.loads((tmp_path / "speeds.json").read_text())
    assert kept["errors"], kept  # measured over predicted, kept for the next plans

    # corral doctor reads it: this split within 15 % (or faster) passes; one that ran much
    # slower than predicted (as this one is made to look) is a warning that says what to do
    def speed_check() -> dict:
        done = _corral(["doctor", "--json", "--wait", "0"], [], tmp_path)
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        return next(c for c in lines if c.get("name") == "speed predictions")

    # the next plan of the same split shows what its last reply ran at
    done = _corral(["plan", str(smollm2), "--strategy", "speed", "--json"], slow_and_fast, tmp_path)
    assert done.returncode == 0, done.stderr
    (placement,) = kept["errors"]
    assert json.loads(done.stdout)["speed"]["measured_before"] == kept["errors"][placement]

    # a split measured faster than speed's choice is taken over the prediction: here the
    # choice is made to look as if it ran at a twentieth of its prediction, and balanced's
    # split as if it ran as predicted
    done = _corral(["plan", str(smollm2), "--json"], slow_and_fast, tmp_path)
    counts = {d["device"]: len(d["layers"]) for d in json.loads(done.stdout)["exact"]["devices"]}
    mine = placement.split("=")[0]  # the direct agent's device, which holds every layer
    other = next(k for k in kept["devices"] if not k.startswith("desktop|") and k != mine)
    balanced = f"{other}={counts['RPC0']};{mine}={counts['RPC1']}"
    (tmp_path / "speeds.json").write_text(
        json.dumps(dict(kept, errors={placement: -0.95, balanced: 0.0}))
    )
    done = _corral(["plan", str(smollm2), "--strategy", "speed", "--json"], slow_and_fast, tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert {d["device"]: len(d["layers"]) for d in out["exact"]["devices"]} == counts, out
    assert out["speed"]["measured_before"] == 0.0

    kept["errors"][placement] = -0.4
    (tmp_path / "speeds.json").write_text(json.dumps(kept))
    check = speed_check()
    assert check["status"] == "warn" and "-40 %" in check["detail"], check
    assert "--remeasure" in check["fix"] and "31 layers" in check["detail"], check

    # --remeasure times every device again instead of using what was kept
    before = kept["devices"]
    done = _corral(["plan", str(smollm2), "--remeasure", "--json"], slow_and_fast, tmp_path)
    assert done.returncode == 0, done.stderr
    after = json.loads((tmp_path / "speeds.json").read_text())["devices"]
    assert after.keys() == before.keys() and after != before


@pytest.mark.parametrize(
    "body",
    ['{"devices": [1, 2]}', '{"devices": {"a|0|b|t1|p": {"layer": null}}}', "not json", "[]"],
)
def test_a_damaged_speeds_file_counts_as_empty(body: str, tmp_path: Path) -> None:
    """speeds.json is a cache: a file that is not what Corral writes is measured again,
    never a crash of the plan."""
    from corral.engine.runtime.speeds import SpeedCache

    (tmp_path / "speeds.json").write_text(body)
    cache = SpeedCache(tmp_path / "speeds.json")
    assert cache.entries == {} and cache.errors == {}
    cache.errors["x"] = -0.5
    cache.save()  # and it is written whole again
    assert SpeedCache(tmp_path / "speeds.json").errors == {"x": -0.5}


def test_a_speed_plan_never_unloads_the_loaded_model(
    smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timing devices runs probes in the inference child, in the loaded model's place. A
    plan (the window's preview) that would do so with a model loaded is refused with
    WouldUnload naming the devices, and the chat goes on with the model; a deploy with
    speed measures and loads. (Before, the probe silently took the model's place and the
    chat went on with random weights.)"""
    import asyncio
    import dataclasses

    from corral.engine.runtime.childproto import Done
    from corral.engine.runtime.errors import WouldUnload
    from corral.engine.runtime.session import ChatSession, LoadSettings

    monkeypatch.setenv("CORRAL_SPEEDS_DIR", str(tmp_path))

    async def reply(session: ChatSession) -> Done:
        session.history = []
        done = None
        async for frame in session.ask("Name a colour.", max_tokens=6):
            if isinstance(frame, Done):
                done = frame
        assert done is not None
        return done

    async def run(addresses: list[str]) -> tuple[str, Done, Done, Done, bool]:
        session = ChatSession(addresses)
        try:
            await session.connect(0)
            base = LoadSettings(model=smollm2, n_ctx=1024)
            await session.open_after_connect(base)
            before = await reply(session)
            with pytest.raises(WouldUnload) as refused:
                await session.plan(dataclasses.replace(base, strategy="speed"))
            after = await reply(session)
            await session.open_after_connect(dataclasses.replace(base, strategy="speed"))
            deployed = await reply(session)
            return str(refused.value), before, after, deployed, session.prediction is not None
        finally:
            await session.close()

    with LocalAgents(2) as agents:
        message, before, after, deployed, predicted = asyncio.run(run(agents.addresses))
    assert "RPC0" in message and "RPC1" in message and "unload" in message, message
    assert "Deploy" in message, message
    # the probes load with a 256-cell context: these replies came from the 1024-cell model
    assert before.n_ctx == after.n_ctx == deployed.n_ctx == 1024
    assert after.n_tokens > 0 and predicted
    # measured by the deploy only: the desktop, both devices and passing between them
    kept = json.loads((tmp_path / "speeds.json").read_text())
    assert len(kept["devices"]) == 3 and len(kept["chains"]) == 1


def test_speed_puts_the_hosts_in_the_order_that_predicts_fastest_whatever_order_given(
    smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp puts the output layer on the last device in use, so the agents' order
    matters where both hold layers: speed tries each agent last, takes the order whose plan
    predicts the most tokens/s, and says so. Two real agents (1 and 2 worker threads), each
    left room (its reserve_mib, reloaded with SIGHUP) for 80 % of what the model needs on
    one device: listed either way round, the plan ends on the same host; llama.cpp's own
    layer map agrees with the plan in the order taken, and the model answers."""
    import asyncio
    import contextlib
    import signal
    import time

    from corral.engine.runtime.childproto import Done
    from corral.engine.runtime.session import ChatSession, LoadSettings
    from tests.support.agents import inventory

    monkeypatch.setenv("CORRAL_SPEEDS_DIR", str(tmp_path / "speeds"))
    mib = 1 << 20

    def cpu_free(address: str) -> int:
        return next(d.memory_free for d in inventory(address).devices if d.name == "CPU")

    with contextlib.ExitStack() as stack:
        agents = []
        for threads in (1, 2):
            config = tmp_path / f"agent{threads}.toml"
            config.write_text(f"rpc_threads = {threads}\n")
            local = stack.enter_context(LocalAgents(1, extra_args=("--config", str(config))))
            agents.append((local, config, threads))
        addresses = [local.addresses[0] for local, _, _ in agents]

        async def plan(order: list[str], strategy: str, load: bool = False) -> dict:
            session = ChatSession(order)
            try:
                await session.connect(0)
                settings = LoadSettings(model=smollm2, n_ctx=512, strategy=strategy)
                _, exact = await session.plan(settings)
                used = [i for i in range(len(exact.devices)) if exact.layers_of(i)]
                out = {
                    "need": sum(u.total for u in exact.usage),
                    "hosts": [exact.devices[i].host for i in used],
                    "orders": {hosts: rate for hosts, rate, _ in session.orders},
                    "note": session.order_note,
                    "lines": session.speed_lines(),
                }
                if load:
                    await session.open_after_connect(settings)
                    out["warnings"] = session.warnings
                    async for frame in session.ask("Hi", max_tokens=4):
                        if isinstance(frame, Done):
                            out["reply"] = frame.content
                return out
            finally:
                await session.close(stop_workers=True)

        whole = asyncio.run(plan(addresses[:1], "balanced"))  # the model on one device
        room = int(0.8 * whole["need"]) + LoadSettings(model=smollm2).reserve_mib * mib
        for local, config, threads in agents:
            address = local.addresses[0]
            reserve = (cpu_free(address) - room) // mib
            config.write_text(f"rpc_threads = {threads}\nreserve_mib = {reserve}\n")
            local.procs[0].send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30  # a safety stop: the agent reloads at once
            while cpu_free(address) > room + mib:
                assert time.monotonic() < deadline, "the agent kept its old reserve"
                time.sleep(0.1)
        given = asyncio.run(plan(addresses, "speed"))
        swapped = asyncio.run(plan(addresses[::-1], "speed"))
        assert len(given["hosts"]) == 2 and len(swapped["hosts"]) == 2, (given, swapped)
        assert len(given["orders"]) == 2, given["orders"]  # each agent tried last
        assert given["hosts"][-1] == swapped["hosts"][-1], (given, swapped)
        best = max(given["orders"], key=given["orders"].get)
        assert best[-1] == given["hosts"][-1], (best, given)
        moved = given if given["note"] else swapped
        assert moved["note"] and moved["hosts"][-1] in moved["note"], (given, swapped)
        assert moved["note"] in moved["lines"]
        order = addresses if moved is given else addresses[::-1]
        loaded = asyncio.run(plan(order, "speed", load=True))
    assert not [w for w in loaded["warnings"] if "differs from llama.cpp" in w], loaded
    assert loaded["reply"], loaded
    assert loaded["hosts"] == moved["hosts"], (loaded, moved)
    print(f"{moved['note']}; tried {moved['orders']}")
