"""Checks shared by `corral doctor` and `corral-agent doctor`: each says pass, warn or fail,
what it found, and for anything short of pass, the fix.

llama.cpp is asked in a child process (the agent's device listing), never imported here: a
broken driver can abort or hang whoever loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # pass | warn | fail
    detail: str
    fix: str = ""


@dataclass(slots=True)
class LocalBuild:
    """What the device listing child reported: the llama.cpp build and its devices."""

    build: dict[str, Any] = field(default_factory=dict)
    devices: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


def print_report(title: str, checks: list[Check], as_json: bool) -> int:
    """One line per check (and its fix); exit status 1 when any check failed."""
    failed = [c for c in checks if c.status == FAIL]
    if as_json:
        for c in checks:
            print(json.dumps({"type": "check", **asdict(c)}), flush=True)
        print(json.dumps({"type": "summary", "failed": len(failed)}), flush=True)
        return 1 if failed else 0
    print(title)
    width = max((len(c.name) for c in checks), default=10)
    for c in checks:
        print(f"{c.status.upper():<5} {c.name:<{width}}  {c.detail}")
        if c.fix and c.status != PASS:
            print(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    warned = sum(c.status == WARN for c in checks)
    print(
        f"{len(checks) - len(failed) - warned} passed, {warned} warnings, {len(failed)} failed",
        flush=True,
    )
    return 1 if failed else 0


_REINSTALL = (
    "rebuild llama-cpp-python with RPC: `python packaging/install_llama.py` in a checkout, "
    "or run packaging/install-worker.sh again"
)


# how a host gets the tunnel's native relay (engine/security/_relay.c)
RELAY_FIX = "install a C compiler and OpenSSL's headers (apt install gcc libssl-dev), then "


# what a host without the hand-over leaves open (docs/SECURITY.md, "Other local users")
LOCAL_USERS = (
    "; without the hand-over an agent's RPC worker listens on a 127.0.0.1 port that other "
    "local users of that host can reach"
)


def spin_check(system_info: str, rpc_spin: int | None, environ: Mapping[str, str]) -> Check:
    """How long the RPC worker's idle CPU threads spin before they sleep (rpc_spin,
    docs/OPERATIONS.md), and where that comes from; a setting that cannot act is said."""
    from corral.engine.procs import omp_env, uses_openmp

    if not uses_openmp(system_info):
        detail = "this llama.cpp runs its CPU threads in ggml's own pool, not OpenMP"
        if rpc_spin is not None:
            return Check(
                "CPU threads",
                WARN,
                f"{detail}: rpc_spin = {rpc_spin} changes nothing here",
                "remove rpc_spin from the config, or install a llama.cpp built with OpenMP "
                "(`make install` builds one)",
            )
        return Check("CPU threads", PASS, detail)
    policy = environ.get("OMP_WAIT_POLICY", "")
    if rpc_spin is None and "GOMP_SPINCOUNT" not in environ and policy:
        if policy.strip().upper() == "PASSIVE":
            return Check(
                "CPU threads",
                WARN,
                "OMP_WAIT_POLICY=PASSIVE in the agent's environment: every barrier in a "
                "graph puts the worker's threads to sleep (a 2-thread worker ran about a third "
                "slower)",
                "unset OMP_WAIT_POLICY for the agent, or set rpc_spin (30000) in its config",
            )
        return Check("CPU threads", PASS, f"OMP_WAIT_POLICY={policy} from the agent's environment")
    spins = omp_env(rpc_spin, environ).get("GOMP_SPINCOUNT") or environ["GOMP_SPINCOUNT"]
    source = (
        "rpc_spin"
        if rpc_spin is not None
        else "GOMP_SPINCOUNT in the agent's environment"
        if "GOMP_SPINCOUNT" in environ
        else "the default"
    )
    return Check(
        "CPU threads",
        PASS,
        f"the RPC worker's OpenMP threads spin {spins} times before they sleep ({source})",
    )


def threads_check(rpc_threads: int, cores: int, host_cores: int) -> Check:
    """How many CPU threads the RPC worker runs (rpc_threads, else the default over the
    `cores` this agent may use of the host's `host_cores`); more threads than usable cores
    is warned: the extra ones wait at every barrier for a core."""
    from corral.engine.procs import WORKER_SPARE_CORES, default_worker_threads

    usable = f"{cores} usable core{'s' if cores != 1 else ''}"
    allowed = (
        usable
        if cores == host_cores
        else f"{usable} of the host's {host_cores} (CPU affinity or cgroup quota)"
    )
    if rpc_threads > cores:
        return Check(
            "worker threads",
            WARN,
            f"rpc_threads = {rpc_threads}, but this agent may use {allowed}: the threads "
            "beyond them wait at every barrier of a graph for a core another one holds",
            f"set rpc_threads to {cores} or less, or leave it out (the default is "
            f"{default_worker_threads(cores)})",
        )
    if rpc_threads:
        return Check("worker threads", PASS, f"{rpc_threads} (rpc_threads), of {allowed}")
    threads = default_worker_threads(cores)
    spare = f", less {WORKER_SPARE_CORES} for the rest of the host" if threads < cores else ""
    return Check("worker threads", PASS, f"{threads}: {allowed}{spare} (rpc_threads sets them)")


def relay_check() -> Check:
    """Which data path this host's tunnels take, and what that leaves open to other local
    users where it is not the hand-over."""
    check = _data_path_check()
    if check.status == PASS:
        return check
    return replace(check, detail=check.detail + LOCAL_USERS)


def _data_path_check() -> Check:
    """Which data path this host's tunnels take: the hand-over (engine/security/_rpcshim.c),
    the native relay (_relay.c), or the Python TLS pumps."""
    from corral.engine.security.tunnel import (
        relay_mode,
        relay_only,
        relay_turned_off,
        unguarded_sends,
    )

    mode = relay_mode()
    if mode == "inproc":
        return Check(
            "tunnel",
            PASS,
            "handed over: ggml-rpc's own sockets carry AES-256-GCM records keyed over TLS 1.3",
        )
    if mode == "native":
        unsealed = unguarded_sends()
        if unsealed:
            return Check(
                "tunnel",
                WARN,
                "native relay: the hand-over is off because this llama.cpp's ggml-rpc imports "
                f"{', '.join(unsealed)}, which the hand-over does not seal (+56 µs a round "
                "trip on an H200 host, docs/PERFORMANCE.md)",
                "nothing to do: the relay keeps RPC inside TLS; the hand-over needs a ggml-rpc "
                "that sends only through send() and recv() (llama-cpp-python 0.3.36 does)",
            )
        if relay_only():
            return Check(
                "tunnel",
                WARN,
                "native relay: CORRAL_RELAY=relay turns the hand-over off (+56 µs a round "
                "trip on an H200 host, docs/PERFORMANCE.md)",
                "unset CORRAL_RELAY for the faster data path",
            )
        return Check(
            "tunnel",
            WARN,
            "native relay: the hand-over library (_rpcshim) was not built (+56 µs a round "
            "trip on an H200 host, docs/PERFORMANCE.md)",
            RELAY_FIX + "reinstall Corral (make install, or packaging/install-worker.sh again)",
        )
    if relay_turned_off():
        return Check(
            "tunnel",
            WARN,
            "Python TLS pumps: CORRAL_RELAY turns the native relay off",
            "unset CORRAL_RELAY for the faster data path",
        )
    return Check(
        "tunnel",
        WARN,
        "Python TLS pumps: the native relay was not built, so each RPC message costs much "
        "more (+95 µs a round trip on an H200 host, +4 µs handed over; docs/PERFORMANCE.md)",
        RELAY_FIX + "reinstall Corral (make install, or packaging/install-worker.sh again)",
    )


async def local_build() -> LocalBuild:
    """The installed llama.cpp's build info and devices, from a child process."""
    from corral.engine.agent.inventory import probe_ggml

    probe = await probe_ggml(timeout=120.0)
    if probe.error:
        return LocalBuild(error=probe.error)
    return LocalBuild(build=dict(probe.build), devices=[asdict(d) for d in probe.devices])


def _nvidia_present() -> bool:
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def build_checks(found: LocalBuild) -> list[Check]:
    """llama.cpp installed and working, built with RPC, and seeing this host's GPUs."""
    if found.error:
        runtime = cxx_runtime_check()
        return [
            Check(
                "llama.cpp build",
                FAIL,
                f"llama.cpp does not load: {found.error}",
                "install llama-cpp-python with RPC: `python packaging/install_llama.py` in a "
                "checkout, or packaging/install-worker.sh on a worker",
            ),
            *([runtime] if runtime else []),
        ]
    b = found.build
    checks = [
        Check(
            "llama.cpp build",
            PASS,
            f"llama-cpp-python {b.get('llama_cpp_python') or '?'}, ggml "
            f"{b.get('ggml_version') or '?'} (commit {b.get('ggml_commit') or '?'})",
        )
    ]
    if b.get("supports_rpc"):
        checks.append(Check("RPC support", PASS, f"ggml RPC protocol {b.get('rpc_proto') or '?'}"))
    else:
        checks.append(
            Check(
                "RPC support",
                FAIL,
                "this llama.cpp build has no RPC backend (llama_supports_rpc() is false): "
                "it can neither serve layers to a desktop nor use other hosts' GPUs",
                _REINSTALL,
            )
        )
    names = [f"{d['name']} ({d.get('description') or d.get('type')})" for d in found.devices]
    gpus = [d for d in found.devices if d.get("type") in ("gpu", "igpu")]
    if not found.devices:
        checks.append(
            Check("backend devices", FAIL, "llama.cpp lists no device at all", _REINSTALL)
        )
    elif not gpus and _nvidia_present():
        checks.append(
            Check(
                "backend devices",
                FAIL,
                f"this host has an NVIDIA GPU but llama.cpp sees only {', '.join(names)}: "
                "the build has no CUDA backend",
                "rebuild with CUDA: `python packaging/install_llama.py --backend cuda` (needs the "
                "CUDA toolkit's nvcc), or packaging/install-worker.sh, which detects it",
            )
        )
    else:
        checks.append(Check("backend devices", PASS, ", ".join(names)))
    runtime = cxx_runtime_check()
    return checks if runtime is None else [*checks, runtime]


def cxx_runtime_check() -> Check | None:
    """A FAIL when llama.cpp's libraries each carry their own C++ runtime (every model load
    crashes), else None: a build made by a toolchain that links libstdc++ statically."""
    from corral.engine.ggml.buildinfo import OWN_CXX_RUNTIME_FIX, own_cxx_runtimes

    copies = own_cxx_runtimes()
    if not copies:
        return None
    return Check(
        "C++ runtime",
        FAIL,
        f"llama.cpp's {', '.join(copies)} carry their own copy of the C++ runtime and export "
        "it: libllama then calls one library's copy with another's data and crashes loading "
        "any model (SIGSEGV in llama_model::print_info)",
        OWN_CXX_RUNTIME_FIX,
    )


def nvml_check() -> Check:
    """NVML (the NVIDIA driver's library) is what reports GPU memory and use per process."""
    try:
        import pynvml
    except ImportError:
        return Check(
            "NVML",
            FAIL,
            "nvidia-ml-py is not installed",
            "pip install nvidia-ml-py (a dependency of corral: reinstall corral)",
        )
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        if _nvidia_present():
            return Check(
                "NVML",
                FAIL,
                f"an NVIDIA GPU is present but NVML does not start ({exc})",
                "install or repair the NVIDIA driver (nvidia-smi must work), then restart",
            )
        return Check("NVML", PASS, "no NVIDIA driver: a CPU (or Metal) host, as expected")
    try:
        count = pynvml.nvmlDeviceGetCount()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        return Check("NVML", PASS, f"driver {driver}, {count} GPU(s)")
    except pynvml.NVMLError as exc:
        return Check("NVML", FAIL, f"NVML answers but fails: {exc}", "check `nvidia-smi`")
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def port_owner(port: int) -> str:
    """'name (pid N)' of the process listening on TCP `port` here, '' when it cannot be told."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return ""
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in wanted for fd in fds):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                return f"{cmd.strip()[:80]} (pid {pid})"
        except OSError:
            continue
    return ""


def listen_port_check(host: str, port: int, agent_running: bool) -> Check:
    """The agent's control port can be bound here, or is held by this very agent."""
    name = "agent port"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent binds it
        try:
            s.bind((host, port))
            return Check(name, PASS, f"{host}:{port} is free for the agent")
        except OSError as exc:
            error = exc
    owner = port_owner(port)
    if error.errno == errno.EADDRINUSE:
        if agent_running or "corral-agent" in owner or "corral.engine.agent" in owner:
            return Check(name, PASS, f"{host}:{port} is held by the running corral-agent")
        who = owner or "another program"
        return Check(
            name,
            FAIL,
            f"port {port} is in use by {who}: the agent cannot listen on {host}:{port}",
            f'stop that program, or give the agent another port (listen = "{host}:OTHER" '
            "in its config, or --listen); desktops then pair with the new address",
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return Check(
            name,
            FAIL,
            f"not allowed to listen on port {port} ({error.strerror})",
            "use a port above 1023 (the default is 7340)",
        )
    return Check(
        name,
        FAIL,
        f"cannot listen on {host}:{port}: {error.strerror or error}",
        "listen on an address this host has (0.0.0.0 for all)",
    )


class _Timex(ctypes.Structure):
    # struct timex starts with `unsigned int modes`; the rest is only read by the kernel's
    # copy-out, so a generous zeroed buffer is enough
    _fields_ = [("modes", ctypes.c_uint), ("rest", ctypes.c_byte * 512)]


def _clock_state() -> int | None:
    """adjtimex(2) state: 5 (TIME_ERROR) means the clock is not synchronized."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        state = int(libc.adjtimex(ctypes.byref(_Timex())))
    except (OSError, AttributeError):
        return None
    return state if state >= 0 else None


def clock_check(cert_path: Path | None) -> Check:
    """Synchronized, and not behind this host's own certificate (TLS would then refuse)."""
    if cert_path is not None and cert_path.exists():
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            made = cert.not_valid_before_utc.timestamp()
        except ValueError:
            made = 0.0
        if made > time.time() + 60:
            return Check(
                "clock",
                FAIL,
                f"the clock is behind: this host's certificate was made "
                f"{(made - time.time()) / 3600:.1f} h in its future, so TLS refuses it",
                "set the clock right (timedatectl set-ntp true), then restart",
            )
    state = _clock_state()
    now = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if state == 5:
        return Check(
            "clock",
            WARN,
            f"{now}, not synchronized by NTP: pairing codes, certificates and logs rely on it",
            "turn on time synchronization: timedatectl set-ntp true (or install chrony)",
        )
    return Check("clock", PASS, now + (" (NTP synchronized)" if state is not None else ""))


async def mdns_self_test(ips: list[str], timeout: float = 3.0) -> Check:
    """Announce a throwaway service and resolve it from a second mDNS stack on this host."""
    from zeroconf import IPVersion, ServiceInfo
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    if not ips:
        return Check(
            "mDNS",
            FAIL,
            "no network interface to announce on (only loopback, link-local or bridges)",
            "connect this host to the LAN; desktops can still add it by address",
        )
    kind = "_corral-doctor._tcp.local."
    name = f"doctor-{uuid.uuid4().hex[:8]}.{kind}"
    version = IPVersion.V6Only if all(":" in ip for ip in ips) else IPVersion.V4Only
    ips = [ip for ip in ips if (":" in ip) == (version is IPVersion.V6Only)]
    info = ServiceInfo(kind, name, port=9, parsed_addresses=ips, server=f"{name[:15]}.local.")
    speaker = AsyncZeroconf(interfaces=ips, ip_version=version)
    listener = AsyncZeroconf(interfaces=ips, ip_version=version)
    try:
        await (await speaker.async_register_service(info))
        heard = AsyncServiceInfo(kind, name)
        ok = await heard.async_request(listener.zeroconf, int(timeout * 1000))
        if ok:
            await (await speaker.async_unregister_service(info))
    except OSError as exc:
        ok = False
        why = f" ({exc.strerror or exc})"
    else:
        why = ""
    finally:
        await asyncio.gather(listener.async_close(), speaker.async_close())
    if ok:
        return Check("mDNS", PASS, f"announces and hears mDNS on {', '.join(ips)}")
    return Check(
        "mDNS",
        FAIL,
        f"this host does not hear its own mDNS announcement on {', '.join(ips)}{why}",
        "allow UDP port 5353 to and from 224.0.0.251 in the firewall (ufw allow 5353/udp) "
        "and multicast on the interface; desktops can still add this agent by address",
    )


async def kernel_check(doctor: str) -> Check:
    """The CPU-kernel self-test's verdict for this build and CPU (cached; run if missing)."""
    from corral.engine.ggml.kernelcheck import EXTRA, PLAIN, verdict

    found = await asyncio.get_running_loop().run_in_executor(None, verdict)
    took = f" (tested {time.strftime('%Y-%m-%d', time.localtime(found.tested))}, {found.cpu})"
    if found.error:
        from corral.engine.ggml.buildinfo import OWN_CXX_RUNTIME_FIX, own_cxx_runtimes

        own_runtime = bool(own_cxx_runtimes())  # why no model loads here, if that is why
        return Check(
            "CPU kernels", FAIL, found.summary(), OWN_CXX_RUNTIME_FIX if own_runtime else _REINSTALL
        )
    plain = found.failures(PLAIN)
    if plain:
        what = "; ".join(f"{r.wtype} {r.detail}" for r in plain)
        return Check(
            "CPU kernels",
            FAIL,
            f"llama.cpp's plain CPU kernels fail here: {what}{took}",
            "rebuild llama-cpp-python on this host (`python packaging/install_llama.py`); a "
            "build copied from another machine needs `--portable`",
        )
    if found.failures(EXTRA):
        amx = "AMX" in found.extra_names()
        return Check(
            "CPU kernels",
            FAIL,
            f"{found.summary()}; Corral loads without them, slower on the CPU{took}",
            "nothing to do for Corral to work; to get the fast kernels back, rebuild without the "
            "AMX ones: `python packaging/install_llama.py --no-amx`, then run "
            f"`{doctor}` again"
            if amx
            else f"nothing to do for Corral to work; `{doctor}` tests again after a rebuild",
        )
    return Check("CPU kernels", PASS, f"{found.summary()}{took}")
