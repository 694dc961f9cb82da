"""The agent's child processes: the ggml RPC worker, and a one-shot device listing.

Both run llama.cpp code, which can abort or hang in driver init, so neither runs inside the
agent process. `serve` never returns while healthy: ggml_backend_rpc_start_server has no stop.

    python -m corral.engine.agent.worker serve --endpoint 127.0.0.1:PORT --devices CPU ...
    python -m corral.engine.agent.worker devices      # prints one JSON object
    python -m corral.engine.agent.worker capabilities --device CUDA0 --questions q8_0:q8_0:128:1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys

EXIT_NO_SERVER = 3  # start_rpc_server returned: it could not open its socket


def _serve(opts: argparse.Namespace) -> int:
    from corral.engine.ggml import GgmlError, default_worker_devices, start_rpc_server

    # A queued client that disconnects before being served makes the server write to a
    # closed socket: that must be an EPIPE, not a SIGPIPE death.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    devices = [d for d in opts.devices.split(",") if d] or default_worker_devices()
    try:
        start_rpc_server(opts.endpoint, devices, opts.threads, opts.cache_dir or None)
    except GgmlError as exc:
        print(f"corral worker: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"corral worker: the RPC server on {opts.endpoint} stopped (port in use?)", flush=True)
    return EXIT_NO_SERVER


def _devices() -> int:
    from corral.engine.ggml import GgmlError, build_info, list_devices

    try:
        devices = [dataclasses.asdict(d) for d in list_devices()]
        info = dataclasses.asdict(build_info())
    except GgmlError as exc:
        print(json.dumps({"error": str(exc)}))
        return 0
    print(json.dumps({"devices": devices, "build": info}))
    return 0


def _capabilities(device: str, questions: str) -> int:
    from corral.engine.ggml import GgmlError
    from corral.engine.ggml.capabilities import Question, ask
    from corral.engine.planner.kvtypes import ggml_type

    try:
        qs = [
            Question(ggml_type(k), ggml_type(v), int(hd), fa == "1")
            for k, v, hd, fa in (item.split(":") for item in questions.split(",") if item)
        ]
        print(json.dumps({"answers": ask(device, qs)}))
    except (GgmlError, ValueError) as exc:
        print(json.dumps({"error": str(exc)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    from corral.engine.procs import die_with_parent

    die_with_parent()
    parser = argparse.ArgumentParser(prog="corral-worker")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--endpoint", required=True)
    serve.add_argument("--devices", default="")
    serve.add_argument("--threads", type=int, default=0)
    serve.add_argument("--cache-dir", default="")
    sub.add_parser("devices")
    caps = sub.add_parser("capabilities")
    caps.add_argument("--device", required=True)
    caps.add_argument("--questions", required=True, help="K:V:HEAD_DIM:FA,...")
    opts = parser.parse_args(argv)
    if opts.cmd == "capabilities":
        return _capabilities(opts.device, opts.questions)
    if opts.cmd == "serve":
        if opts.threads <= 0:
            from corral.engine.procs import default_worker_threads, usable_cores

            opts.threads = default_worker_threads(usable_cores())
        return _serve(opts)
    return _devices()


if __name__ == "__main__":
    sys.exit(main())
