"""Fault trials against real processes: the building blocks of the reliability suite.

Each trial sets up what it needs (real agents, real RPC workers, the real inference child),
injects one fault, and returns a Trial: whether Corral behaved — the desktop kept running,
the error named the host, state survived, it was usable again — and how long it took to
notice. bench/reliability.py runs every trial 20+ times for docs/RELIABILITY.md;
tests/reliability runs each once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path
from corral.engine.runtime import history
from corral.engine.runtime.childproto import Done, Token
from corral.engine.runtime.errors import RuntimeFailure
from corral.engine.runtime.session import ChatSession, LoadSettings
from corral.engine.security.desktop import desktop_dir
from tests.support.agents import LONG_PROMPT, chat_args, stop


@dataclass
class Trial:
    fault: str
    ok: bool
    detect_s: float | None = None  # fault → the desktop knows, with a message naming the host
    recover_s: float | None = None  # fault → answering again
    note: str = ""


class TrialFailed(AssertionError):
    pass


def settings(model: Path | None = None) -> LoadSettings:
    return LoadSettings(model=model or default_model_path(), n_ctx=2048)


def desktop_files(root: Path | None = None) -> dict[str, str]:
    """sha256 of every file the desktop keeps (identity, pins, saved chats), or of every
    file under `root` (an agent's state dir)."""
    root = root or desktop_dir()
    out = {}
    for path in sorted(root.rglob("*")) if root.exists() else []:
        if path.is_file() and not path.name.endswith(".sock"):
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _identity_and_pins(state_dir: Path) -> dict[str, str]:
    return {
        k: v
        for k, v in desktop_files(state_dir).items()
        if k.startswith("identity") or k == "paired-desktops.json"
    }


async def answer(session: ChatSession, text: str = "Hello!", tokens: int = 4) -> str:
    last: dict[str, Any] = {}
    async for frame in session.ask(text, max_tokens=tokens):
        last = frame
    if not isinstance(last, Done):
        raise TrialFailed(f"no answer: last frame {last}")
    return str(last.content)


async def fail_while_generating(
    session: ChatSession, fault: Callable[[], None]
) -> tuple[float, str]:
    """Inject `fault` after the first token of a long reply; (seconds to the error, its text)."""
    at = 0.0
    try:
        async for frame in session.ask(LONG_PROMPT, max_tokens=3000, ignore_eos=True):
            if isinstance(frame, Token) and not at:
                fault()
                at = time.monotonic()
    except RuntimeFailure as exc:
        return time.monotonic() - at, str(exc)
    raise TrialFailed("the reply ran to its end although the fault was injected")


async def fail_while_loading(session: ChatSession, fault: Callable[[], None]) -> tuple[float, str]:
    """Reload, injecting `fault` at the first sign of the upload; (seconds to the error, text)."""
    at = 0.0

    def progress(fraction: float) -> None:
        nonlocal at
        if not at and fraction > 0:
            fault()
            at = time.monotonic()

    try:
        await session.reload(on_progress=progress)
    except RuntimeFailure as exc:
        if not at:
            raise TrialFailed(f"the load failed before the fault: {exc}") from None
        return time.monotonic() - at, str(exc)
    raise TrialFailed(
        "the load finished although the fault was injected"
        if at
        else "the load reported no progress to inject the fault at"
    )


def _kill(pid: int) -> Callable[[], None]:
    return lambda: os.kill(pid, signal.SIGKILL)


async def _fail_during(
    during: str, session: ChatSession, fault: Callable[[], None]
) -> tuple[float, str]:
    """`fault` while loading ("load") or while generating; (seconds to the error, its text)."""
    if during == "load":
        return await fail_while_loading(session, fault)
    return await fail_while_generating(session, fault)


async def _checked(
    name: str,
    session: ChatSession,
    victim: str,
    inject: Callable[[ChatSession], Any],
    must_name: bool = True,
) -> Trial:
    """The common frame: a chat with history, a saved copy, the fault, checks, a reload."""
    await answer(session)
    before = list(session.history)
    history.save("reliability", before)
    files = desktop_files()
    took, message = await inject(session)
    problems = []
    if must_name and victim not in message:
        problems.append(f"the error does not name {victim}: {message}")
    if session.history != before:
        problems.append("the history changed")
    if history.load("reliability") != before or desktop_files() != files:
        problems.append("a file the desktop keeps changed")
    t0 = time.monotonic()
    await session.reload()
    await answer(session, "Still there?")
    return Trial(name, not problems, took, time.monotonic() - t0 + took, "; ".join(problems))


async def worker_kill(agents: LocalAgents, during: str) -> Trial:
    """kill -9 of agent 0's RPC worker while generating or while loading."""
    session = ChatSession(agents.addresses)
    try:
        await session.open(settings())

        async def inject(s: ChatSession) -> tuple[float, str]:
            return await _fail_during(during, s, _kill(s.workers[0].pid))

        return await _checked(
            f"worker kill -9 during {during}", session, agents.addresses[0], inject
        )
    finally:
        await session.close()


async def agent_kill(stays: LocalAgents, during: str) -> Trial:
    """kill -9 of a whole agent while generating or loading; the reload goes on without it."""
    with LocalAgents(1) as goes:
        session = ChatSession([stays.addresses[0], goes.addresses[0]])
        try:
            await session.open(settings())

            async def inject(s: ChatSession) -> tuple[float, str]:
                return await _fail_during(during, s, _kill(goes.procs[0].pid))

            trial = await _checked(
                f"agent kill -9 during {during}", session, goes.addresses[0], inject
            )
            if session.dropped != [goes.addresses[0]]:
                trial.ok = False
                trial.note += f"; reload left out {session.dropped}"
            return trial
        finally:
            await session.close()


async def child_kill(agents: LocalAgents) -> Trial:
    """kill -9 of the desktop's own inference child during generation."""
    session = ChatSession(agents.addresses)
    try:
        await session.open(settings())

        async def inject(s: ChatSession) -> tuple[float, str]:
            assert s.child.proc is not None
            return await fail_while_generating(s, _kill(s.child.proc.pid))

        return await _checked("inference child kill -9", session, "", inject, must_name=False)
    finally:
        await session.close()


async def agent_restart(agents: LocalAgents) -> Trial:
    """kill -9 of agent 1, started again on the same address and state dir: the session
    loads over it again without pairing anew. recover_s: kill → answering over both."""
    session = ChatSession(agents.addresses)
    try:
        await session.open(settings())
        await answer(session)
        before = list(session.history)
        files = desktop_files()
        agent_files = _identity_and_pins(agents.state_dir(1))
        t0 = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, agents.restart, 1)
        started = time.monotonic() - t0
        deadline = t0 + 30
        while True:
            try:
                result = await session.reload()
                break
            except RuntimeFailure:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await answer(session, "Back?")
        took = time.monotonic() - t0
        problems = []
        hosts = {p.host for p in result.placements if p.layers}
        if session.dropped or not any(agents.addresses[1] in h for h in hosts):
            problems.append(f"the restarted agent was not used: {sorted(hosts)}")
        if session.history[:2] != before or desktop_files() != files:
            problems.append("the desktop's state changed")
        if _identity_and_pins(agents.state_dir(1)) != agent_files:
            problems.append("the agent's identity or pairings changed")
        return Trial(
            "agent restart (same host, no re-pairing)",
            not problems,
            None,
            took,
            f"agent listening again after {started:.2f} s; " + "; ".join(problems),
        )
    finally:
        await session.close()


