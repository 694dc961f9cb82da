"""The agent reads its worker's process state from /proc: stopped, stuck or gone looks
alive to a parent that only waits for it to exit."""

from __future__ import annotations

import signal
import subprocess
import time

from corral.engine.agent.supervisor import process_state


def _wait_for(pid: int, want: str) -> str:
    deadline = time.monotonic() + 10
    while (got := process_state(pid)) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return got


def test_process_state_of_a_real_process() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        # sleeping: nothing to report (a process just started can be in D for a moment,
        # paging in or in exec: wait for the state rather than read it once)
        assert _wait_for(proc.pid, "") == ""
        proc.send_signal(signal.SIGSTOP)
        assert _wait_for(proc.pid, "stopped by a signal") == "stopped by a signal"
        proc.send_signal(signal.SIGCONT)
        assert _wait_for(proc.pid, "") == ""
        proc.kill()
        assert _wait_for(proc.pid, "exited") == "exited"  # not reaped yet
    finally:
        proc.kill()
        proc.wait()
    assert process_state(proc.pid) == ""  # gone
