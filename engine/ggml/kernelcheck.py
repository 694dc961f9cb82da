"""The CPU-kernel self-test: which of ggml's CPU kernels this host can run, decided by running them.

A native build of llama.cpp compiles kernels for the instructions the building CPU reports,
and llama.cpp moves matmul weights it can speed up into "extra" CPU buffers (AMX tiles,
CPU_REPACK interleaving). Whether those kernels work is a property of the host, not of the
build: an AMX VM whose hypervisor traps the tile instructions dies with SIGSEGV/SIGILL in
`ggml_backend_amx_mul_mat`, while an H200 host with the same CPU family runs them at full
speed (docs/CPU-KERNELS.md). So Corral asks the host: a child process decodes a few tokens
of a small random-weight model in each weight type people use, once on the plain CPU kernels
and once with the extra buffers on, and compares the logits with the same model in F32. The
extra buffers stay on where every type answers right, and are turned off (llama.cpp's
`use_extra_bufts`, what `--repack 0` does) where one crashes or answers wrong.

The verdict is cached per llama.cpp build and CPU (~/.cache/corral/kernelcheck/). Each model
runs in a child process: a kernel that crashes takes only that child down, and the parent
starts another for the types left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import platformdirs

from corral.engine.procs import exit_text, last_words, usable_cores

from ._lib import installed_lib_dir
from .buildinfo import OWN_CXX_RUNTIME_FIX, own_cxx_runtimes
from .errors import GgmlError
from .loadlog import parse_load_log

# The weight types people run (llama.cpp ftype names, quantized "pure": every 2-D tensor in
# that type). q4_k_s / q5_k_s are the K-quant files whose matmuls are Q4_K / Q5_K.
WEIGHT_TYPES = ("q4_0", "q4_1", "q4_k_s", "q5_k_s", "q6_k", "q8_0", "f16", "bf16")
PLAIN, EXTRA = "plain", "extra"  # extra buffer types off / on
OK, WRONG, CRASHED, FAILED = "ok", "wrong", "crashed", "failed"

# Tolerances, in relative L2 distance between logit vectors (docs/CPU-KERNELS.md has the
# figures behind them). Both paths run the same quantized weights, so what separates them
# is only how activations are rounded and in which order sums are taken: on the machines
# measured that moves the logits by well under 1 % of what rounding the weights costs, and a
# broken kernel moves them by about as much as the logits themselves (distance ~1).
# An extra path passes while it stays within half of the weight rounding's own error of the
# plain one (and always within 2 %), so it can never be more than 1.5× as far from F32.
EXTRA_SHARE = 0.5
EXTRA_FLOOR = 0.02
# The plain kernels against F32: every 2-D tensor of this small random model in a 4-bit type
# lands at 0.33-0.37, 8-bit at 0.03; logits that have nothing to do with the model's land
# at 1 or more.
PLAIN_MAX = 0.8

ENV_SWITCH = "CORRAL_CPU_EXTRA_BUFFERS"  # auto (default) | on | off
_CHILD = (sys.executable, "-m", "corral.engine.ggml._kernelcheck_child")
_FORMAT = 1  # of the cache file


@dataclass(frozen=True, slots=True)
class PathResult:
    """One weight type on one path: what happened, and how far its logits were."""

    wtype: str
    path: str  # plain | extra
    outcome: str  # ok | wrong | crashed | failed
    detail: str = ""  # "killed by SIGSEGV", "logits 87 % off (allowed 6 %)"
    error: float | None = None  # relative L2 distance from the F32 reference
    buffers: tuple[str, ...] = ()  # extra CPU buffers llama.cpp put weights in (AMX, CPU_REPACK)
    off_plain: float | None = None  # extra path: relative L2 distance from the plain path
    ggml_type: int = -1  # the matmuls' ggml type in this weight type's model
    # extra path: bytes in the extra buffers per byte of the weights moved there (the planner
    # adds these copies to the host: engine.planner.plan.host_extra_bytes)
    factor: float = 0.0


@dataclass(frozen=True, slots=True)
class KernelVerdict:
    """What the self-test decided for this build and CPU."""

    extra_buffers: bool  # llama.cpp's extra CPU buffer types stay on
    key: str
    cpu: str
    results: tuple[PathResult, ...] = ()
    seconds: float = 0.0
    tested: float = 0.0  # time.time() of the run
    error: str = ""  # the self-test itself could not run (llama.cpp missing, ...)

    def failures(self, path: str | None = None) -> list[PathResult]:
        return [r for r in self.results if r.outcome != OK and path in (None, r.path)]

    def extra_factors(self) -> dict[int, float]:
        """ggml type -> extra-buffer bytes per byte of weight, where the buffers are used."""
        if not self.extra_buffers:
            return {}
        return {
            r.ggml_type: r.factor
            for r in self.results
            if r.path == EXTRA and r.factor > 0 and r.ggml_type >= 0
        }

    def extra_names(self) -> list[str]:
        """The extra buffer types llama.cpp used on this host (AMX, CPU_REPACK), in order."""
        seen: list[str] = []
        for r in self.results:
            seen += [b for b in r.buffers if b not in seen]
        return seen

    def summary(self) -> str:
        """One line for the doctor, the install and a load report."""
        if self.error:
            return f"the CPU-kernel self-test could not run: {self.error}"
        names = "/".join(self.extra_names()) or "none used"
        bad = self.failures(EXTRA)
        types = len({r.wtype for r in self.results})
        if self.extra_buffers:
            return (
                f"{types} weight types right on the plain kernels and with llama.cpp's extra "
                f"CPU buffers ({names}): kept on"
            )
        what = "; ".join(f"{r.wtype} {r.detail}" for r in bad)
        return f"llama.cpp's extra CPU buffers ({names}) fail here ({what}): turned off"

    def to_json(self) -> dict[str, Any]:
        return {"format": _FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KernelVerdict:
        if data.get("format") != _FORMAT:
            raise ValueError("another cache format")
        results = tuple(
            PathResult(**{**r, "buffers": tuple(r.get("buffers", ()))})
            for r in data.get("results", [])
        )
        fields = {k: v for k, v in data.items() if k not in ("format", "results")}
        return cls(**fields, results=results)


# ---------------------------------------------------------------- identity and cache


def build_fingerprint() -> str:
    """The installed llama.cpp's CPU backend, by content (a rebuild with other flags differs)."""
    lib_dir = installed_lib_dir()
    if lib_dir is None or not lib_dir.is_dir():
        return "no-llama-cpp"
    digest = hashlib.sha256()
    for path in sorted(lib_dir.glob("libggml-cpu*")) or sorted(lib_dir.glob("libggml*")):
        if path.is_file() and not path.is_symlink():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cpu_fingerprint() -> tuple[str, str]:
    """(model name, identity): the CPU, its flags and microcode, and the kernel that runs it
    (a hypervisor or kernel that enables AMX decides as much as the chip)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
    model = fields.get("model name") or platform.processor() or platform.machine()
    ident = "|".join(
        [
            model,
            fields.get("flags", ""),
            fields.get("microcode", ""),
            platform.machine(),
            platform.release(),
        ]
    )
    return model, hashlib.sha256(ident.encode()).hexdigest()[:16]


def host_key() -> str:
    return f"{build_fingerprint()}-{cpu_fingerprint()[1]}"


def cache_dir() -> Path:
    override = os.environ.get("CORRAL_KERNELCHECK_DIR")
    return (
        Path(override) if override else Path(platformdirs.user_cache_dir("corral")) / "kernelcheck"
    )


def cached_verdict(key: str | None = None) -> KernelVerdict | None:
    """The stored verdict for this build and CPU, or None (never run, or unreadable)."""
    key = key or host_key()
    path = cache_dir() / f"{key}.json"
    try:
        # another local user's file (or one they could have written) decides nothing here
        st = path.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return None
        data = json.loads(path.read_text())
        verdict = KernelVerdict.from_json(data)
    except (OSError, ValueError, TypeError, AttributeError):  # gone, damaged or older
        return None
    return verdict if verdict.key == key and not verdict.error else None


def _store(verdict: KernelVerdict) -> None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = folder / f".{verdict.key}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(verdict.to_json(), f, indent=1)
        tmp.replace(folder / f"{verdict.key}.json")
    except OSError:
        pass  # no cache: the next process asks again, which costs seconds, not correctness


# ---------------------------------------------------------------- running it


@dataclass(slots=True)
class _Run:
    """What one path's children reported, type by type."""

    logits: dict[str, Path] = field(default_factory=dict)
    extra_mib: dict[str, dict[str, float]] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)  # type -> how its child died / failed
    reference: Path | None = None