def disk_full(tmp: Path) -> Trial:
    """The desktop's state dir on a full filesystem: saves fail with a message, and the
    files already there are left whole (atomic writes)."""
    from corral.engine.security.files import SecurityFileError
    from corral.engine.security.pins import Peer, PinStore

    mnt = tmp / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)], check=True)
    old_env = os.environ.get("CORRAL_STATE_DIR")
    os.environ["CORRAL_STATE_DIR"] = str(mnt)
    try:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        history.save("kept", messages)
        store = PinStore(mnt / "paired-agents.json")
        from corral.engine.security.identity import load_or_create

        ident = load_or_create(mnt / "identity", "fuzz")
        store.add(Peer(ident.fingerprint, "agent", ident.cert_der, "0123456789ab", "10.0.0.1:7340"))
        pins_before = store.path.read_bytes()
        with contextlib.suppress(OSError), open(mnt / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 65536)
        problems = []
        t0 = time.monotonic()
        big = messages * 2000
        try:
            history.save("kept", big)
            problems.append("saving a chat on a full disk did not fail")
        except history.HistoryError as exc:
            if "No space" not in str(exc):
                problems.append(f"unclear message: {exc}")
        try:
            store.add(Peer("ab" * 32, "other", b"x" * 4000, "fedcba987654", "10.0.0.2:7340"))
            problems.append("pinning on a full disk did not fail")
        except SecurityFileError as exc:
            if "disk full" not in str(exc):
                problems.append(f"unclear message: {exc}")
        took = time.monotonic() - t0
        if history.load("kept") != messages:
            problems.append("the saved chat was damaged")
        if store.path.read_bytes() != pins_before or len(store.peers()) != 1:
            problems.append("the pin file was damaged")
        leftovers = [p.name for p in mnt.rglob("*.tmp")]
        if leftovers:
            problems.append(f"temporary files left: {leftovers}")
        return Trial("disk full in the state dir", not problems, took, None, "; ".join(problems))
    finally:
        if old_env is None:
            os.environ.pop("CORRAL_STATE_DIR", None)
        else:
            os.environ["CORRAL_STATE_DIR"] = old_env
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def agent_disk_full(tmp: Path) -> Trial:
    """A real agent whose state dir is on a full filesystem: a desktop that pairs gets a
    message naming the host and the disk, the agent keeps serving the desktop it already
    paired with, its pin file is unchanged, and the same code pairs once there is space."""
    mnt = tmp / "agent-full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    code = "7340-7341"
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "corral.engine.agentcli",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(mnt / "agent"),
            "--log-dir",
            str(tmp / "agent-log"),
            "--no-advertise",
            "--exit-with-parent",
            "--pairing-code",
            code,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )

    def corral(desktop: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, CORRAL_STATE_DIR=str(tmp / desktop))
        return subprocess.run(
            [sys.executable, "-m", "corral.engine.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    try:
        assert agent.stdout is not None
        address = agent.stdout.readline().strip().rsplit(" ", 1)[-1]
        first = corral("first", "pair", address, "--code", code)
        if first.returncode != 0:
            raise TrialFailed(f"the first desktop could not pair: {first.stderr[-300:]}")
        state = str(mnt / "agent")
        new_code = subprocess.run(
            [sys.executable, "-m", "corral.engine.agentcli", "pair", "--state-dir", state],
            capture_output=True,
            text=True,
            timeout=60,
        )
        code = new_code.stdout.split("pairing code: ")[1].split()[0]
        pins = {p: p.read_bytes() for p in (mnt / "agent").rglob("*") if p.is_file()}
        with contextlib.suppress(OSError), open(mnt / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 65536)
        problems = []
        t0 = time.monotonic()
        second = corral("second", "pair", address, "--code", code)
        took = time.monotonic() - t0
        said = second.stdout + second.stderr
        if second.returncode == 0:
            problems.append("pairing on a full disk succeeded")
        elif "No space left" not in said or "free space" not in said.lower() or "Traceback" in said:
            problems.append(f"unclear message: {said[-400:]}")
        if agent.poll() is not None:
            problems.append("the agent exited")
        if corral("first", "agents", "--agent", address).returncode != 0:
            problems.append("the desktop paired before was not served")
        now = {p: p.read_bytes() for p in (mnt / "agent").rglob("*") if p.is_file()}
        if now != pins:
            problems.append("the agent's files changed")
        (mnt / "filler").unlink()
        again = corral("second", "pair", address, "--code", code)
        if again.returncode != 0:
            problems.append(f"the same code did not pair once there was space: {again.stderr}")
        return Trial(
            "disk full in the agent's state dir", not problems, took, None, "; ".join(problems)
        )
    finally:
        agent.kill()
        agent.wait()
        if agent.stdout is not None:
            agent.stdout.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


RUN_MARK = "CORRAL_RELIABILITY_RUN"


def mark_run() -> str:
    """Tag this process's environment, so every process it starts (agents, their workers,
    inference children, however reparented) can be found again by `left_behind`."""
    os.environ[RUN_MARK] = os.environ.get(RUN_MARK) or f"{os.getpid()}-{time.time_ns()}"
    return os.environ[RUN_MARK]


def left_behind(grace: float = 10.0) -> list[str]:
    """Processes started by this run (they carry its mark) still alive, besides this one,
    after `grace` seconds for those already killed to finish dying."""
    deadline = time.monotonic() + grace
    while True:
        found = _marked()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _marked() -> list[str]:
    tag = f"{RUN_MARK}={os.environ.get(RUN_MARK, '')}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if tag in (entry / "environ").read_bytes().split(b"\0"):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name} {cmd.strip()}")
        except OSError:
            continue
    return found


def partition(lan: Any, mode: str, model: Path, desktop: int = 3) -> Trial:
    """`corral chat` in host 3 over the agents of hosts 1 and 2; host 2 is cut off mid-reply
    ("link down": its interface goes down; "silent drop": frames vanish, the link stays up).
    The chat must name host 2 (detect_s: cut → that `crash` event), load the model again on
    host 1 alone by itself and answer (a `recovered` event leaving host 2 out, then `done`);
    recover_s: link back → a chat over both answers."""
    agents = [f"{lan.address(1)}:7340", f"{lan.address(2)}:7340"]
    proc = lan.spawn(
        desktop,
        [*chat_args(model, agents, long=True), "--max-tokens", "300"],  # the last wins
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cut = (lambda on: lan.link(2, not on)) if mode == "link down" else (lambda on: lan.drop(2, on))
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if '"token"' not in first:
        proc.kill()
        _, err = proc.communicate()
        raise TrialFailed(f"the chat did not start: {first} {err[-500:]}")
    cut(True)
    t0 = time.monotonic()
    problems = []
    detect = None
    events: dict[str, Any] = {}
    try:
        for line in proc.stdout:
            event = json.loads(line)
            if event["type"] == "crash" and detect is None:
                detect = time.monotonic() - t0
            events[event["type"]] = event
            if event["type"] in ("done", "error") or time.monotonic() - t0 > 90:
                break
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        problems.append("the chat hung after the partition")
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
        cut(False)
    crash = str(events.get("crash", {}).get("message", ""))
    if lan.address(2) not in crash:
        problems.append(f"no crash naming host 2: {str(events)[-300:]} {err.strip()[-300:]}")
    recovered = str(events.get("recovered", {}).get("message", ""))
    if f"without {lan.address(2)}" not in recovered or "done" not in events:
        problems.append(f"not answered on host 1 alone: {recovered} {str(events)[-300:]}")
    if proc.returncode != 0:
        problems.append(f"exit {proc.returncode}: {err.strip()[-300:]}")
    t1 = time.monotonic()
    while True:
        again = subprocess.run(
            ["ip", "netns", "exec", lan.ns(desktop), *chat_args(model, agents, long=False)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if again.returncode == 0:
            break
        if time.monotonic() - t1 > 60:
            problems.append(f"not usable 60 s after the link came back: {again.stderr[-300:]}")
            break
        time.sleep(0.5)
    return Trial(
        f"partition: {mode}", not problems, detect, time.monotonic() - t1, "; ".join(problems)
    )


def rss_mib(pid: int) -> float:
    """Resident memory of a process (and 0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def many_clients(address: str, n: int = 100, rounds: int = 5) -> dict[str, Any]:
    """n paired control connections opened at once to one agent, then `rounds` of an
    inventory request on every one of them concurrently."""
    from corral.engine.runtime.agent_client import AgentClient

    clients = [AgentClient(address) for _ in range(n)]
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(c.connect(timeout=20) for c in clients), return_exceptions=True
    )
    connect_s = time.monotonic() - t0
    failed = [str(r) for r in results if isinstance(r, BaseException)]
    latencies: list[float] = []

    async def one(c: AgentClient) -> None:
        t = time.perf_counter()
        await c.inventory()
        latencies.append(time.perf_counter() - t)

    errors: list[str] = []
    try:
        for _ in range(rounds):
            done = await asyncio.gather(
                *(one(c) for c in clients if c.hello is not None), return_exceptions=True
            )
            errors += [str(r) for r in done if isinstance(r, BaseException)]
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    latencies.sort()
    return {
        "clients": n,
        "connected": n - len(failed),
        "connect_all_s": connect_s,
        "requests": len(latencies),
        "request_p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "request_p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
        "errors": (failed + errors)[:3],
        "n_errors": len(failed) + len(errors),
    }


def flood(
    address: str, agent_pid: int, seconds: float = 60, per_minute: int = 10_000
) -> dict[str, Any]:
    """Connection attempts without a paired certificate at `per_minute` from one peer, while
    a paired session on the same agent keeps generating; the session's tokens/s before and
    during, and the agent's memory over time."""
    import tempfile
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from corral.engine.security.desktop import DesktopKeys
    from tests.support.strangers import KINDS, SERVED, attempt

    stranger = DesktopKeys(Path(tempfile.mkdtemp(prefix="corral-stranger-")))
    phase = {"name": "baseline"}
    rates: dict[str, list[float]] = {"baseline": [], "flood": []}
    session_errors: list[str] = []
    stop = threading.Event()
    ready = threading.Event()

    def chat() -> None:
        async def run() -> None:
            session = ChatSession([address])
            try:
                await session.open(settings())
                ready.set()
                while not stop.is_set():
                    t, n = time.monotonic(), 0
                    async for frame in session.ask(
                        "Tell me a story.", max_tokens=48, ignore_eos=True
                    ):
                        n += isinstance(frame, Token)
                    session.history = []
                    rates[phase["name"]].append(n / (time.monotonic() - t))
            except Exception as exc:
                session_errors.append(str(exc))
            finally:
                ready.set()
                await session.close()

        asyncio.run(run())

    talker = threading.Thread(target=chat)
    talker.start()
    ready.wait(120)
    deadline = time.monotonic() + 120
    while len(rates["baseline"]) < 3 and time.monotonic() < deadline and not session_errors:
        time.sleep(0.2)  # three whole replies before the flood
    rss = [rss_mib(agent_pid)]
    phase["name"] = "flood"
    served: list[str] = []
    attempts = 0
    interval = 60 / per_minute
    t0 = time.monotonic()

    def one(n: int) -> None:
        try:
            _, got = attempt(address, KINDS[n % len(KINDS)], stranger.ctx)
            served.extend(g for g in got if g in SERVED)
        except OSError:
            pass  # refused at a full backlog is fine

    with ThreadPoolExecutor(16) as pool:
        next_sample = t0 + 1
        while time.monotonic() - t0 < seconds:
            due = t0 + attempts * interval
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            pool.submit(one, attempts)
            attempts += 1
            if time.monotonic() >= next_sample:
                rss.append(rss_mib(agent_pid))
                next_sample += 1
        sent = time.monotonic() - t0
    took = time.monotonic() - t0
    time.sleep(5)
    rss.append(rss_mib(agent_pid))
    stop.set()
    talker.join(120)
    base, during = rates["baseline"], rates["flood"]
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else 0.0  # noqa: E731
    return {
        "attempts": attempts,
        "per_minute": attempts / sent * 60,
        "all_answered_after_s": took,
        "served": len(served),
        "agent_rss_mib": {"before": rss[0], "peak": max(rss), "after": rss[-1]},
        "session_tokens_s": {"baseline": med(base), "flood": med(during)},
        "session_errors": session_errors,
    }


async def soak(
    agents: LocalAgents,
    minutes: float = 0.0,
    restart_every: float = 120.0,
    *,
    counts: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Chat without pause over the agents for `minutes`; every `restart_every` seconds kill -9
    a worker mid-reply (the agents take turns) and load again. Counts what went wrong and
    how memory moved: desktop (this process) and agents, warm vs end.

    With `counts=(replies, restarts)` it goes by events instead of the clock (tests: a busy
    machine makes any number per minute fail): a restart after every other reply, until
    both counts are reached."""
    session = ChatSession(agents.addresses)
    pids = [p.pid for p in agents.procs]
    samples: list[tuple[float, float, list[float]]] = []  # (t, desktop MiB, agents MiB)
    out: dict[str, Any] = {"replies": 0, "tokens": 0, "restarts": 0, "errors": []}
    start = time.monotonic()
    last_restart = start
    since_restart = 0  # replies since the last restart
    victim = 0

    def going_on() -> bool:
        if counts is None:
            return time.monotonic() - start < minutes * 60
        # errors end it too: the test fails on them, with no endless loop first
        return (out["replies"], out["restarts"]) < counts and len(out["errors"]) < 5

    def restart_due() -> bool:
        if counts is None:
            return time.monotonic() - last_restart >= restart_every
        return since_restart >= 2 and out["restarts"] < counts[1]

    try:
        await session.open(settings())
        while going_on():
            if restart_due():
                since_restart = 0
                fault = _kill(session.workers[victim].pid)
                try:
                    await fail_while_generating(session, fault)
                except TrialFailed as exc:
                    out["errors"].append(str(exc))
                await session.reload()
                out["restarts"] += 1
                victim = (victim + 1) % len(agents.addresses)
                last_restart = time.monotonic()
            try:
                async for frame in session.ask("Tell me about the sea.", max_tokens=64):
                    out["tokens"] += isinstance(frame, Token)
                out["replies"] += 1
                since_restart += 1
            except RuntimeFailure as exc:
                out["errors"].append(str(exc))
                await session.reload()
            session.history = []
            samples.append(
                (time.monotonic() - start, rss_mib(os.getpid()), [rss_mib(p) for p in pids])
            )
    finally:
        await session.close()
    out["agents_alive"] = sum(p.poll() is None for p in agents.procs)
    out["minutes"] = (time.monotonic() - start) / 60

    def med(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2] if xs else 0.0

    # warm: 30-40 % into the run (the malloc arenas of the tunnel threads and the import of
    # every module settle over the first few reloads); end: the last tenth
    span = samples[-1][0] if samples else 0.0
    warm = [s for s in samples if span * 0.3 <= s[0] < span * 0.4] or samples[:1]
    end = [s for s in samples if s[0] >= span * 0.9] or samples[-1:]
    out["first_mib"] = {"desktop": samples[0][1], "agents": sum(samples[0][2])} if samples else {}
    out["samples"] = [(round(t), round(d, 1), round(sum(a), 1)) for t, d, a in samples]
    out["desktop_mib"] = {"warm": med([s[1] for s in warm]), "end": med([s[1] for s in end])}
    out["agents_mib"] = {
        "warm": med([sum(s[2]) for s in warm]),
        "end": med([sum(s[2]) for s in end]),
    }
    return out


# ------------------------------------------------------------ healing without the user

_REPO = Path(__file__).resolve().parents[2]
Spawn = Callable[..., "subprocess.Popen[str]"]


def local_spawn(argv: list[str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, **kw)


def _serve_args(model: Path, agents: list[str]) -> list[str]:
    args = [sys.executable, "-m", "corral.engine.cli", "serve", str(model), "--port", "0"]
    args += ["--ctx", "2048"]
    for a in agents:
        args += ["--agent", a]
    return args


def api_heal(
    name: str,
    spawn: Spawn,
    agents: list[str],
    model: Path,
    inject: Callable[[], None],
    restore: Callable[[], None] = lambda: None,
) -> Trial:
    """`corral serve` over `agents`, an openai-SDK client streaming a long reply
    (tests/support/heal_client.py); `inject` once the reply streams. The client must see an
    error (never a reply cut short that looks whole), and a short request must be answered
    again with nobody doing anything: detect_s = fault → the SDK's error, recover_s = fault
    → answered again."""
    serve = spawn(
        _serve_args(model, agents),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client: subprocess.Popen[str] | None = None
    problems: list[str] = []
    events: dict[str, dict[str, Any]] = {}
    t0 = 0.0
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        if not line.startswith("serving"):
            serve.kill()
            raise TrialFailed(f"serve did not start: {line} {serve.communicate()[1][-500:]}")
        client = spawn(
            [sys.executable, "-m", "tests.support.heal_client", line.split()[-1]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=_REPO,
        )
        assert client.stdout is not None
        first = json.loads(client.stdout.readline() or "{}")
        if first.get("event") != "streaming":
            raise TrialFailed(f"the reply did not stream: {first}")
        t0 = time.monotonic()
        inject()
        out, _ = client.communicate(timeout=240)
        for raw in out.splitlines():
            event = json.loads(raw)
            events[event["event"]] = event
    except subprocess.TimeoutExpired:
        problems.append("the client hung")
    finally:
        restore()
        for proc in (client, serve):
            if proc is not None:
                stop(proc)
    if "error" not in events:
        problems.append("the client saw no error: a reply cut short looked complete")
    if "usable" not in events:
        problems.append(f"not answered again: {events.get('unusable', {}).get('message', '')}")
    detect = events["error"]["t"] - t0 if "error" in events else None
    usable = events["usable"]["t"] - t0 if "usable" in events else None
    return Trial(name, not problems, detect, usable, "; ".join(problems))
