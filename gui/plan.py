"""The plan, drawn: per-device memory bars and the layer map, plus the settings that shape it.

Pure painting over the engine's `Plan` (corral.engine.planner); nothing here computes a plan.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QMouseEvent, QPainter, QPaintEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QSpinBox,
    QWidget,
)

from corral.engine.planner.kvtypes import KV_TYPES
from corral.engine.planner.plan import STRATEGIES, Plan
from corral.engine.planner.validate import Verdict
from corral.engine.runtime.session import DEFAULT_CTX, LoadSettings

MiB = 1 << 20
# one color per device, in llama.cpp's device order; the desktop's own memory is grey
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7")
HOST_COLOR = "#9c9c9c"
PARTS = (("weights", "#4e79a7"), ("KV", "#59a14f"), ("compute", "#f28e2b"))


def device_color(i: int) -> QColor:
    return QColor(HOST_COLOR if i < 0 else PALETTE[i % len(PALETTE)])


class LayerMap(QWidget):
    """One cell per layer (the last is the output layer), colored by the device holding it.

    Drag a boundary between two devices' runs to move layers from one to the other:
    `counts_chosen` then gives the per-device layer counts, which the settings turn into a
    hand-made plan (`--layers`).
    """

    counts_chosen = Signal(list)

    def __init__(self) -> None:
        super().__init__()
        self.plan: Plan | None = None
        self.cells: list[int] = []  # device per layer, as drawn (a drag edits this)
        self._drag: int | None = None  # index of the boundary being dragged
        self.setMinimumHeight(34)
        self.setMouseTracking(True)

    def set_plan(self, plan: Plan | None) -> None:
        self.plan = plan
        self.cells = list(plan.layer_device) if plan else []
        self.setToolTip(self.describe() + "\n(drag a boundary to move layers)")
        self.update()

    def counts(self) -> list[int]:
        n = len(self.plan.devices) if self.plan else 0
        return [self.cells.count(i) for i in range(n)]

    def boundaries(self) -> list[int]:
        """Indices where a new device's run starts."""
        return [i for i in range(1, len(self.cells)) if self.cells[i] != self.cells[i - 1]]

    def _cell_at(self, x: float) -> int:
        w = self.width() / max(1, len(self.cells))
        return max(0, min(len(self.cells) - 1, int(x / w)))

    def mousePressEvent(self, event: QMouseEvent) -> None:
        if not self.cells or -1 in self.cells:
            return
        w = self.width() / len(self.cells)
        x = event.position().x()
        near = [b for b in self.boundaries() if abs(b * w - x) <= max(4.0, w / 2)]
        self._drag = near[0] if near else None

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        if self._drag is None:
            return
        bounds = self.boundaries()
        if self._drag not in bounds:
            return
        k = bounds.index(self._drag)
        start = bounds[k - 1] if k > 0 else 0  # where the left device's run begins
        end = bounds[k + 1] if k + 1 < len(bounds) else len(self.cells)  # right run's end
        w = self.width() / len(self.cells)
        new = max(start + 1, min(end - 1, round(event.position().x() / w)))
        left, right = self.cells[self._drag - 1], self.cells[self._drag]
        self.cells[start:new] = [left] * (new - start)
        self.cells[new:end] = [right] * (end - new)
        self._drag = new
        self.update()

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if self._drag is not None:
            self._drag = None
            self.counts_chosen.emit(self.counts())

    def describe(self) -> str:
        if self.plan is None:
            return ""
        parts = []
        for i, d in enumerate(self.plan.devices):
            layers = self.plan.layers_of(i)
            if layers:
                parts.append(f"{d.name} ({d.host}): layers {layers[0]}–{layers[-1]}")
        return "\n".join(parts)

    def sizeHint(self) -> QSize:
        return QSize(400, 34)

    def paintEvent(self, event: QPaintEvent) -> None:
        if self.plan is None:
            return
        p = QPainter(self)
        cells = self.cells
        w = self.width() / max(1, len(cells))
        for i, dev in enumerate(cells):
            p.fillRect(QRectF(i * w, 4, max(1.0, w - 1), self.height() - 8), device_color(dev))
        p.end()


