"""Install llama-cpp-python built with the ggml RPC backend, from a wheel cache keyed by flags.

pip's own wheel cache ignores CMAKE_ARGS, so a wheel built once without RPC would be reused
silently. We build into ~/.cache/corral/wheels/<version>-<flags key>/ instead, install from
there, and check `llama_supports_rpc()` afterwards.

Usage: python packaging/install_llama.py [--backend auto|cuda|metal|cpu] [--portable]
                                         [--print-args] [--print-key]

--backend auto picks CUDA when nvcc and an NVIDIA GPU are there, Metal on macOS, else the CPU.
--portable turns GGML_NATIVE off: the build then runs on any CPU of the architecture, not
only on this one's instruction set; use it for anything copied to other machines (a wheel
for several workers, the desktop bundle).
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


def wheel_dir(args: str) -> Path:
    """The cache folder for one version and set of build flags (outside any clone)."""
    cache = Path(os.environ.get("CORRAL_WHEEL_CACHE", Path.home() / ".cache" / "corral" / "wheels"))
    key = hashlib.sha256(f"{VERSION} {args} {sys.version_info[:2]}".encode()).hexdigest()[:12]
    return cache / f"llama-cpp-python-{VERSION}-{key}"


def _installed_ok(python: str) -> bool:
    probe = (
        "import llama_cpp, sys; "
        f"sys.exit(0 if llama_cpp.__version__ == {VERSION!r} and llama_cpp.llama_supports_rpc() "
        "else 3)"
    )
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["auto", "cuda", "metal", "cpu"], default="auto")
    parser.add_argument(
        "--portable", action="store_true", help="GGML_NATIVE off: for builds copied elsewhere"
    )
    parser.add_argument("--print-args", action="store_true", help="print CMAKE_ARGS and exit")
    parser.add_argument("--print-key", action="store_true", help="print the wheel folder and exit")
    opts = parser.parse_args()
    args = cmake_args(opts.backend, opts.portable)
    target = wheel_dir(args)
    if opts.print_args:
        print(args)
        return 0
    if opts.print_key:
        print(target)
        return 0
    python = sys.executable
    if _installed_ok(python):
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
    print(f"llama-cpp-python {VERSION} with RPC installed from {wheels[-1].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
