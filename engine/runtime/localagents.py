"""Start corral-agent processes on this machine (the demo, tests and benches use this)."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .errors import RuntimeFailure

_LISTENING = re.compile(r"listening on (\S+)$")


class LocalAgents:
    """N agents on 127.0.0.1 with throwaway state dirs; stopped (and their workers) on exit."""

    def __init__(
        self,
        count: int,
        host: str = "127.0.0.1",
        start_timeout: float = 30.0,
        advertise: bool = False,
    ) -> None:
        self.count = count
        self.advertise = advertise
        self.host = host
        self.start_timeout = start_timeout
        self.procs: list[subprocess.Popen[str]] = []
        self.addresses: list[str] = []
        self._root = Path(tempfile.mkdtemp(prefix="corral-agents-"))

    def state_dir(self, i: int) -> Path:
        return self._root / f"agent{i}"

    def __enter__(self) -> LocalAgents:
        try:
            for i in range(self.count):
                self._start(i)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, i: int) -> None:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "corral.engine.agent.main",
                "--listen",
                f"{self.host}:0",
                "--state-dir",
                str(self.state_dir(i)),
                "--log-level",
                "WARNING",
                *(() if self.advertise else ("--no-advertise",)),
            ],
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,  # so stop() can end the agent and its worker together
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                line = proc.stdout.readline()
                m = _LISTENING.search(line.strip())
                if m:
                    self.addresses.append(m.group(1))
                    return
            if proc.poll() is not None:
                raise RuntimeFailure(
                    f"local agent {i} exited at start (exit code {proc.returncode})"
                )
        raise RuntimeFailure(f"local agent {i} did not start within {self.start_timeout:.0f} s")

    def stop(self) -> None:
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
