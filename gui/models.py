"""Qt models over the engine's state (which the engine owns; these only show it)."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt

from corral.discovery import Host

_COLUMNS = ("Status", "Host", "Address", "GPUs", "Memory (live)", "Note")
GiB = 1 << 30
Index = QModelIndex | QPersistentModelIndex


class HostsModel(QAbstractTableModel):
    def __init__(self) -> None:
        super().__init__()
        self.hosts: list[Host] = []

    def set_hosts(self, hosts: dict[str, Host]) -> None:
        """Show `hosts`. The usual update (same hosts, fresher inventories, once a second per
        host) only repaints the rows that changed; a reset, which makes the view measure
        every cell again, is kept for hosts coming and going."""
        new = sorted(hosts.values(), key=lambda h: (h.hostname or h.name, h.address))
        if [h.key for h in new] != [h.key for h in self.hosts]:
            self.beginResetModel()
            self.hosts = new
            self.endResetModel()
            return
        old, self.hosts = self.hosts, new
        last = len(_COLUMNS) - 1
        for row, (a, b) in enumerate(zip(old, new, strict=True)):
            if a is not b and a != b:
                self.dataChanged.emit(self.index(row, 0), self.index(row, last))

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.hosts)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(_COLUMNS)

    def headerData(
        self,
        section: int,
        orientation: Qt.Orientation,
        role: int = Qt.ItemDataRole.DisplayRole,
    ) -> Any:
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return _COLUMNS[section]
        return None

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or role != Qt.ItemDataRole.DisplayRole:
            return None
        h = self.hosts[index.row()]
        values = (
            "not paired" if h.status == "unpaired" else h.status,
            h.hostname or h.name.split("._corral")[0],
            h.address,
            gpus_text(h),
            memory_text(h),
            h.reason or ("added by address" if h.manual and not h.advertised else ""),
        )
        return values[index.column()]

    def online_addresses(self) -> list[str]:
        return [h.address for h in self.hosts if h.status == "online"]


def gpus_text(h: Host) -> str:
    inv = h.inventory
    if inv is not None:
        return f"{len(inv.gpus)} × {inv.gpus[0].name}" if inv.gpus else "none"
    return str(h.hints.gpu_count) if h.hints else "?"


def memory_text(h: Host) -> str:
    """Live VRAM (used / total, busiest GPU's load and temperature) from the last inventory;
    RAM for a CPU-only host; the announcement's hint before the first inventory."""
    inv = h.inventory
    if inv is not None and inv.gpus:
        total = sum(g.memory_total for g in inv.gpus)
        used = total - sum(g.memory_free for g in inv.gpus)
        util = max(g.utilization_pct for g in inv.gpus)
        temp = max(g.temperature_c for g in inv.gpus)
        return f"VRAM {used / GiB:.1f}/{total / GiB:.1f} GiB used, {util}% busy, {temp} °C"
    if inv is not None:
        return f"CPU only; RAM {inv.ram_free / GiB:.1f}/{inv.ram_total / GiB:.1f} GiB free"
    return f"{h.hints.vram_total / GiB:.1f} GiB VRAM" if h.hints else "?"
