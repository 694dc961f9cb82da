"""The Corral desktop window (a first shell: host list, plan view and chat come next)."""

from __future__ import annotations

import sys

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QLabel, QMainWindow, QVBoxLayout, QWidget

import corral


class MainWindow(QMainWindow):
    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle(f"Corral {corral.__version__}")
        self.resize(960, 600)
        body = QWidget()
        layout = QVBoxLayout(body)
        title = QLabel("Corral")
        title.setObjectName("title")
        title.setStyleSheet("font-size: 28px; font-weight: 600;")
        self.status = QLabel(
            "Hosts running corral-agent will appear here.\n"
            "Until the desktop views land, use the command line:\n"
            "  corral agents --agent HOST:PORT\n"
            "  corral chat --agent HOST:PORT --agent HOST:PORT"
        )
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(title)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.setCentralWidget(body)


def main(argv: list[str] | None = None) -> int:
    app = QApplication.instance() or QApplication(argv if argv is not None else sys.argv)
    window = MainWindow()
    window.show()
    return int(app.exec())
