"""The plan, drawn: per-device memory bars and the layer map, plus the settings that shape it.

Pure painting over the engine's `Plan` (corral.engine.planner); nothing here computes a plan.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QRectF, QSize, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QKeyEvent, QMouseEvent, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from corral.engine.planner.kvtypes import KV_TYPES
from corral.engine.planner.plan import HOST, STRATEGIES, Plan
from corral.engine.planner.validate import Verdict
from corral.engine.runtime.session import DEFAULT_CTX, LoadSettings

MiB = 1 << 20
# one color per device, in llama.cpp's device order; the desktop's own memory is grey
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7")
HOST_COLOR = "#9c9c9c"
PARTS = ("weights", "KV cache", "compute")  # marks in a device's color, not colors


def device_color(i: int) -> QColor:
    return QColor(HOST_COLOR if i < 0 else PALETTE[i % len(PALETTE)])


def device_label(plan: Plan, i: int) -> str:
    """A device as the window names it: its name and its host."""
    d = plan.devices[i]
    return f"{d.name} on {d.host}" if d.host and d.host not in d.name else d.name


class LayerMap(QWidget):
    """One cell per layer (the last is the output layer), colored by the device holding it
    (the same color as its bar below), each device's run labelled with its name.

    Drag a boundary between two devices' runs, or with the keyboard pick one with Up/Down
    and move it with Left/Right, to move layers from one to the other: `counts_chosen` then
    gives the per-device layer counts, which the settings turn into a hand-made plan.
    """

    counts_chosen = Signal(list)

    def __init__(self) -> None:
        super().__init__()
        self.plan: Plan | None = None
        self.cells: list[int] = []  # device per layer, as drawn (a drag edits this)
        self._drag: int | None = None  # index of the boundary being dragged
        self.focused = 0  # the boundary the keyboard moves (its index among boundaries)
        self.setMinimumHeight(34)
        self.setMouseTracking(True)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)

    def set_plan(self, plan: Plan | None) -> None:
        self.plan = plan
        self.cells = list(plan.layer_device) if plan else []
        self.focused = min(self.focused, max(0, len(self.boundaries()) - 1))
        self.setToolTip(
            self.describe() + "\n(drag a boundary, or Up/Down to pick one and Left/Right to "
            "move it, to move layers)"
        )
        self.setAccessibleDescription(self.describe())
        self.update()

    def counts(self) -> list[int]:
        n = len(self.plan.devices) if self.plan else 0
        return [self.cells.count(i) for i in range(n)]

    def boundaries(self) -> list[int]:
        """Indices where a new device's run starts."""
        return [i for i in range(1, len(self.cells)) if self.cells[i] != self.cells[i - 1]]

    def _move(self, boundary: int, to: int) -> int:
        """Move the boundary at cell `boundary` to cell `to` (kept inside its neighbours'
        runs); returns where it landed."""
        bounds = self.boundaries()
        k = bounds.index(boundary)
        start = bounds[k - 1] if k > 0 else 0  # where the left device's run begins
        end = bounds[k + 1] if k + 1 < len(bounds) else len(self.cells)  # right run's end
        new = max(start + 1, min(end - 1, to))
        left, right = self.cells[boundary - 1], self.cells[boundary]
        self.cells[start:new] = [left] * (new - start)
        self.cells[new:end] = [right] * (end - new)
        self.update()
        return new

    def mousePressEvent(self, event: QMouseEvent) -> None:
        if not self.cells or -1 in self.cells:
            return
        w = self.width() / len(self.cells)
        x = event.position().x()
        near = [b for b in self.boundaries() if abs(b * w - x) <= max(4.0, w / 2)]
        self._drag = near[0] if near else None

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        if self._drag is None or self._drag not in self.boundaries():
            return
        w = self.width() / len(self.cells)
        self._drag = self._move(self._drag, round(event.position().x() / w))

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if self._drag is not None:
            self._drag = None
            self.counts_chosen.emit(self.counts())

    def keyPressEvent(self, event: QKeyEvent) -> None:
        bounds = self.boundaries()
        key = event.key()
        if not bounds or -1 in self.cells:
            super().keyPressEvent(event)
            return
        if key in (Qt.Key.Key_Up, Qt.Key.Key_Down):
            step = 1 if key == Qt.Key.Key_Down else -1
            self.focused = (self.focused + step) % len(bounds)
            self.update()
        elif key in (Qt.Key.Key_Left, Qt.Key.Key_Right):
            b = bounds[min(self.focused, len(bounds) - 1)]
            self._move(b, b + (1 if key == Qt.Key.Key_Right else -1))
            self.counts_chosen.emit(self.counts())
        else:
            super().keyPressEvent(event)

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
        # each run's device, where the run is wide enough to say it
        start = 0
        for end in [*self.boundaries(), len(cells)]:
            dev = cells[start]
            name = device_label(self.plan, dev) if dev >= 0 else "this computer"
            rect = QRectF(start * w + 3, 4, (end - start) * w - 6, self.height() - 8)
            if p.fontMetrics().horizontalAdvance(name) <= rect.width():
                p.setPen(QColor("white"))
                p.drawText(rect, Qt.AlignmentFlag.AlignCenter, name)
            start = end
        bounds = self.boundaries()
        if self.hasFocus() and bounds:
            x = bounds[min(self.focused, len(bounds) - 1)] * w
            p.setPen(QPen(self.palette().text().color(), 3))
            p.drawLine(int(x), 0, int(x), self.height())
        p.end()


