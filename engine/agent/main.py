"""`corral-agent`: the worker daemon, and its local pairing commands.

corral-agent [--config FILE] [--listen HOST:PORT] [--state-dir DIR] [--pairing-code CODE] ...
corral-agent pair      a new one-time pairing code (from the running agent)
corral-agent paired    the desktops this agent has paired with
corral-agent unpair X  forget a desktop (name or fingerprint prefix)
corral-agent doctor    check this worker: llama.cpp build, devices, NVML, port, mDNS, clock

Settings come from the command line, then the config file (--config, else
~/.config/corral-agent/agent.toml when it exists), then defaults. SIGHUP reloads the file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import platformdirs

from corral.engine.logfile import setup_logging
from corral.engine.procs import cap_malloc_arenas, die_with_parent
from corral.engine.security.files import SecurityFileError
from corral.engine.security.identity import short

from .config import (
    DEFAULT_PORT,
    LOG_LEVELS,
    AgentConfig,
    ConfigError,
    default_config_path,
    load_config,
)
from .server import AgentServer

log = logging.getLogger("corral.agent")

_TRUSTED_WARNING = (
    "corral-agent: WARNING: --trusted-network exposes the llama.cpp RPC worker, which has no "
    "authentication and has had remote-code-execution bugs, to everyone who can reach this "
    "host. Use it only on a network where you trust every machine."
)


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT); port 0 picks a free one."""
    from .config import parse_listen as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _code_arg(text: str) -> str:
    from corral.engine.security.pairing import check_chosen_code

    try:
        check_chosen_code(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _code_file_arg(text: str) -> str:
    """--pairing-code-file: the code from the first line of a file, or of stdin for '-'
    (a code on the command line is visible to every local user in `ps`)."""
    try:
        if text == "-":
            line = sys.stdin.readline()
        else:
            with open(text, encoding="utf-8") as f:
                line = f.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read a pairing code from {text}: {exc}") from None
    return _code_arg(line.strip())


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
            settings=opts.config.worker,
        )
    except SecurityFileError as exc:
        print(f"corral-agent: {exc}", file=sys.stderr)
        return 2
    # from here on a SIGHUP reloads the config instead of ending the agent
    loop.add_signal_handler(signal.SIGHUP, _reload, opts, server)
    if opts.trusted_network:
        print(_TRUSTED_WARNING, file=sys.stderr, flush=True)
    # The code is active before the port opens: a scripted `corral pair` sent as soon as the
    # port accepts must find it (start() also announces on mDNS, which takes a while).
    code = server.gate.issue(opts.pairing_code or "")
    try:
        bound = await server.start()
    except OSError as exc:
        print(
            f"corral-agent: cannot listen on {host}:{port}: {exc.strerror or exc} "
            "(`corral-agent doctor` says what holds the port)",
            file=sys.stderr,
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
        f"pairing code: {code} (valid 5 minutes, one use; `corral-agent pair` makes a new one)",
        flush=True,
    )
    log.info(
        "started",
        extra={
            "agent_id": server.agent_id,
            "listen": f"{host}:{bound}",
            "config": opts.config_text,
        },
    )
    await stop.wait()
    log.info("stopping")
    await server.close()
    return 0