def _run_path(
    child: Sequence[str],
    workdir: Path,
    path: str,
    types: Sequence[str],
    threads: int,
    timeout: float,
) -> _Run:
    """Run `path` over `types` in children, a new one after each that dies."""
    run = _Run()
    left = list(types)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(ENV_SWITCH, None)
    while left:
        argv = [*child, "--dir", str(workdir), "--path", path, "--threads", str(threads)]
        argv += ["--types", ",".join(left)]
        if path == PLAIN and run.reference is None:
            argv.append("--reference")
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                stdin=subprocess.DEVNULL,
            )
            out, how = proc.stdout, ("" if proc.returncode == 0 else exit_text(proc.returncode))
            err = proc.stderr
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
            how, err = f"did not finish within {timeout:.0f} s", ""
        current = ""
        for line in out.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "start":
                current = str(event["type"])
            elif event.get("event") == "reference":
                run.reference = Path(event["file"])
            elif event.get("event") == "result":
                wtype = str(event["type"])
                run.logits[wtype] = Path(event["file"])
                run.extra_mib[wtype] = {
                    str(k): float(v) for k, v in (event.get("extra_mib") or {}).items()
                }
                left.remove(wtype)
                current = ""
            elif event.get("event") == "failed":
                wtype = str(event["type"])
                run.lost[wtype] = f"failed: {event.get('message', '?')}"
                left.remove(wtype)
                current = ""
        if not how:
            break
        if current in left:  # it died on this type: note it and go on with the rest
            run.lost[current] = how
            left.remove(current)
        else:  # it died outside any one type (import, the models): nothing more will work
            tail = _error_tail(err) if how.startswith("exit code") else ""
            for wtype in left:
                run.lost[wtype] = f"{how}{': ' + tail if tail else ''}"
            break
    return run


