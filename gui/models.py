"""Qt models over the engine's state (which the engine owns; these only show it)."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt, Signal
from PySide6.QtGui import QColor, QPainter
from PySide6.QtWidgets import QStyledItemDelegate, QStyleOptionViewItem

from corral.discovery import Host

_COLUMNS = ("Status", "Host", "Address", "GPUs", "Memory (live)", "Speed (measured)", "Note")
GiB = 1 << 30
Index = QModelIndex | QPersistentModelIndex
NOTE = _COLUMNS.index("Note")
SPEED = _COLUMNS.index("Speed (measured)")


class HostsModel(QAbstractTableModel):
    reshaped = Signal()  # a row's status or first inventory came: its texts changed length

    def __init__(self) -> None:
        super().__init__()
        self.hosts: list[Host] = []
        self.speeds: dict[str, str] = {}  # by address: what the last plan measured there

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
        if [_shape(h) for h in old] != [_shape(h) for h in new]:
            self.reshaped.emit()

    def set_speeds(self, speeds: dict[str, str]) -> None:
        """Each host's link and device figures from the last plan (planner.speed.host_summary),
        by address; a host the plan did not measure keeps what was shown before."""
        self.speeds.update({a: t for a, t in speeds.items() if t})
        if self.hosts:
            last = len(self.hosts) - 1
            self.dataChanged.emit(self.index(0, SPEED), self.index(last, SPEED))
            self.reshaped.emit()

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
        busy = in_use_by(h)
        values = (
            "not paired" if h.status == "unpaired" else ("in use" if busy else h.status),
            h.hostname or h.name.split("._corral")[0],
            h.address,
            gpus_text(h),
            memory_text(h),
            self.speeds.get(h.address, ""),
            h.reason
            or (f"in use by {busy}: free when that session ends" if busy else "")
            or ("added by address" if h.manual and not h.advertised else ""),
        )
        return values[index.column()]

    def online_addresses(self) -> list[str]:
        """Hosts a plan can use: online, and not in use by another desktop."""
        return [h.address for h in self.hosts if h.status == "online" and not in_use_by(h)]


def in_use_by(h: Host) -> str:
    """The other desktop whose session holds this host's workers, as its last inventory
    says ("" when none, or not known)."""
    return h.inventory.in_use_by if h.inventory is not None and h.status == "online" else ""


def _shape(h: Host) -> tuple[str, bool, str, str]:
    """What decides the length of a row's texts (live figures aside)."""
    return (h.status, h.inventory is None, h.reason, in_use_by(h))


def gpus_text(h: Host) -> str:
    inv = h.inventory
    if inv is not None:
        return f"{len(inv.gpus)} × {inv.gpus[0].name}" if inv.gpus else "none"
    if h.hints is None:
        return "?"
    return str(h.hints.gpu_count) if h.hints.gpu_count else "none"


def memory_text(h: Host) -> str:
    """Live VRAM (used / total, busiest GPU's load and temperature) from the last inventory;
    RAM for a CPU-only host; the announcement's hint before the first inventory."""
    inv = h.inventory
    if inv is not None and inv.gpus:
        total = sum(g.memory_total for g in inv.gpus)
        used = total - sum(g.memory_free for g in inv.gpus)
        util = max(g.utilization_pct for g in inv.gpus)
        temp = max(g.temperature_c for g in inv.gpus)
        ours = sum(g.corral_used for g in inv.gpus)
        mine = f" ({ours / GiB:.1f} Corral)" if ours else ""
        return f"VRAM {used / GiB:.1f}{mine}/{total / GiB:.1f} GiB used, {util}% busy, {temp} °C"
    if inv is not None:
        return f"CPU only; RAM {inv.ram_free / GiB:.1f}/{inv.ram_total / GiB:.1f} GiB free"
    if h.hints is None:
        return "?"
    if not h.hints.gpu_count:  # what it announces; its RAM shows once paired
        return "CPU only"
    return f"{h.hints.vram_total / GiB:.1f} GiB VRAM"


class VramDelegate(QStyledItemDelegate):
    """The memory column as bars: one per GPU, used by Corral's worker (green), used by
    others (blue-grey), free (light); the text on top; RAM for a CPU-only host."""

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: Index) -> None:
        model = index.model()
        host = model.hosts[index.row()] if isinstance(model, HostsModel) else None
        inv = host.inventory if host is not None else None
        rect = option.rect.adjusted(2, 3, -2, -3)  # type: ignore[attr-defined]
        if inv is not None:
            # (used by Corral's worker, used by others, total)
            bars = [
                (g.corral_used, g.memory_total - g.memory_free - g.corral_used, g.memory_total)
                for g in inv.gpus
            ]
            if not bars and inv.ram_total:
                bars = [(0, inv.ram_total - inv.ram_free, inv.ram_total)]
            h = max(2, rect.height() // max(1, len(bars)))
            for i, (ours, others, total) in enumerate(bars):
                y = rect.top() + i * h
                painter.fillRect(rect.left(), y, rect.width(), h - 1, QColor("#e3eaf2"))
                if not total:
                    continue
                w_ours = int(rect.width() * ours / total)
                w_others = int(rect.width() * max(0, others) / total)
                painter.fillRect(rect.left(), y, w_ours, h - 1, QColor("#59a14f"))
                painter.fillRect(rect.left() + w_ours, y, w_others, h - 1, QColor("#9fb6cf"))
        painter.setPen(option.palette.text().color())  # type: ignore[attr-defined]
        painter.drawText(rect, Qt.AlignmentFlag.AlignVCenter, str(index.data() or ""))