class DeviceBars(QWidget):
    """Per device, in its own color (the layer map's): weights solid, KV cache hatched,
    compute and output pale, against a line at what the device has free. Bars are scaled to
    what the biggest device needs, so a small load is not a sliver; free memory beyond the
    scale is said in words. A legend under the rows names the three marks."""

    ROW = 22

    def __init__(self) -> None:
        super().__init__()
        self.plan: Plan | None = None

    def set_plan(self, plan: Plan | None) -> None:
        self.plan = plan
        self.setToolTip(
            "per device: weights (solid), KV cache (hatched), compute and output buffers "
            "(pale); the line is what the device has free"
        )
        self.setMinimumHeight(self.ROW * ((len(plan.devices) + 1) if plan else 0) + 4)
        self.updateGeometry()
        self.update()

    def rows(self) -> list[tuple[str, int, list[int], int]]:
        """(label, device index, [weights, kv, compute] bytes, free bytes) per device."""
        plan = self.plan
        if plan is None:
            return []
        rows = [
            (device_label(plan, i), i, [u.weights, u.kv, u.compute + u.output], d.free)
            for i, (d, u) in enumerate(zip(plan.devices, plan.usage, strict=True))
        ]
        h = plan.host  # this computer's own memory (grey, as in the layer map)
        if h.total:
            parts = [h.weights + h.extra, h.kv, h.compute + h.output]
            rows.append(("this computer", HOST, parts, plan.host_free))
        return rows

    def figures(self, parts: list[int], free: int) -> str:
        used = sum(parts)
        if not free:  # not known (not checked)
            return f"{used / MiB:.0f} MiB"
        return f"{used / MiB:.0f} of {free / MiB:.0f} MiB free" + (
            f", short by {(used - free) / MiB:.0f} MiB" if used > free else ""
        )

    def layout_widths(self) -> tuple[int, int, int]:
        """(label width, bar width, figures width), each wide enough for its text."""
        metrics = self.fontMetrics()
        rows = self.rows()
        label_w = max((metrics.horizontalAdvance(r[0]) for r in rows), default=0) + 10
        text_w = max((metrics.horizontalAdvance(self.figures(r[2], r[3])) for r in rows), default=0)
        text_w += 12
        return label_w, max(50, self.width() - label_w - text_w), text_w

    def paintEvent(self, event: QPaintEvent) -> None:
        rows = self.rows()
        if not rows:
            return
        p = QPainter(self)
        label_w, bar_w, text_w = self.layout_widths()
        scale = max(sum(parts) for _, _, parts, _ in rows) * 1.15 or 1
        text = self.palette().text().color()
        for r, (label, dev, parts, free) in enumerate(rows):
            y = r * self.ROW + 2
            p.setPen(text)
            p.drawText(QRectF(0, y, label_w - 6, self.ROW), Qt.AlignmentFlag.AlignVCenter, label)
            x = float(label_w)
            for value, mark in zip(parts, PARTS, strict=True):
                width = bar_w * value / scale
                _paint_mark(p, QRectF(x, y + 3, width, self.ROW - 6), device_color(dev), mark)
                x += width
            short = 0 < free < sum(parts)
            if 0 < free <= scale:
                cap = label_w + bar_w * free / scale
                p.setPen(QPen(QColor("#b00020") if short else text, 2))
                p.drawLine(int(cap), y + 1, int(cap), y + self.ROW - 1)
            p.setPen(QColor("#b00020") if short else text)
            p.drawText(
                QRectF(label_w + bar_w + 8, y, text_w, self.ROW),
                Qt.AlignmentFlag.AlignVCenter,
                self.figures(parts, free),
            )
        y = len(rows) * self.ROW + 2  # the legend
        x = float(label_w)
        for mark in PARTS:
            _paint_mark(p, QRectF(x, y + 5, 14, self.ROW - 10), QColor(HOST_COLOR), mark)
            p.setPen(text)
            p.drawText(QRectF(x + 18, y, 120, self.ROW), Qt.AlignmentFlag.AlignVCenter, mark)
            x += 26 + p.fontMetrics().horizontalAdvance(mark)
        p.drawText(QRectF(x, y, 200, self.ROW), Qt.AlignmentFlag.AlignVCenter, "| the line: free")
        p.end()


