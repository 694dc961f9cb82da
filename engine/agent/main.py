"""`corral-agent`: the worker daemon, and its local pairing commands.

corral-agent [--listen HOST:PORT] [--state-dir DIR] [--pairing-code CODE] ...
corral-agent pair      a new one-time pairing code (from the running agent)
corral-agent paired    the desktops this agent has paired with
corral-agent unpair X  forget a desktop (name or fingerprint prefix)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

import platformdirs

from corral.engine.security.files import SecurityFileError
from corral.engine.security.identity import short

from .server import AgentServer

_TRUSTED_WARNING = (
    "corral-agent: WARNING: --trusted-network exposes the llama.cpp RPC worker, which has no "
    "authentication and has had remote-code-execution bugs, to everyone who can reach this "
    "host. Use it only on a network where you trust every machine."
)


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (for example 0.0.0.0:7340)")
    return host.strip("[]") or "0.0.0.0", int(port)


def _code_arg(text: str) -> str:
    from corral.engine.security.pairing import check_code_text

    try:
        check_code_text(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


async def _run(opts: argparse.Namespace) -> int:
    # Handlers first: a SIGTERM during start-up must still end in a clean stop (with goodbye
    # packets), not in the default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host, port = opts.listen
    try:
        server = AgentServer(
            host,
            port,
            opts.state_dir,
            not opts.no_advertise,
            tuple(opts.advertise_interface),
            pairing_code=opts.pairing_code or "",
            trusted_network=opts.trusted_network,
        )
    except SecurityFileError as exc:
        print(f"corral-agent: {exc}", file=sys.stderr)
        return 2
    if opts.trusted_network:
        print(_TRUSTED_WARNING, file=sys.stderr, flush=True)
    try:
        bound = await server.start()
    except OSError as exc:
        print(
            f"corral-agent: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr
        )
        await server.close()
        return 2
    print(f"corral-agent {server.agent_id} listening on {host}:{bound}", flush=True)
    print(
        f"identity {short(server.identity.fingerprint)}; paired desktops: "
        f"{len(server.pins.peers())}",
        flush=True,
    )
    print(
        f"pairing code: {server.gate.issue(opts.pairing_code or '')} (valid 5 minutes, one use; "
        "`corral-agent pair` makes a new one)",
        flush=True,
    )
    await stop.wait()
    await server.close()
    return 0


async def _admin(opts: argparse.Namespace) -> int:
    from corral.engine.protocol import (
        ErrorReply,
        PairCodeReply,
        PairCodeRequest,
        Peers,
        PeersRequest,
        Unpair,
    )

    from .admin import ask

    try:
        if opts.command == "pair":
            reply = await ask(
                opts.state_dir, PairCodeRequest(req=1, code=opts.code or "", ttl=opts.valid)
            )
            if isinstance(reply, PairCodeReply):
                print(f"pairing code: {reply.code}")
                print(
                    f"valid {reply.expires_in:.0f} s, one use. On the desktop: "
                    "corral pair <this host>:<port> --code " + reply.code
                )
                return 0
        elif opts.command == "paired":
            reply = await ask(opts.state_dir, PeersRequest(req=1))
            if isinstance(reply, Peers):
                if not reply.peers:
                    print("no paired desktops")
                for p in reply.peers:
                    flags = ("connected" if p.connected else "") + (
                        ", holds the workers" if p.lease else ""
                    )
                    print(_peer_line(p.fingerprint, p.name, p.paired_at, flags))
                return 0
        else:
            reply = await ask(opts.state_dir, Unpair(req=1, who=opts.who))
            if not isinstance(reply, ErrorReply):
                print(f"unpaired {opts.who}; its connections were closed")
                return 0
        assert isinstance(reply, ErrorReply), reply
        print(f"corral-agent: {reply.message}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        if opts.command in ("paired", "unpair"):
            return _offline_admin(opts)
        print(f"corral-agent: {exc}", file=sys.stderr)
        return 2


def _peer_line(fingerprint: str, name: str, paired_at: float, flags: str = "") -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(paired_at))
    return f"{short(fingerprint)}  {name:<30} paired {when}  {flags}".rstrip()


def _offline_admin(opts: argparse.Namespace) -> int:
    """`paired` and `unpair` work on the pin list directly while no agent runs."""
    from corral.engine.security.pins import PinStore

    pins = PinStore(opts.state_dir / "paired-desktops.json")
    try:
        if opts.command == "paired":
            peers = pins.peers()
            if not peers:
                print("no paired desktops")
            for p in peers:
                print(_peer_line(p.fingerprint, p.name, p.paired_at))
            return 0
        if not pins.remove(opts.who):
            print(f"corral-agent: no paired desktop is named {opts.who!r}", file=sys.stderr)
            return 2
        print(f"unpaired {opts.who}")
        return 0
    except SecurityFileError as exc:
        print(f"corral-agent: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    default_state = Path(platformdirs.user_state_dir("corral-agent"))
    parser = argparse.ArgumentParser(
        prog="corral-agent",
        description="Corral worker daemon: inventory and a llama.cpp RPC worker, for paired "
        "desktops only.",
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("0.0.0.0", 7340),
        metavar="HOST:PORT",
        help="control address (default 0.0.0.0:7340); the only port the agent opens",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=default_state,
        help="identity, pairings, worker log and tensor cache",
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
        "--pairing-code",
        type=_code_arg,
        metavar="CODE",
        help="use this pairing code instead of a random one (scripted setups; still one use, "
        "5 minutes)",
    )
    parser.add_argument(
        "--trusted-network",
        action="store_true",
        help="ALSO expose the RPC worker directly on the network, unauthenticated (faster; "
        "only on a network where every machine is trusted)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in (
        ("pair", "print a new one-time pairing code from the running agent"),
        ("paired", "list the desktops this agent has paired with"),
        ("unpair", "forget a desktop: its connections close and it must pair again"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS)
        if name == "pair":
            p.add_argument("--code", type=_code_arg, help="use this code instead of a random one")
            p.add_argument(
                "--valid",
                type=float,
                default=300.0,
                metavar="SECONDS",
                help="how long the code stays valid (at most 300)",
            )
        if name == "unpair":
            p.add_argument("who", help="the desktop's name or fingerprint (8+ hex digits)")
    opts = parser.parse_args(argv)
    logging.basicConfig(
        level=opts.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if opts.command:
        return asyncio.run(_admin(opts))
    try:
        opts.state_dir.mkdir(parents=True, exist_ok=True)
        opts.state_dir.chmod(0o700)
    except OSError as exc:
        parser.error(f"cannot use --state-dir {opts.state_dir}: {exc.strerror or exc}")
    if opts.advertise_interface:
        from corral.discovery.interfaces import unknown_interfaces

        missing = unknown_interfaces(tuple(opts.advertise_interface))
        if missing:
            parser.error(f"no network interface named {', '.join(missing)}")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
