"""Runs the RPC worker child, restarts it with backoff when it dies, and reports every change.

The worker is reached only through the authenticated tunnel on the control port (the server
hands those connections over, or connects with `connect_plain`). Where the shim runs, the
worker listens on no TCP port at all: its endpoint is `TUNNEL_HOST:LABEL` and the shim
takes connections on a Unix socket (0600, in the agent's 0700 folder), so no other local
user can speak raw ggml-rpc to it. Without the shim it binds 127.0.0.1 port 0 and the
supervisor reads the kernel's choice back from /proc (loopback.listening_port), so no port
is chosen first and bound later; docs/SECURITY.md says what a TCP worker leaves open. With
--trusted-network, a plain Forwarder also exposes it on a port that stays the same across
restarts; that is the explicit, warned opt-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from corral.engine.ggml.kernelcheck import crash_hint
from corral.engine.ggml.probe import RpcProbeError, probe_rpc
from corral.engine.procs import (
    RPC_PROCESS_ENV,
    default_worker_threads,
    exit_text,
    last_words,
    omp_env,
    usable_cores,
)
from corral.engine.protocol import WorkerState
from corral.engine.security.loopback import available as owners_listed
from corral.engine.security.loopback import listening_port
from corral.engine.security.tunnel import (
    TUNNEL_HOST,
    handover_dir,
    new_label,
    plain_to_worker,
    shim_env,
)

from .config import WorkerSettings
from .forward import Forwarder

log = logging.getLogger(__name__)

_BACKOFF_START = 0.5
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 30.0  # a worker that ran this long resets the backoff
_READY_TIMEOUT = 60.0  # CUDA init on a big box can take a while


_PROCESS_STATES = {
    "T": "stopped by a signal",
    "t": "stopped by a debugger",
    "D": "stuck in the kernel (uninterruptible sleep: a driver or a disk)",
    "Z": "exited",
}


def process_state(pid: int) -> str:
    """What Linux says process `pid` is doing, when it is not running or waiting normally:
    a worker stopped (SIGSTOP, a debugger) or stuck in a driver looks alive to its parent
    but answers nothing. "" when it runs, sleeps, or cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2 :].split()  # the name in (...) may hold spaces
    return _PROCESS_STATES.get(fields[0], "") if fields else ""