def _error_tail(stderr: str) -> str:
    """The last line a child that exited with an error wrote: its exception, or llama.cpp's
    abort line, never faulthandler's dump (procs.last_words)."""
    lines = last_words(stderr.splitlines(), 1)
    return lines[0].strip()[-300:] if lines else ""


def _distance(a: Path, b: Path) -> float:
    import numpy as np

    x, y = np.load(a), np.load(b)
    if x.shape != y.shape:
        return float("inf")
    norm = float(np.linalg.norm(y))
    return float(np.linalg.norm(x - y) / norm) if norm > 0 else float("inf")


def decide(
    types: Sequence[str],
    plain: dict[str, tuple[str, float | None]],
    extra: dict[str, tuple[str, float | None, float | None]],
    buffers: dict[str, tuple[str, ...]],
) -> list[PathResult]:
    """Judge each type's two paths (pure).

    plain[t] = ("", distance from F32) or (how it died, None);
    extra[t] = ("", distance from F32, distance from the plain path) or (how it died, ...).
    """
    results: list[PathResult] = []
    for t in types:
        how, err = plain.get(t, ("not run", None))
        if how:
            results.append(PathResult(t, PLAIN, _outcome(how), how))
        elif err is None or err > PLAIN_MAX:
            results.append(
                PathResult(
                    t, PLAIN, WRONG, f"logits {_pct(err)} off F32 (allowed {_pct(PLAIN_MAX)})", err
                )
            )
        else:
            results.append(PathResult(t, PLAIN, OK, "", err))
        how, xerr, dist = extra.get(t, ("not run", None, None))
        used = buffers.get(t, ())
        if how:
            results.append(PathResult(t, EXTRA, _outcome(how), how, None, used))
            continue
        allowed = max(EXTRA_SHARE * (err or 0.0), EXTRA_FLOOR)
        if dist is None or dist > allowed:
            detail = f"logits {_pct(dist)} off the plain kernels' (allowed {_pct(allowed)})"
            results.append(PathResult(t, EXTRA, WRONG, detail, xerr, used, dist))
        else:
            results.append(PathResult(t, EXTRA, OK, "", xerr, used, dist))
    return results


