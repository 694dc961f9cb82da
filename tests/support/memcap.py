"""Run a command under a memory limit of its own: a memory cgroup made for the test under
this process's own (cgroup v1 or v2), so that what Corral reads as the host's free memory is
what a container with that limit would give it. Needs root, as CI has."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _own_group() -> tuple[Path, str, str] | None:
    """(folder for a new child group, limit file, tasks file) where one can be made."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (base / "memory.limit_in_bytes").exists():
                return base, "memory.limit_in_bytes", "cgroup.procs"
        if controllers == "":
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            if "memory" in (base / "cgroup.subtree_control").read_text().split():
                return base, "memory.max", "cgroup.procs"
    return None


@contextlib.contextmanager
def memory_capped(limit: int) -> Iterator[str]:
    """A new memory cgroup limited to `limit` bytes; yields the file whose writing a pid
    moves that process into it (preexec: write "0" for the calling process)."""
    found = _own_group() if os.geteuid() == 0 else None
    if found is None:
        pytest.skip("needs root and a memory cgroup this process may create children in")
    base, limit_file, tasks = found
    group = base / f"corral-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(limit))
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup under {base}: {exc}")
    try:
        yield str(group / tasks)
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


def joiner(tasks: str):  # type: ignore[no-untyped-def]
    """A preexec_fn that puts the new process into the group."""

    def join() -> None:
        with open(tasks, "w") as f:
            f.write("0")

    return join
