"""Child-process helpers shared by the agent and the desktop runtime."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Mapping, Sequence

_PR_SET_PDEATHSIG = 1


# A llama.cpp built where libibverbs exists (GGML_RPC_RDMA, on by default then) upgrades an
# RPC connection to RDMA after HELLO when both ends can, and RDMA traffic would leave Corral's
# authenticated tunnel. Every process that speaks ggml RPC (the inference child, the agent's
# worker) runs with ggml's switch for it set: both ends then advertise no RDMA.
RPC_PROCESS_ENV = {"GGML_RPC_NO_RDMA": "1"}

# ggml's CPU backend runs each graph in one OpenMP parallel region and waits at its barriers
# through OpenMP; libgomp's threads spin GOMP_SPINCOUNT times (300,000 unless set: 0.2-0.6 ms
# of a core after each region on the 2-core VM) before they sleep. In a split, a worker's
# next graph comes only after the other devices' share of the token, so that spinning takes
# cores from whatever shares the host: another worker, the desktop, the tunnels (on the VM,
# splits over a 2-thread and 1-thread workers ran 10-14 % faster with 30,000, and their
# predictions came in line: docs/PLANNER.md, "Cores shared"). 30,000 spins (about 0.1 ms
# there) left the 2-thread worker's own speed where it was. An agent's rpc_spin wins over
# the environment (it is about this worker alone); without one, a GOMP_SPINCOUNT or
# OMP_WAIT_POLICY of the user's own wins.
OMP_SPIN_DEFAULT = 30_000


def uses_openmp(build: object) -> bool:
    """Whether a llama.cpp build runs its CPU threads through OpenMP (where the spin count
    acts), from its system info line ("... | OPENMP = 1 | ...") or the build dict holding it."""
    return "OPENMP = 1" in str(build)


def omp_env(spin: int | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The OpenMP setting for a process that runs ggml's CPU backend: `spin` as
    GOMP_SPINCOUNT where given; else the environment's (`environ`, default this process's)
    own GOMP_SPINCOUNT or OMP_WAIT_POLICY where it sets one; else OMP_SPIN_DEFAULT."""
    env = os.environ if environ is None else environ
    if spin is not None:
        return {"GOMP_SPINCOUNT": str(spin)}
    if "GOMP_SPINCOUNT" in env or "OMP_WAIT_POLICY" in env:
        return {}
    return {"GOMP_SPINCOUNT": str(OMP_SPIN_DEFAULT)}


def cgroup_cpu_limit(own: str, read: Callable[[str], str | None]) -> float | None:
    """The CPU time this process's cgroups allow, in cores (None: no limit seen), from
    `own` (/proc/self/cgroup's text) and `read(path)` (a file's text under /sys/fs/cgroup,
    None where absent): cgroup v2's cpu.max ("QUOTA PERIOD" or "max PERIOD") and v1's
    cpu.cfs_quota_us / cpu.cfs_period_us (quota -1: none), on the process's own cgroup and
    each one above it; the tightest wins."""
    limits: list[float] = []
    for line in own.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base = ""  # v2: one tree
        elif "cpu" in controllers.split(","):
            base = "/" + controllers  # v1: the cpu controller's tree ("cpu,cpuacct")
        else:
            continue
        here = path.rstrip("/")
        while True:
            folder = f"{base}{here}"
            if base == "":
                text = read(f"{folder}/cpu.max")
                fields = text.split() if text else []
                if len(fields) == 2 and fields[0] != "max":
                    with contextlib.suppress(ValueError, ZeroDivisionError):
                        limits.append(int(fields[0]) / int(fields[1]))
            else:
                quota = read(f"{folder}/cpu.cfs_quota_us")
                period = read(f"{folder}/cpu.cfs_period_us")
                if quota and period:
                    with contextlib.suppress(ValueError, ZeroDivisionError):
                        q = int(quota)
                        if q > 0:
                            limits.append(q / int(period))
            if not here:
                break
            here = here.rsplit("/", 1)[0]
    return min(limits) if limits else None


def _read_cgroup_file(path: str) -> str | None:
    try:
        with open(f"/sys/fs/cgroup{path}") as f:
            return f.read()
    except OSError:
        return None


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a cpuset), no more
    than its cgroup's CPU quota allows (a container's --cpus), rounded up; os.cpu_count()
    counts the whole host. A thread of ggml's beyond these waits at every barrier for a
    core another one holds."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/proc/self/cgroup") as f:
            own = f.read()
    except OSError:
        own = ""
    limit = cgroup_cpu_limit(own, _read_cgroup_file)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit - 1e-9)))
    return max(1, cores)


# An RPC worker shares its host: with the agent's tunnel (which must forward the next
# token's activations at once), often another worker or the desktop. On the H100 host a CPU
# worker of 16 threads on the 16 cores beside a GPU worker ran every split 13-46 % slower
# than its probes said; at 14 threads the splits with 17 or more of the 33 layers on it came
# within 3.2 %, and the whole model on it ran faster (14.0 tok/s against 11.9): one run of
# each, docs/PLANNER.md, "GPU and CPU on one host".
WORKER_SPARE_CORES = 2


def default_worker_threads(cores: int) -> int:
    """An RPC worker's CPU threads when nobody chose: the usable cores, less
    WORKER_SPARE_CORES where there are 8 or more (a small machine keeps all its cores)."""
    return cores - WORKER_SPARE_CORES if cores >= 8 else max(1, cores)


# ggml_abort writes "FILE:LINE: message" (GGML_ASSERT's "…: GGML_ASSERT(x) failed"), then a
# native backtrace (gdb's, where gdb is installed, else execinfo's), then aborts; Python's
# faulthandler then lists every thread's frames.
_GGML_ABORT = re.compile(r"^\S+\.(?:c|cc|cpp|cu|h|hpp|m|mm|metal):\d+: \S")
_CXX_ABORT = "terminate called after throwing"  # an uncaught C++ exception; "what(): …" next


def last_words(lines: Sequence[str], n: int = 12) -> list[str]:
    """The last `n` lines a process that died wrote before its dump: up to llama.cpp's own
    abort message where it wrote one (the backtrace after it left out), and never
    faulthandler's thread list. What a user is shown of a crash."""
    kept = list(lines)
    for i, line in enumerate(kept):
        if line.startswith("Fatal Python error"):
            kept = kept[:i]
            break
    for i in range(len(kept) - 1, -1, -1):
        line = kept[i]
        if _GGML_ABORT.match(line):
            kept = kept[: i + 1]
            break
        if line.startswith(_CXX_ABORT):
            kept = kept[: i + 2]
            break
    return [line for line in kept if line.strip()][-n:]


def exit_text(returncode: int) -> str:
    """Human form of a child's return code ("killed by SIGKILL", "exit code 3")."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies.

    A worker or inference child orphaned by a kill -9 of its agent or desktop would otherwise
    hold a port, a GPU and gigabytes of memory until someone notices.
    """
    if sys.platform != "linux":
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


_M_ARENA_MAX = -8  # glibc's mallopt parameter number
ARENAS = 2


def cap_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas; True if it took. Call first thing in a process's main().

    The desktop and the agent start two pump threads per RPC tunnel and end them when the
    model is unloaded or a worker dies. glibc gives threads their own arenas, up to 8 per
    core, and an arena keeps the ~1.5 MiB its thread touched after the thread ends: the soak
    saw the desktop grow by one arena every reload or two (+7.8 % in 30 minutes on 2 cores,
    and it would reach ~190 MiB on a 16-core desktop). The pumps allocate almost nothing
    once running (their buffers are reused), so two shared arenas cost no speed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt arenas)
        return False
