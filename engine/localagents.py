"""Start corral-agent processes on this machine (the demo, tests and benches use this).

Each agent gets a throwaway state dir and a scripted pairing code; this desktop pairs with
every one of them through the real pairing exchange, and forgets them again on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any

from corral.engine.runtime.errors import RuntimeFailure
from corral.engine.security.desktop import DesktopKeys, desktop_dir, desktop_keys
from corral.engine.security.pairing import new_code
from corral.engine.security.pins import PinStore

_LISTENING = re.compile(r"listening on (\S+)$")


def agent_command(listen: str, state_dir: Path, *extra: str) -> list[str]:
    """The command line of a corral-agent on this machine, keeping its state and its logs
    (throwaway agents keep them together) in `state_dir`."""
    return [
        sys.executable,
        "-m",
        "corral.engine.agentcli",
        "--listen",
        listen,
        "--state-dir",
        str(state_dir),
        "--log-dir",
        str(state_dir / "log"),
        *extra,
    ]


class LocalAgents:
    """N agents on 127.0.0.1 with throwaway state dirs; stopped (and their workers) on exit."""

    def __init__(
        self,
        count: int,
        host: str = "127.0.0.1",
        start_timeout: float = 30.0,
        advertise: bool = False,
        pair: bool = True,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.count = count
        self.env = env or {}
        self.advertise = advertise
        self.host = host
        self.start_timeout = start_timeout
        self.procs: list[subprocess.Popen[str]] = []
        self.addresses: list[str] = []
        self.pair = pair
        self.extra_args = extra_args
        self._paired: list[DesktopKeys] = []
        self._root = Path(tempfile.mkdtemp(prefix="corral-agents-"))

    def state_dir(self, i: int) -> Path:
        return self._root / f"agent{i}"

    def __enter__(self) -> LocalAgents:
        try:
            for i in range(self.count):
                proc, address = self._start(i, f"{self.host}:0")
                self.procs.append(proc)
                self.addresses.append(address)
            if self.pair:
                self.pair_with(desktop_keys())
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, i: int) -> None:
        """kill -9 agent i (and its worker) if it runs, then start it again with the same
        state dir on the same address: a host rebooting, as the desktop sees it."""
        old = self.procs[i]
        if old.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(old.pid, signal.SIGKILL)
        old.wait()
        if old.stdout is not None:
            old.stdout.close()
        deadline = time.monotonic() + self.start_timeout
        while True:  # the old socket may linger a moment
            try:
                self.procs[i], _ = self._start(i, self.addresses[i])
                return
            except RuntimeFailure:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _start(self, i: int, listen: str) -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(
            agent_command(
                listen,
                self.state_dir(i),
                "--log-level",
                "WARNING",
                "--exit-with-parent",  # a kill -9 of this process leaves no agent behind
                *(() if self.advertise else ("--no-advertise",)),
                *self.extra_args,
            ),
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **self.env),
            start_new_session=True,  # so stop() can end the agent and its worker together
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                line = proc.stdout.readline()
                m = _LISTENING.search(line.strip())
                if m:
                    return proc, m.group(1)
            if proc.poll() is not None:
                proc.stdout.close()
                raise RuntimeFailure(
                    f"local agent {i} exited at start (exit code {proc.returncode})"
                )
        self.procs.append(proc)  # stop() ends it
        raise RuntimeFailure(f"local agent {i} did not start within {self.start_timeout:.0f} s")

    async def _issue_code(self, i: int) -> str:
        from corral.engine.agent.admin import ask
        from corral.engine.protocol import PairCodeRequest

        code = new_code()
        await ask(self.state_dir(i), PairCodeRequest(req=1, code=code))
        return code

    def issue_code(self, i: int) -> str:
        """A fresh pairing code on agent i, asked for on its admin socket as its owner would
        (what `corral-agent pair` does)."""
        codes: list[str] = []

        async def go() -> None:
            codes.append(await self._issue_code(i))

        _run_apart(go())
        return codes[0]

    def pair_with(self, keys: DesktopKeys) -> None:
        """Pair the desktop with `keys` with every agent (a fresh code each)."""
        from corral.engine.runtime.agent_client import AgentClient

        async def go() -> None:
            for i, address in enumerate(self.addresses):
                await AgentClient(address, keys=keys).pair(await self._issue_code(i))

        _run_apart(go())
        self._paired.append(keys)

    def stop(self) -> None:
        # forget the throwaway agents again: in every desktop paired here, and in this
        # desktop's own list even when something else paired it (the app's Pair button)
        stores = [keys.pins for keys in self._paired]
        own = PinStore(desktop_dir() / "paired-agents.json")
        if own.path.exists():
            stores.append(own)
        for store in stores:
            for address in self.addresses:
                try:
                    store.remove(address)
                except Exception:
                    pass
        self._paired.clear()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            # the agent's process group holds its RPC worker too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs.clear()
        shutil.rmtree(self._root, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _run_apart(coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro` to the end on a loop of its own (the caller may be inside a loop)."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:
            failure.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if failure:
        raise failure[0]