def _free_port() -> int:
    """A loopback port chosen now, for a system that cannot say which port a process
    listens on: another local user could take it before the worker binds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerStartError(Exception):
    """The worker did not come up; the message carries its exit and last log lines."""


_RUN_MARK = "--- starting worker: "  # written to the log before each start


def _tail(path: Path, n: int = 15, raw: bool = False) -> tuple[str, ...]:
    """The last run's last `n` log lines: as written (`raw`), else what it said before it
    died (llama.cpp's abort line last, its backtrace left out: procs.last_words)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(_RUN_MARK):
            lines = lines[i + 1 :]
            break
    if raw:
        return tuple(line for line in lines if line.strip())[-n:]
    return tuple(last_words(lines, n))


class RpcSupervisor:
    """Owns one RPC worker; `on_change(kind, state, message)` hears every transition."""

    def __init__(
        self,
        state_dir: Path,
        direct_host: str | None,
        on_change: Callable[[str, WorkerState, str], None],
        drop_tunnels: Callable[[], None] = lambda: None,
    ) -> None:
        self._state_dir = state_dir
        self._tunnel_host = direct_host or ""
        self._on_change = on_change
        self._drop_tunnels = drop_tunnels
        self._forwarder = Forwarder(self._target) if direct_host is not None else None
        self._tunnel_port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._port = 0
        self._handover = ""  # the worker shim's Unix socket, when it runs with the shim
        self._want_running = False
        self._devices: tuple[str, ...] = ()
        self._threads = 0  # as asked (0: the default)
        self._running_threads = 0  # what the worker was started with
        self._cache = True
        self._restarts = 0
        self._last_exit = ""
        self._status = "stopped"
        self._watch: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.log_path = state_dir / "rpc-worker.log"
        self.cache_dir = state_dir / "tensor-cache"
        self._cache_max = 0
        self._omp = omp_env()

    def configure(self, settings: WorkerSettings) -> None:
        """Where the tensor cache lives, how big it may grow, and the worker's OpenMP spin
        count (from the next start)."""
        self.cache_dir = settings.cache_dir or self._state_dir / "tensor-cache"
        self._cache_max = settings.cache_max_mib * 1024 * 1024
        self._omp = omp_env(settings.rpc_spin)

    # ------------------------------------------------------------------ public

    @property
    def state(self) -> WorkerState:
        return WorkerState(
            state=self._status,
            endpoint=f"{self._tunnel_host}:{self._tunnel_port}" if self._tunnel_port else "",
            devices=self._devices,
            threads=self._running_threads or self._threads,
            pid=self._proc.pid if self._proc and self._proc.returncode is None else 0,
            restarts=self._restarts,
            last_exit=self._last_exit,
            log_tail=_tail(self.log_path)
            if self._status in ("crashed", "failed", "backoff")
            else (),
            process=process_state(self._proc.pid) if self._proc else "",
        )

    async def start(self, devices: tuple[str, ...], threads: int, cache: bool) -> WorkerState:
        """Start the worker, or restart it when the settings changed or it cannot answer
        (stopped by a signal or a debugger: a desktop whose reply stalled on it asks again);
        wait until it answers."""
        async with self._lock:
            same = (devices, threads, cache) == (self._devices, self._threads, self._cache)
            stuck = process_state(self._proc.pid) if self._proc else ""
            if self._status == "running" and same and not stuck:
                return self.state
            if stuck:
                log.warning("RPC worker %s: killed to start again", stuck)
            await self._stop_locked()
            self._devices, self._threads, self._cache = devices, threads, cache
            self._running_threads = threads or default_worker_threads(usable_cores())
            self._want_running = True
            self._restarts = 0
            if not self._tunnel_port and self._forwarder is not None:
                self._tunnel_port = await self._forwarder.start(self._tunnel_host)
            await self._spawn_and_wait()
            return self.state

    async def stop(self) -> WorkerState:
        async with self._lock:
            await self._stop_locked()
            return self.state

    async def close(self) -> None:
        await self.stop()
        if self._forwarder is not None:
            await self._forwarder.close()

    # ------------------------------------------------------------------ internals

    @property
    def running(self) -> bool:
        return self._status == "running"

    def connect_plain(self, timeout: float = 5.0) -> socket.socket:
        """A plain ggml-rpc connection to the running worker (blocking): over the shim's
        Unix socket, else its loopback port. OSError when it is not running."""
        if self._status != "running":
            raise ConnectionRefusedError("the RPC worker is not running")
        return self._connect(self._handover, self._port, timeout)

    @staticmethod
    def _connect(handover: str, port: int, timeout: float) -> socket.socket:
        if handover:
            return plain_to_worker(handover, timeout)
        return socket.create_connection(("127.0.0.1", port), timeout)

    @property
    def worker_handover(self) -> str:
        """Where the running worker takes handed-over tunnels ('' without the shim)."""
        return self._handover if self._status == "running" else ""

    def _drop_all(self) -> None:
        self._drop_tunnels()
        if self._forwarder is not None:
            self._forwarder.drop_all()

    def _target(self) -> Callable[[float], socket.socket] | None:
        return self.connect_plain if self._status == "running" else None

    def _set(self, status: str, kind: str = "", message: str = "") -> None:
        self._status = status
        if kind:
            self._on_change(kind, self.state, message)

    async def _spawn_and_wait(self) -> None:
        folder = handover_dir()
        if self._handover:  # the last worker's socket (a restart takes a new label)
            with contextlib.suppress(OSError):
                os.unlink(self._handover)
        if folder:  # no TCP: the port is a label, the shim listens on the Unix socket
            self._port = new_label(folder, "worker-")
            listen = os.path.join(folder, f"worker-{self._port}")
            host, shim = TUNNEL_HOST, shim_env(listen, self._port)
        else:  # port 0: the kernel's choice, read back from /proc once the worker listens
            self._port = 0 if owners_listed() else _free_port()  # (a system without /proc)
            listen, host, shim = "", "127.0.0.1", {}
            log.warning(
                "the RPC worker listens on a 127.0.0.1 port, which other local users of this "
                "host can reach: the hand-over (engine/security/_rpcshim.c) is off here, see "
                "`corral-agent doctor`"
            )
        self._handover = listen
        cmd = [
            sys.executable,
            "-m",
            "corral.engine.agent.worker",
            "serve",
            "--endpoint",
            f"{host}:{self._port}",
            "--devices",
            ",".join(self._devices),
            "--threads",
            str(self._running_threads),
        ]
        if self._cache:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            removed = prune_cache(self.cache_dir, self._cache_max)
            if removed:
                log.info("tensor cache over its cap: removed %d old files", removed)
            cmd += ["--cache-dir", str(self.cache_dir)]
        self._set("starting")
        with self.log_path.open("ab") as logf:
            logf.write(f"{_RUN_MARK}{' '.join(cmd[3:])}\n".encode())
            logf.flush()
            self._proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=dict(os.environ, PYTHONUNBUFFERED="1", **RPC_PROCESS_ENV, **self._omp, **shim),
            )
        proc = self._proc
        deadline = time.monotonic() + _READY_TIMEOUT
        loop = asyncio.get_running_loop()
        while True:
            if proc.returncode is not None:
                self._last_exit = exit_text(proc.returncode)
                self._set("failed", "failed", f"the RPC worker exited at start ({self._last_exit})")
                self._want_running = False
                raise WorkerStartError(
                    f"the RPC worker exited at start ({self._last_exit}): "
                    + " | ".join(_tail(self.log_path, 5))
                )
            try:
                if not listen and not self._port:
                    self._port = listening_port(proc.pid)
                    if not self._port:
                        raise RpcProbeError("not listening yet")
                await loop.run_in_executor(
                    None,
                    functools.partial(
                        probe_rpc,
                        f"{host}:{self._port}",
                        1.0,
                        functools.partial(self._connect, listen, self._port),
                    ),
                )
                break
            except RpcProbeError:
                if time.monotonic() > deadline:
                    await self._kill(proc)
                    self._set("failed", "failed", "the RPC worker did not answer")
                    raise WorkerStartError(
                        f"the RPC worker did not answer within {_READY_TIMEOUT:.0f} s"
                    ) from None
                await asyncio.sleep(0.05)
        started = time.monotonic()
        self._set("running", "started", f"RPC worker on {', '.join(self._devices) or 'default'}")
        self._watch = asyncio.get_running_loop().create_task(self._watch_proc(proc, started))

    async def _watch_proc(self, proc: asyncio.subprocess.Process, started: float) -> None:
        code = await proc.wait()
        if proc is not self._proc or not self._want_running:
            return
        # The worker died on its own: every forwarded connection is now dead weight.
        self._drop_all()
        self._last_exit = exit_text(code)
        self._set("crashed", "crashed", f"the RPC worker died ({self._last_exit})")
        raw = _tail(self.log_path, 400, raw=True)
        hint = crash_hint(self._last_exit, raw, doctor="corral-agent doctor")
        log.warning(
            "RPC worker died (%s)%s; restarting", self._last_exit, f" {hint}" if hint else ""
        )
        delay = _BACKOFF_START
        if time.monotonic() - started < _STABLE_AFTER:
            delay = min(_BACKOFF_MAX, _BACKOFF_START * 2 ** min(self._restarts, 8))
        self._set("backoff")
        await asyncio.sleep(delay)
        async with self._lock:
            if not self._want_running or proc is not self._proc:
                return
            self._restarts += 1
            try:
                await self._spawn_and_wait()
                self._on_change("restarted", self.state, f"restart {self._restarts}")
            except WorkerStartError as exc:
                log.error("RPC worker restart failed: %s", exc)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()

    async def _stop_locked(self) -> None:
        self._want_running = False
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._drop_all()
        if self._proc is not None:
            await self._kill(self._proc)
            self._proc = None
            if self._status != "stopped":
                self._set("stopped", "stopped", "RPC worker stopped")
        self._status = "stopped"


def prune_cache(folder: Path, cap: int) -> int:
    """Delete the least recently used files until `folder` holds at most `cap` bytes.

    The RPC worker keeps one file per tensor it was sent (named by hash) and never deletes
    any; the oldest by access (else modification) time go first. Returns how many went.
    """
    entries = []
    for path in folder.rglob("*"):
        try:
            st = path.stat()
        except OSError:
            continue
        if path.is_file():
            entries.append((max(st.st_atime, st.st_mtime), st.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = 0
    for _, size, path in sorted(entries):
        if total <= cap:
            break
        with contextlib.suppress(OSError):
            path.unlink()
            total -= size
            removed += 1
    return removed


def replace_host(state: WorkerState, host: str) -> WorkerState:
    """The same state with the endpoint host the desktop actually reaches the agent on."""
    if not state.endpoint:
        return state
    port = state.endpoint.rpartition(":")[2]
    host = f"[{host}]" if ":" in host else host
    return dataclasses.replace(state, endpoint=f"{host}:{port}")