def _reload(opts: argparse.Namespace, server: AgentServer) -> None:
    """SIGHUP: read the config file again; a file that cannot be used changes nothing."""
    path = opts.config.path
    if path is None:
        log.warning("SIGHUP: no config file to reload (start with --config FILE)")
        return
    try:
        new = load_config(path, required=True)
    except ConfigError as exc:
        log.error("config not reloaded, keeping the current settings: %s", exc)
        return
    server.apply(new.worker)
    if new.log_level and not opts.log_level_flag:
        logging.getLogger().setLevel(new.log_level)
    old = opts.config
    later = [
        name
        for name, a, b in (
            ("listen", old.listen, new.listen),
            ("advertise", old.advertise, new.advertise),
            ("interfaces", old.interfaces, new.interfaces),
            ("state_dir", old.state_dir, new.state_dir),
            ("log_dir", old.log_dir, new.log_dir),
        )
        if a != b
    ]
    if later:
        log.warning("config: %s change only when the agent restarts", ", ".join(later))
    opts.config = new
    log.warning("config reloaded from %s", path, extra={"config": str(path)})


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral-agent",
        description="Corral worker daemon: inventory and a llama.cpp RPC worker, for paired "
        "desktops only. Flags override the config file.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"TOML settings (default: {default_config_path()} when it exists); SIGHUP reloads it",
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        metavar="HOST:PORT",
        help=f"control address (default 0.0.0.0:{DEFAULT_PORT}); the only port the agent opens",
    )
    parser.add_argument(
        "--state-dir", type=Path, help="identity, pairings, worker log and tensor cache"
    )
    parser.add_argument(
        "--no-advertise",
        action="store_true",
        default=None,
        help="do not announce this agent on the LAN (mDNS)",
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
        "5 minutes; visible in `ps`: prefer --pairing-code-file)",
    )
    parser.add_argument(
        "--pairing-code-file",
        type=_code_file_arg,
        dest="pairing_code",
        metavar="PATH",
        help="the pairing code from the first line of PATH ('-' reads it from stdin)",
    )
    parser.add_argument(
        "--trusted-network",
        action="store_true",
        help="ALSO expose the RPC worker directly on the network, unauthenticated (faster; "
        "only on a network where every machine is trusted)",
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help=argparse.SUPPRESS,  # agents a desktop process starts for itself (LocalAgents)
    )
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, help="default INFO")
    parser.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="where corral-agent.log (JSON lines, rotated) goes (default: the platform's log dir)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in (
        ("pair", "print a new one-time pairing code from the running agent"),
        ("paired", "list the desktops this agent has paired with"),
        ("unpair", "forget a desktop: its connections close and it must pair again"),
        ("doctor", "check this worker and say how to fix what is wrong"),
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
        if name == "doctor":
            p.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE")
            p.add_argument(
                "--listen", type=parse_listen, default=argparse.SUPPRESS, metavar="HOST:PORT"
            )
            p.add_argument("--json", action="store_true", help="one JSON object per check")
    return parser


def _settle(opts: argparse.Namespace, config: AgentConfig) -> None:
    """Flags, else the config file, else the defaults, into `opts`."""
    opts.listen = opts.listen or config.listen or ("0.0.0.0", DEFAULT_PORT)
    opts.state_dir = (
        opts.state_dir or config.state_dir or Path(platformdirs.user_state_dir("corral-agent"))
    )
    if opts.no_advertise is None:
        opts.no_advertise = config.advertise is False
    opts.advertise_interface = opts.advertise_interface or list(config.interfaces or ())
    opts.log_level_flag = opts.log_level is not None
    opts.log_level = opts.log_level or config.log_level or "INFO"
    opts.log_dir = opts.log_dir or config.log_dir
    opts.config = config


def main(
    argv: list[str] | None = None, doctor: Callable[[argparse.Namespace], int] | None = None
) -> int:
    """The agent's commands; `doctor` runs `corral-agent doctor` (engine.agentcli passes
    engine.doctor.worker's, which sits above the agent and so is not imported here)."""
    cap_malloc_arenas()  # before any thread starts (engine/procs.py says why)
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.exit_with_parent:
        die_with_parent()  # a kill -9 of the process that started it takes it (and its worker)
    explicit = opts.config is not None
    path = opts.config or default_config_path()
    opts.config_error = None
    try:
        config = load_config(path, required=explicit)
    except ConfigError as exc:
        if opts.command != "doctor":  # the doctor reports it with the other checks
            print(f"corral-agent: config refused: {exc}", file=sys.stderr)
            return 2
        config, opts.config_error = AgentConfig(path=path), exc
    opts.config_text = str(path) if config.path else ""
    _settle(opts, config)
    if opts.command == "doctor":
        if doctor is None:
            parser.error("the doctor runs from the corral-agent command (engine.agentcli)")
        return doctor(opts)
    if opts.command:
        logging.basicConfig(level=opts.log_level, format="%(levelname)s %(name)s: %(message)s")
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
    setup_logging("corral-agent", opts.log_level, opts.log_dir)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(opts))
    return 0
