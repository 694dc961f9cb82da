"""A real corral-agent behind TLS: pairing, refusals, leases, unpairing, hostile strangers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.engine.agent.server import LEASE_TIMEOUT
from corral.engine.ggml.probe import RpcProbeError
from corral.engine.localagents import LocalAgents
from corral.engine.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    ErrorReply,
    FrameDecoder,
    Hello,
    PairChallenge,
    PairConfirm,
    PairStart,
    ProtocolError,
    encode_frame,
    from_wire,
    to_wire,
)
from corral.engine.runtime.agent_client import AgentClient
from corral.engine.runtime.childproto import Done
from corral.engine.runtime.errors import AgentRequestFailed, NotPaired, PairingFailed
from corral.engine.security.desktop import DesktopKeys
from corral.engine.security.identity import fingerprint
from corral.engine.security.pairing import (
    agent_confirm,
    desktop_confirm,
    desktop_finish,
    desktop_start,
)
from corral.engine.security.tls import client_context
from tests.conftest import corral
from tests.support.strangers import KINDS, SERVED, Crowd, attempt, paired_connects, rss_mib


def _agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.engine.agentcli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture()
def unpaired() -> Iterator[LocalAgents]:
    with LocalAgents(1, pair=False) as agents:
        yield agents


def _new_code(agents: LocalAgents, *extra: str) -> str:
    out = _agent_cli("pair", "--state-dir", str(agents.state_dir(0)), *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("pairing code: ")[1].split()[0]


def test_pair_with_the_cli_use_and_unpair_on_both_sides(
    unpaired: LocalAgents, tmp_path: Path
) -> None:
    env = dict(os.environ, CORRAL_STATE_DIR=str(tmp_path / "desktop"))
    address = unpaired.addresses[0]
    before = corral("agents", "--agent", address, env=env)
    assert before.returncode == 1 and "has not paired with the agent" in before.stderr
    assert "corral pair" in before.stderr and "Traceback" not in before.stderr
    code = _new_code(unpaired)
    paired = corral("pair", address, "--code", code, env=env)
    assert paired.returncode == 0, paired.stderr
    assert corral("agents", "--agent", address, env=env).returncode == 0
    again = corral("pair", address, "--code", code, env=env)  # the code is used up
    assert again.returncode == 0 and "already paired with" in again.stderr, again.stderr
    assert "expired" not in again.stderr
    listed = _agent_cli("paired", "--state-dir", str(unpaired.state_dir(0)))
    assert "connected" not in listed.stdout and len(listed.stdout.splitlines()) == 1
    gone = corral("unpair", address, env=env)
    assert gone.returncode == 0 and "on both sides" in gone.stdout, gone.stderr
    assert (
        "no paired desktops"
        in _agent_cli("paired", "--state-dir", str(unpaired.state_dir(0))).stdout
    )
    after = corral("agents", "--agent", address, env=env)
    assert after.returncode == 1 and "has not paired" in after.stderr


def test_wrong_codes_lock_pairing_and_an_expired_code_is_refused(
    unpaired: LocalAgents, tmp_path: Path
) -> None:
    keys = DesktopKeys(tmp_path / "desktop")
    address = unpaired.addresses[0]
    right = _new_code(unpaired)

    async def attempt(code: str) -> str:
        try:
            await AgentClient(address, keys=keys).pair(code)
        except PairingFailed as exc:
            return str(exc)
        return "paired"

    async def run() -> None:
        for _ in range(5):
            assert "the code is wrong" in await attempt("0000-0000")
        assert "locked after 5 wrong codes" in await attempt(right)
        short = _new_code(unpaired, "--valid", "1")
        await asyncio.sleep(1.5)
        assert "expired" in await attempt(short)
        assert await attempt(_new_code(unpaired)) == "paired"

    asyncio.run(run())
    assert keys.pins.peers()[0].address == address


def _raw_pairing(address: str, frames: list[bytes] | None, code: str) -> tuple[list[bytes], object]:
    """Pair by hand over TLS; with `frames`, replay those bytes instead of computing them.
    Returns (what was sent, the agent's last answer)."""
    host, _, port = address.rpartition(":")
    keys_dir = Path(os.environ["CORRAL_STATE_DIR"])
    me = DesktopKeys(keys_dir / "replayer")
    ctx = client_context(None)
    sock = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10))
    decoder = FrameDecoder()
    sent: list[bytes] = []

    def recv() -> object:
        while True:
            data = sock.recv(65536)
            if not data:
                return None
            got = decoder.feed(data)
            if got:
                return from_wire(got[0])

    def send(frame: bytes) -> None:
        sent.append(frame)
        sock.sendall(frame)

    hello = Hello(role="desktop", proto_major=PROTOCOL_VERSION[0], proto_minor=PROTOCOL_VERSION[1])
    if frames is None:
        fp_agent = fingerprint(sock.getpeercert(binary_form=True) or b"")
        side, a = desktop_start(code)
        send(encode_frame(to_wire(hello)))
        recv()
        send(encode_frame(to_wire(PairStart(1, me.identity.name, me.identity.cert_der, a))))
        challenge = recv()
        assert isinstance(challenge, PairChallenge)
        key = desktop_finish(side, challenge.spake)
        assert challenge.confirm == agent_confirm(key, fp_agent, me.identity.fingerprint)
        send(
            encode_frame(
                to_wire(PairConfirm(2, desktop_confirm(key, fp_agent, me.identity.fingerprint)))
            )
        )
    else:
        send(frames[0])
        recv()
        send(frames[1])
        recv()  # a fresh challenge: the agent's half is new every time
        send(frames[2])
    last = recv()
    sock.close()
    return sent, last


