"""Child-process helpers shared by the agent and the desktop runtime."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def exit_text(returncode: int) -> str:
    """Human form of a child's return code ("killed by SIGKILL", "exit code 3")."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies.

    A worker or inference child orphaned by a kill -9 of its agent or desktop would otherwise
    hold a port, a GPU and gigabytes of memory until someone notices.
    """
    if sys.platform != "linux":
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
