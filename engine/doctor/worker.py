"""`corral-agent doctor`: can this host serve as a worker, and if not, what to do."""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

import corral
from corral.discovery.interfaces import usable_local_ips
from corral.engine.aio import within
from corral.engine.procs import usable_cores

from .checks import (
    FAIL,
    PASS,
    Check,
    build_checks,
    clock_check,
    kernel_check,
    listen_port_check,
    local_build,
    mdns_self_test,
    nvml_check,
    print_report,
    relay_check,
    spin_check,
    threads_check,
)


def _config_check(opts: argparse.Namespace) -> Check:
    if opts.config_error is not None:
        return Check(
            "config",
            FAIL,
            f"refused: {opts.config_error}",
            "correct that line (docs/OPERATIONS.md lists every setting); the agent will not "
            "start, and a running one keeps its settings on SIGHUP, until the file is valid",
        )
    path = opts.config.path
    if path is None:
        return Check("config", PASS, "no config file: defaults and flags")
    return Check("config", PASS, f"{path} is valid")


def _writable(name: str, folder: Path, fix: str) -> Check:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return Check(name, FAIL, f"cannot write to {folder}: {exc.strerror or exc}", fix)
    return Check(name, PASS, f"{folder} is writable")


async def _agent_running(state_dir: Path) -> bool:
    """Does an agent with this state dir answer on its admin socket?"""
    from corral.engine.agent.admin import admin_socket_path

    path = admin_socket_path(state_dir)
    if not path.exists():
        return False
    try:
        _, writer = await within(asyncio.open_unix_connection(str(path)), 2)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def worker_checks(opts: argparse.Namespace) -> list[Check]:
    from corral.engine.logfile import default_log_dir

    running = await _agent_running(opts.state_dir)
    host, port = opts.listen
    ips = usable_local_ips(tuple(opts.advertise_interface))
    local, mdns = await asyncio.gather(
        local_build(),
        mdns_self_test(ips) if not opts.no_advertise else asyncio.sleep(0, None),
    )
    checks = [_config_check(opts), *build_checks(local)]
    if not local.error:
        checks.append(await kernel_check("corral-agent doctor"))
        info = str(local.build.get("system_info", ""))
        checks.append(spin_check(info, opts.config.worker.rpc_spin, os.environ))
    checks.append(
        threads_check(opts.config.worker.rpc_threads, usable_cores(), os.cpu_count() or 1)
    )
    checks += [nvml_check(), relay_check()]
    checks.append(listen_port_check(host, port, running))
    if mdns is None:
        checks.append(Check("mDNS", PASS, "announcing is off (advertise = false)"))
    else:
        checks.append(mdns)
    checks.append(clock_check(opts.state_dir / "identity" / "cert.pem"))
    owner = "the user the agent runs as"
    checks.append(_writable("state dir", opts.state_dir, f"chown -R {owner} {opts.state_dir}"))
    log_dir = opts.log_dir or default_log_dir("corral-agent")
    checks.append(_writable("log dir", log_dir, f"chown -R {owner} {log_dir}"))
    checks.append(
        Check(
            "agent",
            PASS,
            f"an agent with state dir {opts.state_dir} is running; `corral-agent pair` prints "
            "a pairing code"
            if running
            else "not running here: start it with `corral-agent` (or systemctl start "
            "corral-agent); it prints a pairing code",
        )
    )
    return checks


def run_worker_doctor(opts: argparse.Namespace) -> int:
    checks = asyncio.run(worker_checks(opts))
    title = f"corral-agent doctor (Corral {corral.__version__})"
    return print_report(title, checks, opts.json)