def test_a_replayed_pairing_exchange_is_refused(unpaired: LocalAgents) -> None:
    address = unpaired.addresses[0]
    code = _new_code(unpaired, "--code", "5555-1234")
    recorded, answer = _raw_pairing(address, None, code)
    assert type(answer).__name__ == "PairDone"
    # the same code made valid again, and the recorded bytes replayed: refused
    _new_code(unpaired, "--code", "5555-1234")
    _, answer = _raw_pairing(address, recorded, code)
    assert isinstance(answer, ErrorReply) and answer.code == ErrorCode.PAIRING_REFUSED
    assert "wrong pairing code" in answer.message
    # and once a code is used up, replaying gets nowhere either
    _, answer = _raw_pairing(address, recorded, code)
    assert isinstance(answer, ErrorReply) and "wrong pairing code" in answer.message


def test_1000_strangers_are_served_nothing_and_closed_fast(
    two_agents: LocalAgents, tmp_path: Path
) -> None:
    address = two_agents.addresses[0]
    stranger = DesktopKeys(tmp_path / "stranger")  # a real certificate, never paired
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    answers: set[str] = set()
    for n in range(1000):
        kind = KINDS[n % 4]
        took, got = attempt(address, kind, stranger.ctx)
        times[kind].append(took)
        answers.update(got)
    assert not answers & SERVED, answers
    assert answers <= {
        "Hello",
        "ErrorReply",
        "tls-alert",
    }  # an unpaired desktop may learn versions, no more
    for _ in range(3):  # one that never speaks is dropped too (no ClientHello in 0.75 s)
        took, got = attempt(address, "silent", stranger.ctx)
        times.setdefault("silent", []).append(took)
        answers.update(got)
    worst = {k: max(v) for k, v in times.items()}
    assert max(worst.values()) < 1.0, worst

    async def paired_still_served() -> None:
        client = AgentClient(address)
        await client.connect()
        await client.ping()
        await client.close()

    asyncio.run(paired_still_served())


