"""How much memory this host can still give: RAM, and a memory cgroup's limit where one
applies (the agent's inventory and the desktop's plan both ask)."""

from __future__ import annotations

from pathlib import Path


def read_memory() -> tuple[int, int]:
    """(total, available) RAM in bytes."""
    try:
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
        return fields.get("MemTotal", 0), fields.get("MemAvailable", 0)
    except (OSError, ValueError, IndexError):
        return 0, 0


def cgroup_memory_left(proc: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process's memory cgroups (and their parents) still allow, None without a
    limit: a container's cap, which /proc/meminfo does not show and the kernel enforces by
    killing. cgroup v2 (memory.max, memory.current) and v1 (memory.limit_in_bytes,
    memory.usage_in_bytes)."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    left: int | None = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, limit_file, used_file = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # v1
            base = Path("/sys/fs/cgroup/memory")
            limit_file, used_file = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        folder = base / path.lstrip("/")
        while True:
            try:
                limit_text = (folder / limit_file).read_text().strip()
                used = int((folder / used_file).read_text().strip())
            except (OSError, ValueError):
                limit_text, used = "max", 0
            if limit_text != "max" and int(limit_text) < 1 << 60:  # v1 says "no limit" so
                room = max(0, int(limit_text) - used)
                left = room if left is None else min(left, room)
            if folder == base or folder.parent == folder:
                break
            folder = folder.parent
    return left


def host_available_memory() -> int:
    """Bytes a new allocation on this host can take: /proc/meminfo's MemAvailable, or what
    the process's memory cgroup still allows where that is less (0: unknown)."""
    available = read_memory()[1]
    capped = cgroup_memory_left()
    if capped is not None:
        available = min(available, capped) if available else capped
    return available
