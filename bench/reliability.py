"""The reliability suite: every fault N times against real processes, load, and a soak.

Faults (tests/support/faults.py): kill -9 of an RPC worker and of an agent, each during load
and during generation; the desktop's inference child killed; an agent restarted on the same
host; the desktop's state dir on a full disk; a network partition (link down, silent drop)
in network namespaces (root). Healing without the user (heal-*): `corral serve` and an
openai-SDK client streaming a reply while a worker is killed or stopped (SIGSTOP), an agent
killed, or a link cut; the client must see an error, then be answered again with nobody
doing anything. Load: 100 control clients at once, 10,000 connection attempts
a minute. Soak: continuous chat over two agents with a worker killed every minute.
Prints docs/RELIABILITY.md's table.

    .venv/bin/python bench/reliability.py [--trials 20] [--soak-minutes 30] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path
from corral.engine.procs import cap_malloc_arenas
from tests.support import faults
from tests.support.agents import inventory
from tests.support.faults import Trial
from tests.support.netns import Lan, LanUnavailable
from tests.support.watch import start_agent

NAMES = (
    "worker-gen",
    "worker-load",
    "agent-gen",
    "agent-load",
    "child",
    "restart",
    "disk",
    "agent-disk",
    "partition",
    "heal-worker",
    "heal-stop",
    "heal-agent",
    "heal-link",
    "clients",
    "flood",
    "soak",
)


def _repeat(n: int, one: Callable[[], Trial]) -> list[Trial]:
    out = []
    for i in range(n):
        try:
            trial = one()
        except Exception as exc:  # a trial that breaks is a failed trial, with the reason
            trial = Trial("?", False, note=f"{type(exc).__name__}: {exc}")
        out.append(trial)
        print(
            f"  {i + 1}/{n} {trial.fault}: ok={trial.ok} detect={trial.detect_s} "
            f"recover={trial.recover_s} {trial.note}",
            flush=True,
        )
    return out


def _span(xs: list[float | None]) -> str:
    got = [x for x in xs if x is not None]
    if not got:
        return "–"
    return f"{statistics.median(got):.2f} / {max(got):.2f} s"


def row(trials: list[Trial]) -> str:
    name = next((t.fault for t in trials if t.fault != "?"), "?")
    ok = sum(t.ok for t in trials)
    notes = sorted({t.note for t in trials if t.note and not t.ok})
    return (
        f"| {name} | {len(trials)} | {ok}/{len(trials)} ok | {_span([t.detect_s for t in trials])} "
        f"| {_span([t.recover_s for t in trials])} | {'; '.join(notes)[:300]} |"
    )


def main() -> int:
    cap_malloc_arenas()  # this process is the desktop here: start it as `corral` starts
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--soak-minutes", type=float, default=30)
    parser.add_argument(
        "--restart-every", type=float, default=60, help="seconds between worker kills in the soak"
    )
    parser.add_argument("--only", nargs="*", choices=NAMES, default=list(NAMES))
    parser.add_argument("--json", type=Path, help="write every trial and figure here too")
    opts = parser.parse_args()
    # a timeout's SIGTERM unwinds like Ctrl+C, so agents and namespaces are cleaned up
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # pairings, keys and saved chats of this run stay apart from the user's own
    os.environ.setdefault("CORRAL_STATE_DIR", tempfile.mkdtemp(prefix="corral-reliability-"))
    n, only = opts.trials, set(opts.only)
    faults.mark_run()
    results: dict[str, Any] = {}
    rows: list[str] = []

    def run(name: str, trials: list[Trial]) -> None:
        results[name] = [t.__dict__ for t in trials]
        rows.append(row(trials))
        print(rows[-1], flush=True)

    with LocalAgents(2) as agents:
        on_agents = {
            "worker-gen": lambda: faults.worker_kill(agents, "generation"),
            "worker-load": lambda: faults.worker_kill(agents, "load"),
            "agent-gen": lambda: faults.agent_kill(agents, "generation"),
            "agent-load": lambda: faults.agent_kill(agents, "load"),
            "child": lambda: faults.child_kill(agents),
            "restart": lambda: faults.agent_restart(agents),
        }
        for name, trial in on_agents.items():
            if name in only:
                run(name, _repeat(n, lambda trial=trial: asyncio.run(trial())))
        if "clients" in only:
            results["clients"] = asyncio.run(faults.many_clients(agents.addresses[0], 100))
            print(json.dumps(results["clients"]), flush=True)
        if "flood" in only:
            results["flood"] = faults.flood(agents.addresses[0], agents.procs[0].pid)
            print(json.dumps(results["flood"]), flush=True)
    for name, on_disk in (("disk", faults.disk_full), ("agent-disk", faults.agent_disk_full)):
        if name in only:
            with tempfile.TemporaryDirectory() as tmp:
                run(name, _repeat(n, lambda f=on_disk: f(Path(tempfile.mkdtemp(dir=tmp)))))
    model = default_model_path()
    if only & {"heal-worker", "heal-stop"}:
        with LocalAgents(2) as agents:
            stopped: list[int] = []

            def kill_worker() -> None:
                os.kill(inventory(agents.addresses[0]).worker.pid, signal.SIGKILL)

            def stop_worker() -> None:
                stopped.append(inventory(agents.addresses[1]).worker.pid)
                os.kill(stopped[-1], signal.SIGSTOP)

            def go_on() -> None:  # the agent killed it to start again; in case it did not
                for pid in stopped:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)

            heals = {
                "heal-worker": ("API: worker kill -9", kill_worker, lambda: None),
                "heal-stop": ("API: worker SIGSTOP", stop_worker, go_on),
            }
            for name, (what, inject, restore) in heals.items():
                if name in only:
                    run(
                        name,
                        _repeat(
                            n,
                            lambda what=what, inject=inject, restore=restore: faults.api_heal(
                                what, faults.local_spawn, agents.addresses, model, inject, restore
                            ),
                        ),
                    )
    if "heal-agent" in only:
        with LocalAgents(1) as stays:

            def agent_trial() -> Trial:
                with LocalAgents(1) as goes:
                    return faults.api_heal(
                        "API: agent kill -9",
                        faults.local_spawn,
                        [stays.addresses[0], goes.addresses[0]],
                        model,
                        lambda: os.kill(goes.procs[0].pid, signal.SIGKILL),
                    )

            run("heal-agent", _repeat(n, agent_trial))
    if "heal-link" in only:
        try:
            with Lan(3) as lan:
                for i in (1, 2):
                    start_agent(lan, i, desktop=3)
                time.sleep(1)
                on_lan = [f"{lan.address(1)}:7340", f"{lan.address(2)}:7340"]

                def in_host_3(argv: list[str], **kw: Any) -> subprocess.Popen[str]:
                    return lan.spawn(3, argv, **kw)

                run(
                    "heal-link",
                    _repeat(
                        n,
                        lambda: faults.api_heal(
                            "API: link down",
                            in_host_3,
                            on_lan,
                            model,
                            lambda: lan.link(2, False),
                            lambda: lan.link(2, True),
                        ),
                    ),
                )
        except LanUnavailable as exc:
            print(f"heal-link: skipped ({exc})")
    if "partition" in only:
        try:
            with Lan(3) as lan:
                agents_up = [start_agent(lan, i, desktop=3) for i in (1, 2)]
                time.sleep(1)
                model = default_model_path()
                for mode in ("link down", "silent drop"):
                    run(mode, _repeat(n, lambda mode=mode: faults.partition(lan, mode, model)))
                del agents_up
        except LanUnavailable as exc:
            print(f"partition: skipped ({exc})")
    if "soak" in only:
        with LocalAgents(2) as agents:
            results["soak"] = asyncio.run(
                faults.soak(agents, opts.soak_minutes, opts.restart_every)
            )
        print(json.dumps(results["soak"]), flush=True)
    leaked = faults.left_behind()
    results["leaked_processes"] = leaked
    print()
    print(
        "| fault | trials | outcome | detected (median / max) "
        "| usable again (median / max) | failures |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    print(f"processes left behind: {len(leaked)} {leaked[:3]}")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