def test_a_silent_session_of_the_same_desktop_gives_way_to_its_new_connection(
    two_agents: LocalAgents,
) -> None:
    """A link that comes back: this desktop's old session still holds the workers in the
    agent's eyes, but it has missed its pings. While it pings, a second session of the same
    desktop is refused (named as such); once it has been silent for 3 s, the new connection
    takes the workers at once instead of waiting out the 8 s lease timeout."""
    address = two_agents.addresses[1]

    async def run() -> None:
        old = AgentClient(address)
        await old.connect()
        await old.start_rpc(threads=1)
        new = AgentClient(address)
        await new.connect()
        with pytest.raises(AgentRequestFailed, match="another Corral session on that desktop"):
            await new.start_rpc(threads=1)
        assert old._keepalive is not None
        old._keepalive.cancel()  # the old session goes silent, its connection stays open
        await asyncio.sleep(3.5)
        state = await new.start_rpc(threads=1)
        assert state.state == "running"
        tunnel = new.open_tunnel()
        loop = asyncio.get_running_loop()
        assert (await loop.run_in_executor(None, tunnel.probe, 5.0))[0] == 7
        tunnel.close()
        await new.close()
        await old.close()

    asyncio.run(run())


def test_a_second_desktop_gets_in_use_by_name_until_the_first_lets_go(
    two_agents: LocalAgents, tmp_path: Path
) -> None:
    other = DesktopKeys(tmp_path / "other")
    two_agents.pair_with(other)
    address = two_agents.addresses[1]

    async def run() -> None:
        first = AgentClient(address)
        await first.connect()
        await first.start_rpc(threads=1)
        second = AgentClient(address, keys=other)
        await second.connect()
        with pytest.raises(AgentRequestFailed, match="in use by " + first.keys.identity.name):
            await second.start_rpc(threads=1)
        tunnel = second.open_tunnel()  # and no tunnel either
        loop = asyncio.get_running_loop()
        with pytest.raises(RpcProbeError):
            await loop.run_in_executor(None, tunnel.probe, 5.0)
        assert "in use by" in tunnel.last_error
        tunnel.close()
        mine = first.open_tunnel()
        assert (await loop.run_in_executor(None, mine.probe, 5.0))[0] == 7
        mine.close()
        await first.close()  # disconnect releases the lease
        for _ in range(50):
            try:
                await second.start_rpc(threads=1)
                break
            except AgentRequestFailed:
                await asyncio.sleep(0.1)
        theirs = second.open_tunnel()
        assert (await loop.run_in_executor(None, theirs.probe, 5.0))[0] == 7
        theirs.close()
        await second.close()

    asyncio.run(run())


def test_an_agent_side_unpair_ends_the_desktops_session(tmp_path: Path) -> None:
    with LocalAgents(1) as agents:
        keys = DesktopKeys(tmp_path / "d")
        agents.pair_with(keys)

        async def run() -> None:
            client = AgentClient(agents.addresses[0], keys=keys)
            await client.connect()
            out = _agent_cli("unpair", "--state-dir", str(agents.state_dir(0)), keys.identity.name)
            assert out.returncode == 0, out.stderr
            assert await client.wait_lost(5)
            await client.close()
            again = AgentClient(agents.addresses[0], keys=keys)
            with pytest.raises(NotPaired, match="does not accept this desktop"):
                await again.connect()

        asyncio.run(run())


