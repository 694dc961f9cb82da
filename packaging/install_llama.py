"""Install llama-cpp-python built with the ggml RPC backend, from a wheel cache keyed by flags.

pip's own wheel cache ignores CMAKE_ARGS, so a wheel built once without RPC would be reused
silently. We build into ~/.cache/corral/wheels/<version>-<flags key>/ instead, install from
there, and check `llama_supports_rpc()` afterwards.

Usage: python packaging/install_llama.py [--backend auto|cuda|metal|cpu] [--portable]
                                         [--no-amx] [--print-args] [--print-key]

--backend auto picks CUDA when nvcc and an NVIDIA GPU are there, Metal on macOS, else the CPU.
--portable turns GGML_NATIVE off: the build then runs on any CPU of the architecture, not
only on this one's instruction set; use it for anything copied to other machines (a wheel
for several workers, the desktop bundle).
--no-amx keeps -march=native but leaves out ggml's AMX kernels (GCC honours -mno-amx-* over
-march=native): for hosts whose CPU reports AMX but cannot run it, where the CPU-kernel
self-test fails the AMX path (docs/CPU-KERNELS.md); the AVX-512 repacked kernels stay.

After installing it refuses a build whose libraries each carry their own C++ runtime (a
compiler that links libstdc++ statically: every model load would crash) and says how to build
with the system compiler; then it runs the CPU-kernel self-test (corral.engine.ggml.kernelcheck)
once for the new build and this CPU and prints its verdict, which every later load follows.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"


def _has_nvidia_gpu() -> bool:
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def detect_backend() -> str:
    """cuda when nvcc and an NVIDIA GPU are both there, metal on macOS, else cpu."""
    if sys.platform == "darwin":
        return "metal"
    if shutil.which("nvcc") is not None and _has_nvidia_gpu():
        return "cuda"
    return "cpu"


# GCC and Clang honour these after -march=native: ggml's AMX kernels are then not compiled
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def compiler_flags(no_amx: bool) -> str:
    """CFLAGS/CXXFLAGS for the build (CMake takes them from the environment)."""
    return NO_AMX_FLAGS if no_amx else ""


def cmake_args(backend: str, portable: bool = False) -> str:
    """CMAKE_ARGS: RPC always, the backend's switch, and GGML_NATIVE off when portable."""
    args = ["-DGGML_RPC=on"]
    if backend == "auto":
        backend = detect_backend()
    if backend == "cuda":
        args.append("-DGGML_CUDA=on")
    elif backend == "metal":
        args.append("-DGGML_METAL=on")
    if portable:
        args.append("-DGGML_NATIVE=off")
    extra = os.environ.get("CORRAL_LLAMA_CMAKE_ARGS", "").strip()
    if extra:
        args.extend(extra.split())
    return " ".join(args)


def wheel_dir(args: str, cflags: str = "") -> Path:
    """The cache folder for one version and set of build flags (outside any clone)."""
    cache = Path(os.environ.get("CORRAL_WHEEL_CACHE", Path.home() / ".cache" / "corral" / "wheels"))
    flags = f"{VERSION} {args} {sys.version_info[:2]}" + (f" cflags={cflags}" if cflags else "")
    for var in ("CC", "CXX"):  # another compiler makes another build (CMake takes these)
        if os.environ.get(var):
            flags += f" {var}={os.environ[var]}"
    key = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return cache / f"llama-cpp-python-{VERSION}-{key}"


def _installed_ok(python: str, wheel: Path | None = None) -> bool:
    """The installed llama-cpp-python is VERSION with RPC (and, given one, from that wheel:
    the same version built with other flags is not what was asked for)."""
    probe = (
        "import llama_cpp, sys; "
        f"sys.exit(0 if llama_cpp.__version__ == {VERSION!r} and llama_cpp.llama_supports_rpc() "
        "else 3)"
    )
    if subprocess.run([python, "-c", probe], capture_output=True).returncode != 0:
        return False
    if wheel is None:
        return True
    marker = _marker(python)
    return marker is not None and marker.exists() and marker.read_text().strip() == wheel.name


def _marker(python: str) -> Path | None:
    """A file beside the installed llama_cpp naming the wheel folder it came from."""
    out = subprocess.run(
        [python, "-c", "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))"],
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip()) / ".corral-build" if out.returncode == 0 else None