def _paint_mark(p: QPainter, rect: QRectF, color: QColor, mark: str) -> None:
    """A bar segment in a device's color, marked by what it holds."""
    if mark == "weights":
        p.fillRect(rect, color)
    elif mark == "KV cache":
        p.fillRect(rect, color.lighter(150))
        p.fillRect(rect, QBrush(color.darker(120), Qt.BrushStyle.BDiagPattern))
    else:
        p.fillRect(rect, color.lighter(175))


def token_path(plan: Plan) -> list[tuple[str, str, str]]:
    """The stops a token makes through the plan, in order: (where, what runs there, host
    key). It starts on this computer (the token's embedding), runs each device's layers in
    turn, and ends on this computer with the logits (after the output layer, wherever it
    runs)."""
    n = len(plan.layer_device) - 1  # the output layer's index
    stops = [("this computer", "embedding", "")]
    start = 0
    for i in range(1, n + 2):
        if i <= n and plan.layer_device[i] == plan.layer_device[start]:
            continue
        dev = plan.layer_device[start]
        last = i - 1
        layers = f"layer {start}" if last == start else f"layers {start}–{last}"
        if last == n:
            layers = layers.replace(f"–{n}", f"–{n - 1} + output") if last > start else "output"
        if dev < 0:
            stops.append(("this computer", layers, ""))
        else:
            d = plan.devices[dev]
            stops.append((device_label(plan, dev), layers, d.host))
        start = i
    stops.append(("this computer", "logits, sampling", ""))
    # runs on this computer next to each other are one stop
    merged: list[tuple[str, str, str]] = []
    for stop in stops:
        if merged and merged[-1][2] == stop[2] == "" and merged[-1][0] == stop[0]:
            merged[-1] = (stop[0], f"{merged[-1][1]}, {stop[1]}", "")
        else:
            merged.append(stop)
    return merged


def network_hops(path: list[tuple[str, str, str]]) -> int:
    """Hops between two hosts (each one a round trip on the network per token)."""
    return sum(1 for a, b in itertools.pairwise(path) if a[2] != b[2])