class DeviceBars(QWidget):
    """Per device: weights, KV and compute stacked against what the device has free."""

    ROW = 22

    def __init__(self) -> None:
        super().__init__()
        self.plan: Plan | None = None

    def set_plan(self, plan: Plan | None) -> None:
        self.plan = plan
        self.setToolTip(
            "per device: weights (blue), KV cache (green), compute and output buffers "
            "(orange); the line is what the device has free"
        )
        self.setMinimumHeight(self.ROW * (len(plan.devices) if plan else 0) + 4)
        self.updateGeometry()
        self.update()

    def rows(self) -> list[tuple[str, list[int], int]]:
        """(label, [weights, kv, compute] bytes, free bytes) per device."""
        if self.plan is None:
            return []
        out = []
        for d, u in zip(self.plan.devices, self.plan.usage, strict=True):
            out.append((f"{d.name} {d.host}", [u.weights, u.kv, u.compute + u.output], d.free))
        return out

    def paintEvent(self, event: QPaintEvent) -> None:
        rows = self.rows()
        if not rows:
            return
        p = QPainter(self)
        label_w = 190
        bar_w = max(50, self.width() - label_w - 150)
        scale = max(max(free, sum(parts)) for _, parts, free in rows) or 1
        for r, (label, parts, free) in enumerate(rows):
            y = r * self.ROW + 2
            p.setPen(self.palette().text().color())
            p.drawText(QRectF(0, y, label_w - 6, self.ROW), Qt.AlignmentFlag.AlignVCenter, label)
            x = float(label_w)
            for value, (_, color) in zip(parts, PARTS, strict=True):
                width = bar_w * value / scale
                p.fillRect(QRectF(x, y + 3, width, self.ROW - 6), QColor(color))
                x += width
            cap = label_w + bar_w * free / scale
            short = sum(parts) > free
            p.setPen(QColor("#b00020") if short else self.palette().text().color())
            p.drawLine(int(cap), y + 1, int(cap), y + self.ROW - 1)
            used = sum(parts) / MiB
            p.drawText(
                QRectF(label_w + bar_w + 8, y, 150, self.ROW),
                Qt.AlignmentFlag.AlignVCenter,
                f"{used:.0f} / {free / MiB:.0f} MiB" + (" SHORT" if short else ""),
            )
        p.end()


class SettingsForm(QWidget):
    """Context, cache types, flash attention, strategy; `changed` fires on every edit."""

    changed = Signal()

    def __init__(self) -> None:
        super().__init__()
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        self.ctx = QSpinBox()
        self.ctx.setRange(256, 1 << 20)
        self.ctx.setSingleStep(256)
        self.ctx.setValue(DEFAULT_CTX)
        self.type_k = QComboBox()
        self.type_v = QComboBox()
        for box in (self.type_k, self.type_v):
            box.addItems(list(KV_TYPES))
            box.setCurrentText("f16")
        self.flash = QCheckBox("flash attention")
        self.strategy = QComboBox()
        self.strategy.addItems(list(STRATEGIES))
        self.strategy.setCurrentText("balanced")
        self.layers = QLineEdit()
        self.layers.setPlaceholderText("by strategy (or per-device counts: 16,15)")
        self.layers.setToolTip(
            "Layers per device in llama.cpp's device order, the output layer included; "
            "drag a boundary in the layer map to set them"
        )
        self.messages: dict[str, QLabel] = {}
        for key, label, widget in (
            ("ctx", "Context", self.ctx),
            ("cache-type-k", "K cache", self.type_k),
            ("cache-type-v", "V cache", self.type_v),
            ("flash-attn", "", self.flash),
            ("strategy", "Strategy", self.strategy),
            ("layers", "Layers", self.layers),
        ):
            form.addRow(label, widget)
            note = QLabel("")
            note.setWordWrap(True)
            note.setVisible(False)
            form.addRow("", note)
            self.messages[key] = note
        self.ctx.valueChanged.connect(self.changed)
        self.type_k.currentTextChanged.connect(self.changed)
        self.type_v.currentTextChanged.connect(self.changed)
        self.flash.toggled.connect(self.changed)
        self.strategy.currentTextChanged.connect(self.changed)
        self.layers.editingFinished.connect(self.changed)

    def set_counts(self, counts: list[int]) -> None:
        self.layers.setText(",".join(str(c) for c in counts))
        self.changed.emit()

    def counts(self) -> tuple[int, ...] | None:
        """The hand-made layer counts, None to let the strategy decide; ValueError if the
        text is not a list of whole numbers."""
        text = self.layers.text().strip()
        if not text:
            return None
        try:
            return tuple(int(x) for x in text.replace(" ", "").split(","))
        except ValueError:
            raise ValueError(f"layers {text!r}: give whole numbers, like 16,15") from None

    def settings(self, model: Path) -> LoadSettings:
        return LoadSettings(
            model=model,
            n_ctx=self.ctx.value(),
            type_k=self.type_k.currentText(),
            type_v=self.type_v.currentText(),
            flash_attn=self.flash.isChecked(),
            strategy=self.strategy.currentText(),
            layers=self.counts(),
        )

    def show_verdicts(self, verdicts: list[Verdict]) -> list[Verdict]:
        """Put each verdict beside the setting it concerns; return those that concern none
        (memory, builds), for the general message area."""
        texts: dict[str, list[Verdict]] = {k: [] for k in self.messages}
        rest = []
        for v in verdicts:
            keys = [k for k in self.messages if f"--{k}" in v.setting]
            if not keys:
                rest.append(v)
            for k in keys:  # beside every setting it concerns
                texts[k].append(v)
        for key, label in self.messages.items():
            mine = texts[key]
            label.setVisible(bool(mine))
            error = any(v.level == "error" for v in mine)
            label.setStyleSheet("color: #b00020;" if error else "color: #a05a00;")
            label.setText("\n".join(f"{v.message}; {v.fix}" for v in mine))
        return rest
