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
    QInputDialog,
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
from .plan import DeviceBars, LayerMap, SettingsForm


class MainWindow(QMainWindow):
    def __init__(self, browse: bool = True, agents: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.setWindowTitle(f"Corral {corral.__version__}")
        self.resize(1360, 720)
        self.bridge = Bridge()
        self.engine = EngineThread()
        self.session: ChatSession | None = None
        self.result: LoadResult | None = None
        self.plan: Any = None
        self._replan = False
        self.verdicts: list[Any] = []
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
        self.hosts_view.setSelectionBehavior(QTableView.SelectionBehavior.SelectRows)
        self.hosts_view.setSelectionMode(QTableView.SelectionMode.SingleSelection)
        lv.addWidget(self.hosts_view)
        add_row = QHBoxLayout()
        self.add_edit = QLineEdit()
        self.add_edit.setPlaceholderText("HOST:PORT of an agent mDNS cannot see")
        self.add_button = QPushButton("Add host")
        self.add_button.clicked.connect(self._add_host)
        add_row.addWidget(self.add_edit)
        add_row.addWidget(self.add_button)
        lv.addLayout(add_row)
        pair_row = QHBoxLayout()
        self.pair_button = QPushButton("Pair…")
        self.pair_button.setToolTip(
            "Pair with the selected host: type the code `corral-agent pair` prints there"
        )
        self.pair_button.clicked.connect(self._pair)
        self.unpair_button = QPushButton("Unpair")
        self.unpair_button.clicked.connect(self._unpair)
        pair_row.addWidget(self.pair_button)
        pair_row.addWidget(self.unpair_button)
        pair_row.addStretch(1)
        lv.addLayout(pair_row)

        right = QWidget()
        rv = QVBoxLayout(right)
        model_row = QHBoxLayout()
        self.model_edit = QLineEdit(str(default_model_path()))
        browse = QPushButton("…")
        browse.clicked.connect(self._pick_model)
        model_row.addWidget(QLabel("Model"))
        model_row.addWidget(self.model_edit, 1)
        model_row.addWidget(browse)
        rv.addLayout(model_row)
        plan_row = QHBoxLayout()
        self.settings_form = SettingsForm()
        self.settings_form.changed.connect(self._settings_changed)
        plan_row.addWidget(self.settings_form, 2)
        buttons = QVBoxLayout()
        self.plan_button = QPushButton("Plan on online hosts")
        self.plan_button.setToolTip("Start the workers, check the settings, and show the plan")
        self.plan_button.clicked.connect(self._plan)
        self.load_button = QPushButton("Deploy")
        self.load_button.setToolTip("Load the model as planned")
        self.load_button.clicked.connect(self._load)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self._cancel)
        self.busy = QProgressBar()
        self.busy.setRange(0, 1)
        self.busy.setTextVisible(False)
        for w in (self.plan_button, self.load_button, self.cancel_button, self.busy):
            buttons.addWidget(w)
        buttons.addStretch(1)
        plan_row.addLayout(buttons, 1)
        rv.addLayout(plan_row)
        self.banner = QLabel("")
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet("color: #b00020;")
        rv.addWidget(self.banner)
        self.layer_map = LayerMap()
        rv.addWidget(self.layer_map)
        self.device_bars = DeviceBars()
        rv.addWidget(self.device_bars)
        self.plan_text = QPlainTextEdit()
        self.plan_text.setReadOnly(True)
        self.plan_text.setMaximumHeight(110)
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

    def selected_host(self) -> Any:
        rows = self.hosts_view.selectionModel().selectedRows()
        if rows:
            return self.hosts_model.hosts[rows[0].row()]
        unpaired = [h for h in self.hosts_model.hosts if h.status == "unpaired"]
        return unpaired[0] if len(unpaired) == 1 else None

    def _pair(self) -> None:
        host = self.selected_host()
        if host is None:
            self.banner.setText("Select the host to pair with first.")
            return
        code, ok = QInputDialog.getText(
            self,
            "Pair with a host",
            f"Pairing code shown by {host.hostname or host.address}\n"
            "(run `corral-agent pair` there for a new one):",
        )
        if not ok or not code.strip():
            return
        self.status.setText(f"pairing with {host.address}…")
        self.bridge.deliver(
            self.engine.submit(self.directory.pair(host.key, code.strip())),
            lambda name: (self.banner.setText(""), self.status.setText(f"paired with {name}")),
            lambda e: (self.banner.setText(str(e)), self.status.setText("")),
        )

    def _unpair(self) -> None:
        host = self.selected_host()
        if host is None:
            self.banner.setText("Select the host to unpair first.")
            return
        self.bridge.deliver(
            self.engine.submit(self.directory.unpair(host.key)),
            lambda _r: self.status.setText(f"unpaired {host.hostname or host.address}"),
            lambda e: self.banner.setText(str(e)),
        )

    def hosts(self) -> Hosts:
        return {h.key: h for h in self.hosts_model.hosts}

    # ------------------------------------------------------------------ load and chat

    def _pick_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a GGUF model", "", "GGUF (*.gguf)")
        if path:
            self.model_edit.setText(path)

    def _current(self) -> LoadSettings:
        return self.settings_form.settings(Path(self.model_edit.text().strip()))

    async def _connected(self, fresh: bool = False) -> ChatSession:
        """The session for the hosts online now: reused while they are the same, else new
        (which starts their workers and takes their leases)."""
        addresses = self.hosts_model.online_addresses()
        old = self.session
        if (
            not fresh
            and old is not None
            and [c.address for c in old.clients] == addresses
            and old.workers
            and not any(c.closed_reason for c in old.clients)
        ):
            return old
        if old is not None:
            await old.close()
        self.session = ChatSession(addresses)
        await self.session.connect()
        return self.session

    def _working(self, what: str) -> None:
        self.banner.setText("")
        self.status.setText(what)
        self.busy.setRange(0, 0)
        self.plan_button.setEnabled(False)
        self.load_button.setEnabled(False)
        self.cancel_button.setEnabled(True)

    def _idle(self) -> None:
        self.busy.setRange(0, 1)
        self.plan_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _settings_changed(self) -> None:
        """The plan follows the settings (once there is one to follow)."""
        if self.plan is None:
            return
        if self.plan_button.isEnabled():
            self._plan()
        else:
            self._replan = True  # after the run in progress

    def _replan_if_asked(self) -> None:
        if self._replan:
            self._replan = False
            self._plan()

    def _plan(self) -> None:
        settings = self._current()
        self._working("planning…")

        async def plan() -> tuple[Any, list[Any]]:
            session = await self._connected()
            _, exact = await session.plan(settings)
            return exact, list(session.verdicts)

        self.bridge.deliver(self.engine.submit(plan()), self._planned, self._failed)

    def _planned(self, got: Any) -> None:
        plan, verdicts = got
        self._idle()
        self.plan = plan
        self.verdicts = verdicts
        self.layer_map.set_plan(plan)
        self.device_bars.set_plan(plan)
        rest = self.settings_form.show_verdicts(verdicts)
        errors = [v for v in verdicts if v.level == "error"]
        self.banner.setText("\n".join(str(v) for v in rest if v.level == "error"))
        lines = [self.layer_map.describe()]
        lines += [f"warning: {v}" for v in rest if v.level != "error"]
        self.plan_text.setPlainText("\n".join(x for x in lines if x))
        self.load_button.setEnabled(not errors)
        self.status.setText(
            "refused: fix the settings marked in red" if errors else "planned: ready to deploy"
        )
        self._replan_if_asked()

    def _cancel(self) -> None:
        session = self.session
        self.session = None
        if session is not None:
            self.engine.submit(session.close())
        self.status.setText("cancelled")

    def _load(self) -> None:
        settings = self._current()
        self._working(f"deploying on {len(self.hosts_model.online_addresses()) or 'no'} host(s)…")

        async def load() -> LoadResult:
            # a model already loaded (or crashed) is replaced by a fresh session
            session = await self._connected(fresh=self.result is not None)
            return await session.open_after_connect(settings)

        self.bridge.deliver(self.engine.submit(load()), self._loaded, self._failed)

    def _loaded(self, result: Any) -> None:
        self._idle()
        self.result = result
        self.load_button.setEnabled(True)
        self.send_button.setEnabled(True)
        if result.plan is not None:
            self.plan = result.plan
            self.layer_map.set_plan(result.plan)
            self.device_bars.set_plan(result.plan)
        lines = [p.describe() for p in result.placements]
        if result.comparison is not None:
            lines += [
                f"{name}: planned {p / 2**20:.1f} MiB, llama.cpp {a / 2**20:.1f} MiB"
                for name, p, a, _ in result.comparison.rows()
            ]
        self.plan_text.setPlainText("\n".join(lines))
        self.status.setText(f"loaded in {result.load_s:.1f} s")

    def _failed(self, error: Any) -> None:
        self._idle()
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
        self.banner.setText(f"{error} — press “Deploy” to load again")
        self.send_button.setEnabled(False)

    # ------------------------------------------------------------------ shutdown

    def closeEvent(self, event: QCloseEvent) -> None:
        if not self.engine.loop.is_running():  # closed before (tests close twice)
            super().closeEvent(event)
            return

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