_HOLDER = r"""
import asyncio, sys
from corral.engine.runtime.agent_client import AgentClient
from corral.engine.runtime.childproto import Done
async def main():
    client = AgentClient(sys.argv[1])
    await client.connect()
    await client.start_rpc(threads=1)
    print("held", flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""


def test_a_frozen_lease_holder_loses_the_lease_after_the_timeout(
    two_agents: LocalAgents, tmp_path: Path
) -> None:
    """A desktop that stops talking (frozen, or its link cut) without closing: after
    LEASE_TIMEOUT of silence another desktop may use the workers."""
    address = two_agents.addresses[0]
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, address], stdout=subprocess.PIPE, text=True
    )
    other = DesktopKeys(tmp_path / "other")
    two_agents.pair_with(other)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGSTOP)  # its socket stays open; its pings stop
        stopped = time.monotonic()

        async def run() -> float:
            client = AgentClient(address, keys=other)
            await client.connect()
            try:
                while True:
                    try:
                        await client.start_rpc(threads=1)
                        return time.monotonic() - stopped
                    except AgentRequestFailed as exc:
                        assert "in use by" in str(exc)
                        assert time.monotonic() - stopped < 40, "the lease never timed out"
                        await asyncio.sleep(0.5)
            finally:
                await client.stop_rpc()
                await client.close()

        waited = asyncio.run(run())
        assert waited > LEASE_TIMEOUT - 1, waited  # not taken away while it may still talk
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("given", ["argument", "file", "stdin"])
def test_a_scripted_pair_sent_as_soon_as_the_port_accepts_succeeds(
    tmp_path: Path, given: str
) -> None:
    """The pairing code is active before the port opens: a setup script that pairs as soon
    as it can connect is not told "no pairing code active" (the agent announces on mDNS,
    here on loopback only, between opening its port and printing its code). The code comes
    on the command line, or out of `ps`'s sight from a file or stdin."""
    with socket.socket() as s:  # a free port for the agent (tests only: the race is ours)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "4821-0937"
    (tmp_path / "code").write_text(code + "\n")
    how = {
        "argument": ["--pairing-code", code],
        "file": ["--pairing-code-file", str(tmp_path / "code")],
        "stdin": ["--pairing-code-file", "-"],
    }[given]
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "corral.engine.agentcli",
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(tmp_path / "agent"),
            "--log-dir",
            str(tmp_path / "agent" / "log"),
            "--advertise-interface",
            "lo",
            *how,
            "--exit-with-parent",
        ],
        stdin=(tmp_path / "code").open() if given == "stdin" else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    if given != "argument":
        assert code not in Path(f"/proc/{agent.pid}/cmdline").read_text()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert agent.poll() is None, "the agent exited at start"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the agent never opened its port"
                time.sleep(0.01)
        env = dict(os.environ, CORRAL_STATE_DIR=str(tmp_path / "desktop"))
        paired = corral("pair", f"127.0.0.1:{port}", "--code", code, env=env)
        assert paired.returncode == 0, paired.stderr
        assert "no pairing code active" not in paired.stderr
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(timeout=30)


def test_strangers_frames_cannot_blow_up_the_agent(two_agents: LocalAgents) -> None:
    """Four certificate-less peers each send Hello and a 4 MiB frame of nested empty arrays
    at once: an unpaired peer's frames are capped at 16 KiB, so they are refused by their
    length, never decoded; the agent stays small and its paired desktop is served."""
    address = two_agents.addresses[0]
    pid = two_agents.procs[0].pid
    before = rss_mib(pid)
    peak = before
    with Crowd(address, holders=0, bombs=4) as crowd:
        while crowd.alive():
            peak = max(peak, rss_mib(pid))
            time.sleep(0.01)
    assert peak - before < 64, (before, peak)
    assert paired_connects(address, 1) == 1


def test_an_unpaired_peer_is_held_to_small_frames_and_a_paired_one_is_not() -> None:
    """The limits themselves, on the decoder the channel uses (pure)."""
    from corral.engine.protocol import CONTROL, UNPAIRED, FrameDecoder

    big = encode_frame({"op": "x", "blob": b"\0" * 100_000})
    strict = FrameDecoder(UNPAIRED)
    strict.push(big)
    with pytest.raises(ProtocolError, match="exceeds the 16384-byte limit"):
        strict.ready()
    many = encode_frame({"items": list(range(1000))})
    with pytest.raises(ProtocolError):
        FrameDecoder(UNPAIRED).feed(many)
    assert FrameDecoder(CONTROL).feed(big + many)[1]["items"][-1] == 999