def _with_factor(result: PathResult, work: Path, run: _Run) -> PathResult:
    """An extra path's result with its model's matmul type and its extra buffers' size per
    byte moved (the bytes the planner's rule says move: every layer's matmuls and the
    output's)."""
    from corral.engine.model.spec import ModelError, read_model_spec

    if result.path != EXTRA:
        return result
    try:
        spec = read_model_spec(work / f"{result.wtype}.gguf")
    except ModelError:
        return result
    gtype = spec.layers[0].matmuls[0][0] if spec.layers and spec.layers[0].matmuls else -1
    logged = sum(run.extra_mib.get(result.wtype, {}).values()) * (1 << 20)
    if gtype < 0 or not logged:
        return replace(result, ggml_type=gtype)
    # a local load moves every layer's matmuls and the output matrix (as the planner's
    # host_extra_bytes counts them with a factor of 1 for every type)
    moved = sum(b for layer in spec.layers for _, b in layer.matmuls) + spec.output_bytes
    return replace(result, ggml_type=gtype, factor=round(logged / moved, 4) if moved else 0.0)


def is_extra_buffer(name: str) -> bool:
    """llama.cpp's extra CPU buffer types (weights copied for faster kernels)."""
    return name == "AMX" or name.endswith("_REPACK") or name.startswith("KLEIDIAI")


def _outcome(how: str) -> str:
    return CRASHED if how.startswith("killed by") or "within" in how else FAILED


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.2g} %" if x < 10 else "far"


def run_selftest(
    types: Sequence[str] = WEIGHT_TYPES,
    child: Sequence[str] = _CHILD,
    threads: int | None = None,
    timeout: float = 180.0,
    store: bool = True,
    key: str = "",
) -> KernelVerdict:
    """Run the self-test now (seconds; each path in child processes) and cache the verdict.

    `child` is the command of the child that runs one path (tests put a wrapper there that
    crashes on purpose)."""
    key = key or host_key()
    cpu = cpu_fingerprint()[0]
    threads = threads or min(4, usable_cores())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="corral-kernelcheck-") as tmp:
        work = Path(tmp)
        p = _run_path(child, work, PLAIN, types, threads, timeout)
        x = _run_path(child, work, EXTRA, types, threads, timeout)
        if p.reference is None:
            why = next(iter(p.lost.values()), "the reference model did not run")
            copies = own_cxx_runtimes()
            if copies:
                why += (
                    f"; {', '.join(copies)} carry their own copy of the C++ runtime, which "
                    f"crashes every model load: {OWN_CXX_RUNTIME_FIX}"
                )
            verdict = KernelVerdict(
                extra_buffers=False,
                key=key,
                cpu=cpu,
                seconds=time.perf_counter() - t0,
                tested=time.time(),
                error=f"the F32 reference did not run ({why})",
            )
            return verdict  # not cached: a broken install is fixed, then asked again
        plain: dict[str, tuple[str, float | None]] = {}
        extra: dict[str, tuple[str, float | None, float | None]] = {}
        for t in types:
            if t in p.logits:
                plain[t] = ("", _distance(p.logits[t], p.reference))
            else:
                plain[t] = (p.lost.get(t, "not run"), None)
            if t in x.logits:
                base = p.logits.get(t)
                dist = _distance(x.logits[t], base) if base else None
                extra[t] = ("", _distance(x.logits[t], p.reference), dist)
            else:
                extra[t] = (x.lost.get(t, "not run"), None, None)
        buffers = {t: tuple(x.extra_mib.get(t, {})) for t in types}
        results = [_with_factor(r, work, x) for r in decide(types, plain, extra, buffers)]
    verdict = KernelVerdict(
        extra_buffers=not any(r.outcome != OK for r in results if r.path == EXTRA),
        key=key,
        cpu=cpu,
        results=tuple(results),
        seconds=time.perf_counter() - t0,
        tested=time.time(),
    )
    if store:
        _store(verdict)
    return verdict


def verdict() -> KernelVerdict:
    """The cached verdict for this build and CPU, running the self-test first if there is none."""
    key = host_key()  # hashes the CPU backend's library: once
    return cached_verdict(key) or run_selftest(key=key)


@dataclass(frozen=True, slots=True)
class CpuKernels:
    """What a load uses: llama.cpp's extra CPU buffers on or off, and why."""

    extra_buffers: bool
    summary: str
    degraded: bool = False  # off because the self-test failed here (slower than it could be)
    # (ggml type, extra-buffer bytes per byte of weight) for the planner; pairs, as frames
    # carry them (msgpack maps take string keys)
    factors: tuple[tuple[int, float], ...] = ()