def _own_cxx_runtimes(python: str) -> list[str]:
    """The installed build's libraries that carry their own C++ runtime (buildinfo's check;
    none where Corral itself is not installed yet)."""
    code = (
        "from corral.engine.ggml.buildinfo import own_cxx_runtimes; "
        "print(' '.join(own_cxx_runtimes()))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return out.stdout.split() if out.returncode == 0 else []


def _self_test(python: str) -> None:
    """The CPU-kernel self-test for the new build on this CPU: its verdict, once, now."""
    code = (
        "from corral.engine.ggml import kernelcheck as k; v = k.run_selftest(); "
        "print('CPU-kernel self-test:', v.summary())"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if out.returncode == 0:
        print(out.stdout.strip())
    else:  # Corral itself is not installed yet (a bare build): the first load runs it
        print("CPU-kernel self-test: not run now (it runs before the first load)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["auto", "cuda", "metal", "cpu"], default="auto")
    parser.add_argument(
        "--portable", action="store_true", help="GGML_NATIVE off: for builds copied elsewhere"
    )
    parser.add_argument(
        "--no-amx",
        action="store_true",
        help="leave out ggml's AMX kernels (for CPUs that report AMX but cannot run it)",
    )
    parser.add_argument("--print-args", action="store_true", help="print CMAKE_ARGS and exit")
    parser.add_argument("--print-key", action="store_true", help="print the wheel folder and exit")
    opts = parser.parse_args()
    args = cmake_args(opts.backend, opts.portable)
    cflags = compiler_flags(opts.no_amx)
    target = wheel_dir(args, cflags)
    if opts.print_args:
        print(args + (f"  (CFLAGS/CXXFLAGS: {cflags})" if cflags else ""))
        return 0
    if opts.print_key:
        print(target)
        return 0
    python = sys.executable
    # a plain run takes whatever RPC build is there; a run that asks for other build flags
    # replaces a build that was not made with them
    asked_for = target if (opts.no_amx or opts.portable or opts.backend != "auto") else None
    if _installed_ok(python, asked_for):
        print(f"llama-cpp-python {VERSION} with RPC already installed")
        return 0
    wheels = sorted(target.glob("llama_cpp_python-*.whl"))
    if not wheels:
        print(
            f"building llama-cpp-python {VERSION} with CMAKE_ARGS='{args}' "
            f"(about 14 minutes on 2 cores; cached afterwards in {target})",
            flush=True,
        )
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        env = dict(os.environ, CMAKE_ARGS=args)
        if cflags:
            for var in ("CFLAGS", "CXXFLAGS"):
                env[var] = f"{env.get(var, '')} {cflags}".strip()
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(
            [
                python,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-cache-dir",
                f"llama-cpp-python=={VERSION}",
                "-w",
                str(tmp),
            ],
            env=env,
            check=True,
        )
        tmp.rename(target)
        wheels = sorted(target.glob("llama_cpp_python-*.whl"))
    pip = [python, "-m", "pip", "install", "-q"]
    # --force-reinstall replaces a non-RPC build of the same version; the second call
    # brings the wheel's own dependencies.
    subprocess.run([*pip, "--force-reinstall", "--no-deps", str(wheels[-1])], check=True)
    subprocess.run([*pip, str(wheels[-1])], check=True)
    if not _installed_ok(python):
        print(
            f"error: the llama-cpp-python in {target} does not support RPC "
            "(llama_supports_rpc() is False). Delete that folder and run `make .venv` again.",
            file=sys.stderr,
        )
        return 1
    copies = _own_cxx_runtimes(python)
    if copies:
        shutil.rmtree(target, ignore_errors=True)  # never reused: the next run builds again
        print(
            f"error: this build's {', '.join(copies)} carry their own copy of the C++ runtime "
            "(the compiler links libstdc++ statically), which crashes every model load. "
            "Build with the system compiler: CC=/usr/bin/gcc CXX=/usr/bin/g++ python "
            "packaging/install_llama.py (docs/CPU-KERNELS.md)",
            file=sys.stderr,
        )
        return 1
    marker = _marker(python)
    if marker is not None:
        marker.write_text(target.name + "\n")
    print(f"llama-cpp-python {VERSION} with RPC installed from {target.name}/{wheels[-1].name}")
    _self_test(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
