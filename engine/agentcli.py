"""`corral-agent`: the entry point of the worker daemon and its commands.

The daemon and its pairing commands are engine.agent.main's; `corral-agent doctor` is
engine.doctor.worker's, which checks the agent from above (its configuration, its port, its
worker's build) and so must not be imported by it. This module sits above both and joins
them (tests/test_layout.py keeps the layers).
"""

from __future__ import annotations

import argparse
import sys

from corral.engine.agent.main import main as agent_main


def _doctor(opts: argparse.Namespace) -> int:
    from corral.engine.doctor.worker import run_worker_doctor

    return run_worker_doctor(opts)


def main(argv: list[str] | None = None) -> int:
    return agent_main(argv, doctor=_doctor)


if __name__ == "__main__":
    sys.exit(main())