def extra_buffers_setting() -> CpuKernels:
    """Whether llama.cpp may use its extra CPU buffers here, and why (for the load report).

    CORRAL_CPU_EXTRA_BUFFERS=on|off overrides the self-test; anything else is refused."""
    choice = os.environ.get(ENV_SWITCH, "auto").strip().lower() or "auto"
    if choice == "on":
        known = cached_verdict()  # sizes from an earlier run, if any; no test is run now
        factors = tuple(known.extra_factors().items()) if known else ()
        return CpuKernels(
            True, f"llama.cpp's extra CPU buffers on ({ENV_SWITCH}=on, untested)", False, factors
        )
    if choice == "off":
        return CpuKernels(False, f"llama.cpp's extra CPU buffers off ({ENV_SWITCH}=off)")
    if choice != "auto":
        raise GgmlError(
            f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r} is not a setting: use auto (the self-test "
            "decides), on or off"
        )
    found = verdict()
    # Without the reference nothing is known about the kernels: take the path that needs the
    # fewest (the plain kernels run wherever the build runs at all).
    return CpuKernels(
        found.extra_buffers,
        found.summary(),
        degraded=not found.extra_buffers,
        factors=tuple(found.extra_factors().items()),
    )


def known_extra_factors() -> dict[int, float]:
    """The extra CPU buffers' bytes per weight byte, per ggml type, that the next load will
    use as far as is known now, without running the self-test (the instant plan's guess;
    the dry run's say is the exact plan's): none where they are off or nothing is cached."""
    choice = os.environ.get(ENV_SWITCH, "auto").strip().lower() or "auto"
    if choice == "off":
        return {}
    known = cached_verdict()
    if known is None or (choice != "on" and not known.extra_buffers):
        return {}
    return known.extra_factors()


# ---------------------------------------------------------------- explaining a crash

# Signals that mean native code went wrong (a bad kernel, an instruction the CPU lacks),
# as opposed to SIGABRT (llama.cpp's own GGML_ABORT: a lost worker, a refused op) or a kill.
NATIVE_CRASHES = ("SIGSEGV", "SIGILL", "SIGBUS", "SIGFPE")
_PHASES = (
    ("in step", "while computing a reply"),  # the child's scheduler: prompts and tokens
    ("in embed", "while computing embeddings"),
    ("in _construct", "while loading the model"),
    ("in dry_run", "in the dry run of the load"),
    ("in _logits", "in the CPU-kernel self-test"),
)


def crash_hint(how: str, log_lines: Sequence[str], doctor: str = "corral doctor") -> str:
    """For a process that llama.cpp's native code killed (SIGSEGV, SIGILL, ...): what was
    running, which backend the load log put in play, and what to run next. "" otherwise."""
    if not any(sig in how for sig in NATIVE_CRASHES):
        return ""
    # RPC buffers are named RPC0[endpoint]: the device is enough here
    named = parse_load_log(log_lines).buffers.get("model", {})
    buffers = list(dict.fromkeys(name.split("[")[0] for name in named))
    phase = ""
    for line in log_lines:
        for marker, said in _PHASES:
            if line.strip().startswith("File ") and line.rstrip().endswith(marker):
                phase = phase or said  # faulthandler lists the innermost frame first
    where = f" {phase}" if phase else ""
    extra = [b for b in buffers if is_extra_buffer(b)]
    copies = own_cxx_runtimes() if "SIGSEGV" in how else []
    if copies:
        what = (
            f"in llama.cpp{where}: its libraries {', '.join(copies)} each carry their own copy "
            "of the C++ runtime, and one calls into another's"
        )
        fix = OWN_CXX_RUNTIME_FIX
    elif extra:
        what = (
            f"in ggml's {'/'.join(extra)} CPU kernels{where} (this load put weights in "
            f"{' and '.join(extra)} buffers): this host's CPU may not run them"
        )
        fix = (
            f"run `{doctor}`, which tests them and turns them off where they fail (or set "
            f"{ENV_SWITCH}=off)"
        )
    elif "SIGILL" in how:
        what = (
            f"in llama.cpp{where}: an instruction this CPU lacks, as from a build made for "
            "another machine's CPU"
        )
        fix = (
            f"run `{doctor}`; rebuild llama-cpp-python on this host (packaging/install_llama.py), "
            "or with --portable for a build shared between machines"
        )
    else:
        backends = f" (backends in this load: {', '.join(buffers)})" if buffers else ""
        what = f"in llama.cpp's native code{where}{backends}"
        fix = f"run `{doctor}`, which tests this host's CPU kernels"
    return f"{what}; {fix}"