class TopologyView(QWidget):
    """The hosts a token passes through, in order, and the network hops between them: a
    box per stop in its device's color, an arrow per hop (bold where it crosses the
    network)."""

    HEIGHT = 44

    def __init__(self) -> None:
        super().__init__()
        self.plan: Plan | None = None
        self.path: list[tuple[str, str, str]] = []
        self.setMinimumHeight(self.HEIGHT)

    def set_plan(self, plan: Plan | None) -> None:
        self.plan = plan
        self.path = token_path(plan) if plan is not None else []
        self.setToolTip(self.describe())
        self.setAccessibleDescription(self.describe())
        self.update()

    def describe(self) -> str:
        if not self.path:
            return ""
        hops = network_hops(self.path)
        route = " → ".join(f"{where} ({what})" for where, what, _ in self.path)
        return f"a token: {route}; {hops} network hop{'s' if hops != 1 else ''} per token"

    def sizeHint(self) -> QSize:
        return QSize(400, self.HEIGHT)

    def paintEvent(self, event: QPaintEvent) -> None:
        if self.plan is None or not self.path:
            return
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        n = len(self.path)
        gap = 26.0
        box_w = max(60.0, (self.width() - gap * (n - 1)) / n)
        text = self.palette().text().color()
        names = {device_label(self.plan, i): i for i in range(len(self.plan.devices))}
        for k, (where, what, host) in enumerate(self.path):
            x = k * (box_w + gap)
            rect = QRectF(x, 2, box_w, self.HEIGHT - 4)
            color = device_color(names.get(where, HOST))
            p.fillRect(rect, color.lighter(160))
            p.setPen(QPen(color, 2))
            p.drawRect(rect)
            p.setPen(text)
            metrics = p.fontMetrics()
            top = metrics.elidedText(where, Qt.TextElideMode.ElideMiddle, int(box_w - 6))
            low = metrics.elidedText(what, Qt.TextElideMode.ElideRight, int(box_w - 6))
            p.drawText(
                rect.adjusted(3, 2, -3, -rect.height() / 2), Qt.AlignmentFlag.AlignCenter, top
            )
            p.drawText(
                rect.adjusted(3, rect.height() / 2, -3, -2), Qt.AlignmentFlag.AlignCenter, low
            )
            if k + 1 < n:
                crosses = host != self.path[k + 1][2]
                y = self.HEIGHT / 2
                p.setPen(
                    QPen(
                        text,
                        2.5 if crosses else 1,
                        Qt.PenStyle.SolidLine if crosses else Qt.PenStyle.DashLine,
                    )
                )
                p.drawLine(int(x + box_w + 2), int(y), int(x + box_w + gap - 4), int(y))
                p.drawLine(int(x + box_w + gap - 9), int(y - 4), int(x + box_w + gap - 4), int(y))
                p.drawLine(int(x + box_w + gap - 9), int(y + 4), int(x + box_w + gap - 4), int(y))
        p.end()


