"""`corral-agent --listen HOST:PORT --state-dir DIR`: the daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import platformdirs

from .server import AgentServer


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (for example 0.0.0.0:7340)")
    return host.strip("[]") or "0.0.0.0", int(port)


async def _run(
    host: str, port: int, state_dir: Path, advertise: bool, interfaces: tuple[str, ...]
) -> int:
    # Handlers first: a SIGTERM during start-up must still end in a clean stop (with goodbye
    # packets), not in the default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = AgentServer(host, port, state_dir, advertise, interfaces)
    try:
        bound = await server.start()
    except OSError as exc:
        print(
            f"corral-agent: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr
        )
        await server.close()
        return 2
    print(f"corral-agent {server.agent_id} listening on {host}:{bound}", flush=True)
    await stop.wait()
    await server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="corral-agent",
        description="Corral worker daemon: inventory and a llama.cpp RPC worker.",
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("0.0.0.0", 7340),
        metavar="HOST:PORT",
        help="control address (default 0.0.0.0:7340)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(platformdirs.user_state_dir("corral-agent")),
        help="identity, worker log and tensor cache",
    )
    parser.add_argument(
        "--no-advertise", action="store_true", help="do not announce this agent on the LAN (mDNS)"
    )
    parser.add_argument(
        "--advertise-interface",
        action="append",
        default=[],
        metavar="NAME",
        help="announce only on this interface (repeatable; default: every ordinary interface, "
        "no container bridges)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    opts = parser.parse_args(argv)
    logging.basicConfig(
        level=opts.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        opts.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"cannot use --state-dir {opts.state_dir}: {exc.strerror or exc}")
    host, port = opts.listen
    if opts.advertise_interface:
        from corral.discovery.interfaces import unknown_interfaces

        missing = unknown_interfaces(tuple(opts.advertise_interface))
        if missing:
            parser.error(f"no network interface named {', '.join(missing)}")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(
            _run(host, port, opts.state_dir, not opts.no_advertise, tuple(opts.advertise_interface))
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
