"""Small live line plots: tokens/s and VRAM per GPU over time (the last few minutes)."""

from __future__ import annotations

import collections
import time

from PySide6.QtCore import QPointF, QRectF, QSize, Qt, QTimer
from PySide6.QtGui import QColor, QFontMetrics, QPainter, QPaintEvent, QPen, QPolygonF
from PySide6.QtWidgets import QWidget

from .plan import PALETTE


class LivePlot(QWidget):
    """Named series of (time, value); draws the last `window` seconds, newest on the right.

    Cheap at any rate of updates: points are only stored on `add`, and a timer repaints at
    most `fps` times a second, one polyline per series; with many series (64 GPUs) only the
    `max_series` highest are drawn and the legend says how many more there are.
    """

    def __init__(
        self,
        title: str,
        unit: str,
        window: float = 300.0,
        fixed_max: float = 0.0,
        max_series: int = 8,
        fps: int = 4,
        gap: float = 0.0,
    ) -> None:
        super().__init__()
        self.title, self.unit, self.window, self.fixed_max = title, unit, window, fixed_max
        self.gap = gap  # points further apart than this (s) are not joined: separate runs
        self.max_series = max_series
        self.series: dict[str, collections.deque[tuple[float, float]]] = {}
        self._dirty = False
        self._timer = QTimer(self)
        self._timer.setInterval(1000 // fps)
        self._timer.timeout.connect(self._repaint_if_dirty)
        self._timer.start()
        self.setMinimumHeight(56)

    def sizeHint(self) -> QSize:
        return QSize(300, 80)

    def add(self, name: str, value: float, at: float | None = None) -> None:
        points = self.series.setdefault(name, collections.deque(maxlen=1200))
        points.append((time.monotonic() if at is None else at, value))
        self._dirty = True

    def keep(self, names: set[str]) -> None:
        """Drop the series not named (a host gone or renamed takes its line with it)."""
        for name in [n for n in self.series if n not in names]:
            del self.series[name]
            self._dirty = True

    def runs(self, name: str, now: float) -> list[list[tuple[float, float]]]:
        """The series' points in the window, split where they are more than `gap` s apart."""
        out: list[list[tuple[float, float]]] = []
        last = None
        for t, v in self.series.get(name, ()):
            if now - t > self.window:
                continue
            if not out or (self.gap and last is not None and t - last > self.gap):
                out.append([])
            out[-1].append((t, v))
            last = t
        return out

    @staticmethod
    def legend(parts: list[str], hidden: int, metrics: QFontMetrics, width: int) -> list[str]:
        """The title and as many series as fit in `width`, then how many more there are
        (a legend that overflowed showed half a name)."""
        out = parts[:1]
        for k, part in enumerate(parts[1:], start=1):
            rest = len(parts) - k - 1 + hidden
            tail = f"(+{rest} more)" if rest else ""
            trial = "   ".join([*out, part, tail]).strip()
            if metrics.horizontalAdvance(trial) > width:
                hidden += len(parts) - k
                break
            out.append(part)
        if hidden > 0:
            out.append(f"(+{hidden} more)")
        return out

    def latest(self, name: str) -> float | None:
        points = self.series.get(name)
        return points[-1][1] if points else None

    def _repaint_if_dirty(self) -> None:
        if self._dirty:
            self._dirty = False
            self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        now = time.monotonic()
        shown = sorted(
            (name for name, pts in self.series.items() if pts),
            key=lambda n: -self.series[n][-1][1],
        )[: self.max_series]
        values = [v for n in shown for t, v in self.series[n] if now - t <= self.window]
        top = self.fixed_max or (max(values) * 1.15 if values else 1.0) or 1.0
        area = QRectF(4, 16, self.width() - 8, self.height() - 20)
        p.setPen(QPen(QColor("#cccccc")))
        p.drawRect(area)
        label = [self.title]
        for i, name in enumerate(shown):
            pts = self.series[name]
            p.setPen(QPen(QColor(PALETTE[i % len(PALETTE)]), 1.6))
            for run in self.runs(name, now):
                line = QPolygonF(
                    [
                        QPointF(
                            area.right() - (now - t) / self.window * area.width(),
                            area.bottom() - min(v, top) / top * area.height(),
                        )
                        for t, v in run
                    ]
                )
                p.drawPolyline(line)
            label.append(f"{name} {pts[-1][1]:.1f}{self.unit}")
        label = self.legend(label, len(self.series) - len(shown), p.fontMetrics(), self.width() - 8)
        p.setPen(self.palette().text().color())
        p.drawText(
            QRectF(4, 0, self.width() - 8, 16), Qt.AlignmentFlag.AlignLeft, "   ".join(label)
        )
        p.end()
