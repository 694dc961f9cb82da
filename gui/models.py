"""Qt models over the engine's state (which the engine owns; these only show it)."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt

from corral.discovery import Host

_COLUMNS = ("Status", "Host", "Address", "GPUs", "VRAM", "Note")
Index = QModelIndex | QPersistentModelIndex


class HostsModel(QAbstractTableModel):
    def __init__(self) -> None:
        super().__init__()
        self.hosts: list[Host] = []

    def set_hosts(self, hosts: dict[str, Host]) -> None:
        self.beginResetModel()
        self.hosts = sorted(hosts.values(), key=lambda h: (h.hostname or h.name, h.address))
        self.endResetModel()

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
        hints = h.hints
        values = (
            h.status,
            h.hostname or h.name.split("._corral")[0],
            h.address,
            str(hints.gpu_count) if hints else "?",
            f"{hints.vram_total / (1 << 30):.1f} GiB" if hints else "?",
            h.reason or ("added by address" if h.manual and not h.advertised else ""),
        )
        return values[index.column()]

    def online_addresses(self) -> list[str]:
        return [h.address for h in self.hosts if h.status == "online"]