@pytest.mark.parametrize("code_active", [False, True])
def test_130_strangers_holding_connections_leave_room_for_the_paired_desktop(
    two_agents: LocalAgents, code_active: bool
) -> None:
    """130 certificate-less peers finish TLS, send Hello and hold (and connect again when
    closed), and two send 4 MiB frames of nested arrays: the paired desktop still connects 8
    times of 8 and the agent stays small. With no pairing code active the holders are
    answered and closed at once; with one, only a few per address may wait."""
    address = two_agents.addresses[1]
    pid = two_agents.procs[1].pid
    if code_active:
        two_agents.issue_code(1)
    before = rss_mib(pid)
    with Crowd(address, holders=130, bombs=2) as crowd:
        time.sleep(2)  # they are all in, or have been turned away
        assert paired_connects(address) == 8
        assert rss_mib(pid) - before < 64
    if not code_active:  # answered and closed by the agent, each of them, not held
        assert crowd.closed_by_agent >= 130, (crowd.closed_by_agent, len(crowd.held))


def test_direct_rpc_needs_the_desktop_to_opt_in_too(
    smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent started with --trusted-network offers its worker unauthenticated; the desktop
    takes that only with CORRAL_TRUSTED_NETWORK=1, else it keeps the tunnel and says so."""
    from corral.engine.runtime.errors import RuntimeFailure
    from corral.engine.runtime.session import ChatSession, LoadSettings

    async def load(trusted: bool | None) -> tuple[list[str], tuple[str, ...], list[str]]:
        session = ChatSession(agents.addresses, trusted_network=trusted)
        try:
            await session.open(LoadSettings(model=smollm2, n_ctx=512))
            reply = [f async for f in session.ask("Hi", max_tokens=2)]
            assert isinstance(reply[-1], Done)
            return list(session.tunnels), session.warnings, [w.endpoint for w in session.workers]
        finally:
            await session.close(stop_workers=True)

    with LocalAgents(1, extra_args=("--trusted-network",)) as agents:
        monkeypatch.delenv("CORRAL_TRUSTED_NETWORK", raising=False)
        tunnels, warnings, _ = asyncio.run(load(None))
        assert tunnels == agents.addresses  # the authenticated tunnel, not the direct port
        assert any("CORRAL_TRUSTED_NETWORK=1" in w for w in warnings)
        monkeypatch.setenv("CORRAL_TRUSTED_NETWORK", "1")
        tunnels, warnings, endpoints = asyncio.run(load(None))
        assert tunnels == [] and endpoints[0] and not any("offers" in w for w in warnings)
    monkeypatch.setenv("CORRAL_TRUSTED_NETWORK", "yes")
    with pytest.raises(RuntimeFailure, match="CORRAL_TRUSTED_NETWORK='yes' is not a setting"):
        ChatSession([])


def test_a_chosen_pairing_code_is_no_easier_to_guess_than_a_random_one(tmp_path: Path) -> None:
    weak = _agent_cli("--state-dir", str(tmp_path), "--pairing-code", "123456")
    assert weak.returncode == 2 and "easier to guess than the random one" in weak.stderr
    assert "Traceback" not in weak.stderr
    from corral.engine.security.pairing import check_chosen_code

    assert check_chosen_code("4821-0937") and check_chosen_code("bluefox")


def test_the_admin_socket_folder_must_be_this_users_own(tmp_path: Path) -> None:
    """The fallback folder in /tmp could be made first by another local user, to listen for
    the pairing codes sent to the agent: neither the agent nor `corral-agent pair` uses one
    that is not this user's and closed to others."""
    from corral.engine.agent.admin import _owned_folder

    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    with pytest.raises(ConnectionError, match="only it can open"):
        _owned_folder(mine)  # a client does not fix it: it refuses
    _owned_folder(mine, close_it=True)  # the agent closes its own folder
    assert mine.stat().st_mode & 0o777 == 0o700
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(ConnectionError):
        _owned_folder(link, close_it=True)
    if os.getuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(ConnectionError, match="another local user"):
            _owned_folder(theirs, close_it=True)