class SettingsForm(QWidget):
    """Context, cache types, flash attention, strategy; `changed` fires on every edit."""

    changed = Signal()

    def __init__(self) -> None:
        super().__init__()
        # the settings in a grid of four (label, field) pairs a row, their messages under
        # it: a form a line per setting left the chat too little room at 1280x720
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        grid = QGridLayout()
        outer.addLayout(grid)
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
        self.slots = QSpinBox()
        self.slots.setRange(1, 16)
        self.slots.setValue(1)
        self.slots.setToolTip(
            "Replies decoded together, each with Context / Slots tokens of the cache: 2 or "
            "more to serve an API to other tools beside this chat"
        )
        self.layers = QLineEdit()
        self.layers.setPlaceholderText("by strategy (or per-device counts: 16,15)")
        self.layers.setToolTip(
            "Layers per device in llama.cpp's device order, the output layer included; "
            "drag a boundary in the layer map to set them"
        )
        self.messages: dict[str, QLabel] = {}
        self.fix_buttons: dict[str, QPushButton] = {}
        self._fix: dict[str, Callable[[], None]] = {}
        for n, (key, label, widget) in enumerate(
            (
                ("ctx", "&Context", self.ctx),
                ("cache-type-k", "&K cache", self.type_k),
                ("cache-type-v", "&V cache", self.type_v),
                ("flash-attn", "", self.flash),
                ("strategy", "&Strategy", self.strategy),
                ("layers", "La&yers", self.layers),
                ("parallel", "Sl&ots", self.slots),
            )
        ):
            row, col = divmod(n, 4)
            if label:
                buddy = QLabel(label)
                buddy.setBuddy(widget)
                grid.addWidget(buddy, row, 2 * col)
            grid.addWidget(widget, row, 2 * col + 1)
            line = QHBoxLayout()
            note = QLabel("")
            note.setWordWrap(True)
            note.setVisible(False)
            line.addWidget(note, 1)
            self.messages[key] = note
            button = QPushButton("")
            button.setVisible(False)
            button.clicked.connect(lambda _=False, k=key: self._apply_fix(k))
            line.addWidget(button)
            self.fix_buttons[key] = button
            outer.addLayout(line)
        self.flash.setText("&flash attention")
        self.ctx.valueChanged.connect(self.changed)
        self.type_k.currentTextChanged.connect(self.changed)
        self.type_v.currentTextChanged.connect(self.changed)
        self.flash.toggled.connect(self.changed)
        self.strategy.currentTextChanged.connect(self.changed)
        self.layers.editingFinished.connect(self.changed)
        self.slots.valueChanged.connect(self.changed)

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
            parallel=self.slots.value(),
        )

    def show_verdicts(self, verdicts: list[Verdict]) -> list[Verdict]:
        """Put each verdict beside the first setting it concerns (once, in the window's
        words), with a button that applies its fix where one setting does it; return those
        that concern no setting here (memory, builds), for the general message area."""
        texts: dict[str, list[Verdict]] = {k: [] for k in self.messages}
        rest = []
        for v in verdicts:
            keys = [k for k in self.messages if f"--{k}" in v.setting]
            if keys:
                texts[keys[0]].append(v)
            else:
                rest.append(v)
        for key, label in self.messages.items():
            mine = texts[key]
            label.setVisible(bool(mine))
            error = any(v.level == "error" for v in mine)
            label.setStyleSheet("color: #b00020;" if error else "color: #a05a00;")
            label.setText("\n".join(window_words(f"{v.message}; {v.fix}") for v in mine))
            fix = next((f for v in mine for f in self.fixes(v)), None)
            button = self.fix_buttons[key]
            button.setVisible(fix is not None)
            if fix is not None:
                button.setText(fix[0])
                self._fix[key] = fix[1]
        return rest

    def fixes(self, verdict: Verdict) -> list[tuple[str, Callable[[], None]]]:
        """One-click fixes the verdict's advice names, as (button text, action)."""
        out: list[tuple[str, Callable[[], None]]] = []
        advice = verdict.fix
        if "--flash-attn on" in advice and not self.flash.isChecked():
            out.append(("Turn on flash attention", lambda: self.flash.setChecked(True)))
        for which, box in (("k", self.type_k), ("v", self.type_v)):
            match = re.search(rf"--cache-type-{which} (\S+?)[,;)]?(?:\s|$)", advice)
            if match and match.group(1) in KV_TYPES and box.currentText() != match.group(1):
                kind = match.group(1)
                label = f"Use a {kind} {which.upper()} cache"
                out.append((label, lambda b=box, t=kind: b.setCurrentText(t)))
        if "--strategy balanced" in advice and self.strategy.currentText() != "balanced":
            out.append(
                ("Use the balanced strategy", lambda: self.strategy.setCurrentText("balanced"))
            )
        match = re.search(r"--ctx (\d+)", advice)
        if match:
            n = int(match.group(1))
            out.append((f"Use context {n}", lambda: self.ctx.setValue(n)))
        return out

    def _apply_fix(self, key: str) -> None:
        action = self._fix.get(key)
        if action is not None:
            action()


def window_words(text: str) -> str:
    """A message written for the command line, in the window's words: its flags become the
    settings the form shows (the window has no --reserve: free memory instead)."""
    for flag, words in (
        ("turn flash attention on (--flash-attn on)", "turn on flash attention"),
        ("--flash-attn on", "flash attention on"),
        ("--flash-attn off", "flash attention off"),
        ("--cache-type-k", "K cache"),
        ("--cache-type-v", "V cache"),
        ("--ctx", "context"),
        ("--layers", "layers"),
        ("--parallel", "Slots"),
        ("a smaller --reserve", "more free memory"),
        ("--reserve", "the memory kept free"),
        ("--swa-cache", "the sliding-window cache"),
        ("--strategy balanced", "the balanced strategy"),
        ("--strategy speed", "the speed strategy"),
    ):
        text = text.replace(flag, words)
    return text
