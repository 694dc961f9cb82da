"""The Corral desktop window: hosts on the left, load and chat on the right.

The engine (discovery, heartbeats, the chat session) runs on its own asyncio thread; the
window only submits coroutines and receives signals through the bridge, so nothing here
blocks on a socket, a file or the model.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMainWindow,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

import corral
from corral.discovery import Hosts
from corral.engine.model import default_model_path
from corral.engine.runtime.hosts import HostDirectory
from corral.engine.runtime.kvstatus import kv_status
from corral.engine.runtime.session import ChatSession, LoadResult, LoadSettings

from .bridge import Bridge
from .engine_thread import EngineThread
from .models import HostsModel


class MainWindow(QMainWindow):
    def __init__(self, browse: bool = True, agents: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.setWindowTitle(f"Corral {corral.__version__}")
        self.resize(1360, 720)
        self.bridge = Bridge()
        self.engine = EngineThread()
        self.session: ChatSession | None = None
        self.result: LoadResult | None = None
        self._shifts = 0
        self._build()
        self.directory = HostDirectory(
            lambda hosts, _e: self.bridge.post(self.hosts_model.set_hosts, dict(hosts)),
            browse=browse,
            inventory_every=2.0,
        )
        self.engine.submit(self._start_directory(agents))

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        left = QWidget()
        lv = QVBoxLayout(left)
        lv.addWidget(QLabel("Hosts"))
        self.hosts_model = HostsModel()
        self.hosts_view = QTableView()
        self.hosts_view.setModel(self.hosts_model)
        header = self.hosts_view.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.hosts_view.verticalHeader().setVisible(False)
        lv.addWidget(self.hosts_view)
        add_row = QHBoxLayout()
        self.add_edit = QLineEdit()
        self.add_edit.setPlaceholderText("HOST:PORT of an agent mDNS cannot see")
        self.add_button = QPushButton("Add host")
        self.add_button.clicked.connect(self._add_host)
        add_row.addWidget(self.add_edit)
        add_row.addWidget(self.add_button)
        lv.addLayout(add_row)

        right = QWidget()
        rv = QVBoxLayout(right)
        model_row = QHBoxLayout()
        self.model_edit = QLineEdit(str(default_model_path()))
        browse = QPushButton("…")
        browse.clicked.connect(self._pick_model)
        self.load_button = QPushButton("Load on online hosts")
        self.load_button.clicked.connect(self._load)
        model_row.addWidget(QLabel("Model"))
        model_row.addWidget(self.model_edit, 1)
        model_row.addWidget(browse)
        model_row.addWidget(self.load_button)
        rv.addLayout(model_row)
        self.banner = QLabel("")
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet("color: #b00020;")
        rv.addWidget(self.banner)
        self.plan_text = QPlainTextEdit()
        self.plan_text.setReadOnly(True)
        self.plan_text.setMaximumHeight(140)
        rv.addWidget(self.plan_text)
        self.transcript = QPlainTextEdit()
        self.transcript.setReadOnly(True)
        rv.addWidget(self.transcript, 1)
        self.kv_bar = QProgressBar()
        self.kv_bar.setFormat("KV cache %p%")
        rv.addWidget(self.kv_bar)
        send_row = QHBoxLayout()
        self.input = QLineEdit()
        self.input.setPlaceholderText("Message (Enter to send)")
        self.input.returnPressed.connect(self._send)
        self.send_button = QPushButton("Send")
        self.send_button.clicked.connect(self._send)
        self.send_button.setEnabled(False)
        send_row.addWidget(self.input, 1)
        send_row.addWidget(self.send_button)
        rv.addLayout(send_row)
        self.status = QLabel("Hosts running corral-agent appear on the left.")
        rv.addWidget(self.status)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(right)
        split.setSizes([700, 660])
        self.setCentralWidget(split)

    # ------------------------------------------------------------------ hosts

    async def _start_directory(self, agents: tuple[str, ...]) -> None:
        for address in agents:
            self.directory.add_manual(address)
        await self.directory.start()

    def _add_host(self) -> None:
        text = self.add_edit.text().strip()
        if not text:
            return

        async def add() -> None:
            self.directory.add_manual(text)

        self.bridge.deliver(
            self.engine.submit(add()),
            lambda _r: self.add_edit.clear(),
            lambda e: self.banner.setText(str(e)),
        )

    def hosts(self) -> Hosts:
        return {h.key: h for h in self.hosts_model.hosts}

    # ------------------------------------------------------------------ load and chat

    def _pick_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a GGUF model", "", "GGUF (*.gguf)")
        if path:
            self.model_edit.setText(path)

    def _load(self) -> None:
        addresses = self.hosts_model.online_addresses()
        model = Path(self.model_edit.text().strip())
        self.banner.setText("")
        self.load_button.setEnabled(False)
        self.status.setText(f"loading on {len(addresses) or 'no'} host(s)…")

        async def load() -> LoadResult:
            if self.session is not None:
                await self.session.close()
            self.session = ChatSession(addresses)
            return await self.session.open(LoadSettings(model=model, n_ctx=2048))

        self.bridge.deliver(self.engine.submit(load()), self._loaded, self._failed)

    def _loaded(self, result: Any) -> None:
        self.result = result
        self.load_button.setEnabled(True)
        self.send_button.setEnabled(True)
        lines = [p.describe() for p in result.placements]
        if result.comparison is not None:
            lines += [
                f"{name}: planned {p / 2**20:.1f} MiB, llama.cpp {a / 2**20:.1f} MiB"
                for name, p, a, _ in result.comparison.rows()
            ]
        self.plan_text.setPlainText("\n".join(lines))
        self.status.setText(f"loaded in {result.load_s:.1f} s")

    def _failed(self, error: Any) -> None:
        self.load_button.setEnabled(True)
        self.send_button.setEnabled(self.result is not None)
        self.banner.setText(str(error))
        self.status.setText("")

    def _send(self) -> None:
        text = self.input.text().strip()
        if not text or self.session is None or not self.send_button.isEnabled():
            return
        self.input.clear()
        self.send_button.setEnabled(False)
        self.transcript.appendPlainText(f"you: {text}\nassistant: ")
        session, bridge, plan = self.session, self.bridge, self.result.plan if self.result else None

        async def reply() -> dict[str, Any]:
            done: dict[str, Any] = {}
            async for frame in session.ask(text, max_tokens=256):
                if frame["op"] == "token":
                    bridge.post(self._on_token, frame["text"])
                    bridge.post(self._on_kv, kv_status(plan, frame["kv_used"], frame["n_ctx"]))
                elif frame["op"] == "done":
                    done = frame
            return done

        self.bridge.deliver(self.engine.submit(reply()), self._replied, self._crashed)

    def _on_token(self, text: str) -> None:
        cursor = self.transcript.textCursor()
        cursor.movePosition(cursor.MoveOperation.End)
        cursor.insertText(text)
        self.transcript.setTextCursor(cursor)

    def _on_kv(self, status: Any) -> None:
        self.kv_bar.setValue(round(status.fill * 100))
        self.kv_bar.setFormat(f"KV cache %p% ({status.used}/{status.n_ctx} cells)")

    def _replied(self, done: Any) -> None:
        self.send_button.setEnabled(True)
        rate = done["n_tokens"] / done["gen_s"] if done.get("gen_s") else 0.0
        self.status.setText(f"{done['n_tokens']} tokens, {rate:.1f} tok/s, stop: {done['stop']}")

    def _crashed(self, error: Any) -> None:
        self.banner.setText(f"{error} — press “Load on online hosts” to load again")
        self.send_button.setEnabled(False)

    # ------------------------------------------------------------------ shutdown

    def closeEvent(self, event: QCloseEvent) -> None:
        async def shutdown() -> None:
            if self.session is not None:
                await self.session.close()
            await self.directory.close()

        try:
            self.engine.submit(shutdown()).result(timeout=15)
        except Exception:  # closing must not hang on a broken engine
            pass
        self.engine.stop()
        super().closeEvent(event)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv
    app = QApplication.instance() or QApplication(args)
    agents = tuple(a.split("=", 1)[1] for a in args[1:] if a.startswith("--agent="))
    window = MainWindow(agents=agents)
    window.show()
    code = int(app.exec())
    # Tear the window down while Qt still runs: left to interpreter shutdown, PySide6's
    # garbage collection of it crashed ("bool_dealloc ... refcount error").
    window.deleteLater()
    app.processEvents()
    del window
    gc.collect()
    return code
