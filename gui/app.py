"""The Corral desktop window: hosts on the left, load and chat on the right.

The engine (discovery, heartbeats, the chat session) runs on its own asyncio thread; the
window only submits coroutines and receives signals through the bridge, so nothing here
blocks on a socket, a file or the model.
"""

from __future__ import annotations

import concurrent.futures
import gc
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from PySide6.QtCore import QSettings, QStringListModel, Qt
from PySide6.QtGui import (
    QCloseEvent,
    QDragEnterEvent,
    QDropEvent,
    QGuiApplication,
    QKeySequence,
    QShortcut,
    QTextCursor,
)
from PySide6.QtWidgets import (
    QApplication,
    QCompleter,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QTableView,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

import corral
from corral.discovery import Hosts, Inventoried
from corral.engine.model import default_model_path
from corral.engine.procs import cap_malloc_arenas
from corral.engine.runtime import history
from corral.engine.runtime.chatcontrol import ChatController, History, Recovered, Replied
from corral.engine.runtime.childproto import Shift
from corral.engine.runtime.errors import InferenceCrashed
from corral.engine.runtime.hosts import HostDirectory
from corral.engine.runtime.kvstatus import KvStatus, ReplyUpdate
from corral.engine.runtime.session import LoadResult, LoadSettings

from .bridge import Bridge
from .engine_thread import EngineThread
from .models import HostsModel, VramDelegate
from .plan import DeviceBars, LayerMap, SettingsForm
from .plots import LivePlot

T = TypeVar("T")


class MainWindow(QMainWindow):
    def __init__(self, browse: bool = True, agents: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.setWindowTitle(f"Corral {corral.__version__}")
        self.resize(1360, 720)
        self.bridge = Bridge()
        self.engine = EngineThread()
        # the chat lives on the engine thread; this window keeps only what commands return
        self.chat = ChatController()
        self.history: History = ()  # the chat's messages after the last command that changed it
        self._submitted: set[concurrent.futures.Future[Any]] = set()
        self.result: LoadResult | None = None
        self.plan: Any = None
        self._replan = False
        self.verdicts: list[Any] = []
        self._shifts = 0
        self.messages: list[tuple[str, str]] = []
        self.max_tokens = 256
        self._reply_tokens = 0
        self.load_progress = 0.0
        self._deployed_size = 0  # bytes of the model last deployed, for load progress
        self._build()
        self.directory = HostDirectory(
            lambda hosts, e: self.bridge.post(self._hosts_changed, dict(hosts), e),
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
        self.hosts_view.setItemDelegateForColumn(4, VramDelegate(self.hosts_view))
        header = self.hosts_view.horizontalHeader()
        # sized when hosts come and go, not on every live update (measuring every cell of
        # every row at each inventory stalled the window with 16 hosts)
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        self.hosts_model.modelReset.connect(self.hosts_view.resizeColumnsToContents)
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
        lv.addWidget(QLabel("Saved chats (double-click to continue one)"))
        self.chats = QListWidget()
        self.chats.setMaximumHeight(120)
        self.chats.itemDoubleClicked.connect(self._open_chat)
        lv.addWidget(self.chats)
        self._refresh_chats()
        lv.addWidget(QLabel("Events"))
        self.events = QPlainTextEdit()
        self.events.setReadOnly(True)
        self.events.setMaximumBlockCount(500)
        lv.addWidget(self.events)

        right = QWidget()
        rv = QVBoxLayout(right)
        model_row = QHBoxLayout()
        self.model_edit = QLineEdit(str(default_model_path()))
        self.model_edit.setToolTip("A GGUF file: type, pick with …, or drop one on the window")
        recent = QSettings("Corral", "Corral").value("models/recent") or []
        self._recent = QStringListModel([str(p) for p in recent])
        completer = QCompleter(self._recent, self)
        completer.setCompletionMode(QCompleter.CompletionMode.UnfilteredPopupCompletion)
        self.model_edit.setCompleter(completer)
        self.setAcceptDrops(True)
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
        self.layer_map.counts_chosen.connect(self.settings_form.set_counts)
        rv.addWidget(self.layer_map)
        self.device_bars = DeviceBars()
        rv.addWidget(self.device_bars)
        self.plan_text = QPlainTextEdit()
        self.plan_text.setReadOnly(True)
        self.plan_text.setMaximumHeight(110)
        rv.addWidget(self.plan_text)
        self.transcript = QTextBrowser()
        self.transcript.setOpenExternalLinks(True)
        rv.addWidget(self.transcript, 1)
        plots = QHBoxLayout()
        self.speed_plot = LivePlot("tokens/s", "")
        self.vram_plot = LivePlot("memory used", "%", fixed_max=100.0)
        plots.addWidget(self.speed_plot)
        plots.addWidget(self.vram_plot)
        rv.addLayout(plots)
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
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self._stop)
        self.regen_button = QPushButton("Regenerate")
        self.regen_button.setEnabled(False)
        self.regen_button.clicked.connect(self._regenerate)
        self.copy_button = QPushButton("Copy")
        self.copy_button.clicked.connect(self._copy)
        self.save_button = QPushButton("Save…")
        self.save_button.clicked.connect(self._save_chat)
        self.new_button = QPushButton("New chat")
        self.new_button.clicked.connect(self._new_chat)
        for b in (
            self.stop_button,
            self.regen_button,
            self.copy_button,
            self.save_button,
            self.new_button,
        ):
            send_row.addWidget(b)
        rv.addLayout(send_row)
        QShortcut(QKeySequence("Ctrl+Return"), self, self._send)
        QShortcut(QKeySequence("Escape"), self, self._stop)
        QShortcut(QKeySequence("Ctrl+N"), self, self._new_chat)
        self.status = QLabel("Hosts running corral-agent appear on the left.")
        rv.addWidget(self.status)

        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(left)
        self.splitter.addWidget(right)
        self.splitter.setSizes([620, 740])
        self.setCentralWidget(self.splitter)
        # where the user left the window (geometry, splitter), per user (QSettings)
        state = QSettings("Corral", "Corral")
        geometry = state.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)  # type: ignore[arg-type]
        split_state = state.value("window/splitter")
        if split_state is not None:
            self.splitter.restoreState(split_state)  # type: ignore[arg-type]

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
            self.set_model(path)

    def _current(self) -> LoadSettings:
        return self.settings_form.settings(Path(self.model_edit.text().strip()))

    def _submit(
        self,
        coro: Coroutine[Any, Any, T],
        on_ok: Callable[[T], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        """Run `coro` on the engine thread and one callback with its outcome on this one; the
        future is kept until then, so Cancel can cancel what it submitted."""
        future = self.engine.submit(coro)
        self._submitted.add(future)
        future.add_done_callback(self._submitted.discard)
        self.bridge.deliver(future, on_ok, on_error)

    def _working(self, what: str) -> None:
        self.banner.setText("")
        self.status.setText(what)
        self.busy.setRange(0, 0)
        self.plan_button.setEnabled(False)
        self.load_button.setEnabled(False)
        self.cancel_button.setEnabled(True)

    def _idle(self) -> None:
        self.busy.setRange(0, 1)
        self.busy.setTextVisible(False)
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
        try:
            settings = self._current()
        except ValueError as exc:  # a malformed layer list
            self.banner.setText(str(exc))
            return
        self._working("planning…")

        addresses = self.hosts_model.online_addresses()
        self._submit(self.chat.plan(addresses, settings), self._planned, self._failed)

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
        """Stop the plan or deploy under way: what this window submitted is cancelled where
        it awaits (its callbacks never run) and the session is closed, so no model is loaded
        afterwards."""
        for future in list(self._submitted):
            future.cancel()
        self.engine.submit(self.chat.close())
        self.result = None
        self._idle()
        self.load_button.setEnabled(True)
        self.send_button.setEnabled(False)
        self.status.setText("cancelled: nothing is loaded; press Deploy to load")

    def _load(self) -> None:
        try:
            settings = self._current()
        except ValueError as exc:
            self.banner.setText(str(exc))
            return
        self._working(f"deploying on {len(self.hosts_model.online_addresses()) or 'no'} host(s)…")

        size = settings.model.stat().st_size if settings.model.is_file() else 0
        self._deployed_size = size
        started = time.monotonic()
        self.load_progress = 0.0

        def progress(fraction: float) -> None:  # engine thread
            self.bridge.post(self._on_progress, fraction, size, started)

        # a model already loaded (or crashed) is replaced by a fresh session
        addresses, fresh = self.hosts_model.online_addresses(), self.result is not None
        self._submit(
            self.chat.load(addresses, settings, fresh, progress), self._loaded, self._failed
        )

    def _on_progress(self, fraction: float, size: int, started: float) -> None:
        """Bytes of the model read and sent to the devices, the rate, and what is left."""
        self.load_progress = max(self.load_progress, fraction)
        elapsed = max(time.monotonic() - started, 1e-3)
        done = fraction * size
        rate = done / elapsed
        eta = (size - done) / rate if rate > 0 else 0.0
        self.busy.setRange(0, 1000)
        self.busy.setValue(round(fraction * 1000))
        self.busy.setTextVisible(True)
        self.busy.setFormat(
            f"{fraction:.0%} of {size / 2**20:.0f} MiB, {rate / 2**20:.0f} MiB/s, {eta:.0f} s left"
        )
        self.status.setText(f"loading: {self.busy.format()}")

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
        if result.cpu_note():
            lines.append(result.cpu_note())
        lines += [f"warning: {w}" for w in result.warnings]
        self.plan_text.setPlainText("\n".join(lines))
        self.status.setText(f"loaded in {result.load_s:.1f} s")

    def _failed(self, error: Any) -> None:
        self._idle()
        self.load_button.setEnabled(True)
        self.send_button.setEnabled(self.result is not None)
        self.banner.setText(str(error))
        self.status.setText("")

    def _send(self, text: str = "") -> None:
        text = text or self.input.text().strip()
        if not text or self.result is None or not self.send_button.isEnabled():
            return
        self.input.clear()
        self.send_button.setEnabled(False)
        self.regen_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.messages.append(("you", text))
        self.messages.append(("assistant", ""))
        self._render()
        bridge = self.bridge

        def on_update(update: ReplyUpdate) -> None:  # engine thread
            bridge.post(self._on_update, update)

        self._reply_tokens = 0
        self._submit(self.chat.ask(text, self.max_tokens, on_update), self._replied, self._crashed)

    def _render(self) -> None:
        """The whole chat as Markdown (a reply is re-rendered when it is complete)."""
        parts = [f"**{who}:** {text}" for who, text in self.messages]
        self.transcript.setMarkdown("\n\n".join(parts))
        self.transcript.moveCursor(QTextCursor.MoveOperation.End)

    def _on_update(self, update: ReplyUpdate) -> None:
        """One token or context shift of the reply under way (kvstatus.ReplyMeter's)."""
        if update.shift is not None:
            self._on_shift(update.shift)
        if update.text:
            self._on_token(update.text, update.kv.gen_tok_s)
        self._on_kv(update.kv)

    def _on_token(self, text: str, rate: float) -> None:
        who, sofar = self.messages[-1]
        self.messages[-1] = (who, sofar + text)
        cursor = self.transcript.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertText(text)
        self.transcript.setTextCursor(cursor)
        self._reply_tokens += 1
        if self._reply_tokens % 8 == 0 and rate > 0:
            self.speed_plot.add("chat", rate)

    def _on_kv(self, status: KvStatus) -> None:
        self.kv_bar.setValue(round(status.fill * 100))
        per_device = ", ".join(
            f"{name} {used / 2**20:.1f} MiB" for name, used in status.device_bytes.items()
        )
        self.kv_bar.setFormat(
            f"KV cache %p% ({status.used}/{status.n_ctx} cells"
            + (f"; {per_device}" if per_device else "")
            + (f"; {self._shifts} context shifts" if self._shifts else "")
            + ")"
        )

    def _on_shift(self, frame: Shift) -> None:
        self._shifts += 1
        self.messages.append(("context shift", f"dropped {frame.n_discard} tokens"))
        self.log(f"context shift: dropped {frame.n_discard} tokens to keep going")

    def _replied(self, replied: Replied) -> None:
        done, self.history = replied.done, replied.history
        self.send_button.setEnabled(True)
        self.regen_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.stop_button.setText("Stop")
        reply = [i for i, (who, _) in enumerate(self.messages) if who == "assistant"]
        if reply:
            self.messages[reply[-1]] = ("assistant", done.content)
        self._render()
        rate = done.n_tokens / done.gen_s if done.gen_s else 0.0
        if rate:
            self.speed_plot.add("chat", rate)
        self.status.setText(f"{done.n_tokens} tokens, {rate:.1f} tok/s, stop: {done.stop}")

    def _crashed(self, error: Any) -> None:
        self.send_button.setEnabled(False)
        self.stop_button.setEnabled(False)
        self.stop_button.setText("Stop")
        self.log(f"chat failed: {error}")
        if not isinstance(error, InferenceCrashed):
            self.banner.setText(f"{error} — press “Deploy” to load again")
            return
        # the model went down with the reply: load it again on the hosts that answer, and
        # keep the chat; the reply cut short stays in the transcript as it was
        self.banner.setText(f"{error} — loading the model again…")
        self._working("loading the model again on the hosts that answer…")
        started = time.monotonic()
        size = self._deployed_size

        def progress(fraction: float) -> None:  # engine thread
            self.bridge.post(self._on_progress, fraction, size, started)

        self._submit(self.chat.recover(error.cause, progress), self._recovered, self._failed)

    def _recovered(self, recovered: Recovered) -> None:
        self._loaded(recovered.result)
        self.history = recovered.history
        self.banner.setText(recovered.line)
        self.log(recovered.line)

    def _stop(self) -> None:
        if self.stop_button.isEnabled():
            self.engine.loop.call_soon_threadsafe(self.chat.cancel_reply)
            # a second press kills the inference process (a worker stopped answering)
            self.stop_button.setText("Stop now")

    def _regenerate(self) -> None:
        if self.result is None or not self.regen_button.isEnabled():
            return
        self.regen_button.setEnabled(False)
        self._submit(self.chat.take_back(), self._answer_again, self._not_regenerated)

    def _answer_again(self, text: str) -> None:
        last_you = max(i for i, (who, _) in enumerate(self.messages) if who == "you")
        self.messages = self.messages[:last_you]
        self._send(text)

    def _not_regenerated(self, error: BaseException) -> None:  # nothing to take back yet
        self.banner.setText(str(error))
        self.regen_button.setEnabled(True)

    def _copy(self) -> None:
        replies = [text for who, text in self.messages if who == "assistant" and text]
        if replies:
            QGuiApplication.clipboard().setText(replies[-1])
            self.status.setText("copied the last reply")

    def _new_chat(self) -> None:
        if self.stop_button.isEnabled():
            return  # a reply is streaming: stop it first
        self.history = ()
        self._submit(self.chat.set_history([]), lambda _: None, self._failed)
        self.messages = []
        self._shifts = 0
        self._render()
        self.kv_bar.setValue(0)
        self.regen_button.setEnabled(False)
        self.status.setText("new chat")

    # ------------------------------------------------------------------ saved chats

    def _refresh_chats(self) -> None:
        self.chats.clear()
        try:
            self.chats.addItems(history.names())
        except OSError as exc:
            self.log(f"cannot list saved chats: {exc}")

    def _save_chat(self) -> None:
        if not self.history:
            self.banner.setText("Nothing to save yet: chat first.")
            return
        name, ok = QInputDialog.getText(self, "Save chat", "Name (letters, digits, . _ -):")
        if not ok or not name.strip():
            return
        try:
            path = history.save(name.strip(), [dict(m) for m in self.history])
        except (history.HistoryError, OSError) as exc:
            self.banner.setText(str(exc))
            return
        self.status.setText(f"saved to {path}")
        self._refresh_chats()

    def _open_chat(self, item: QListWidgetItem) -> None:
        """Continue a saved chat on the loaded model (its history becomes the context)."""
        try:
            messages = history.load(item.text())
        except (history.HistoryError, OSError) as exc:
            self.banner.setText(str(exc))
            return
        if self.result is None:
            self.banner.setText("Deploy a model first, then open the chat to continue it.")
            return
        self.history = tuple(messages)
        self._submit(self.chat.set_history(messages), lambda _: None, self._failed)
        self.messages = [
            ("you" if m["role"] == "user" else m["role"], m["content"]) for m in messages
        ]
        self._render()
        self.status.setText(f"continuing {item.text()}")

    # ------------------------------------------------------------------ model files

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        urls = event.mimeData().urls() if event.mimeData().hasUrls() else []
        if any(u.toLocalFile().endswith(".gguf") for u in urls):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        for u in event.mimeData().urls():
            if u.toLocalFile().endswith(".gguf"):
                self.set_model(u.toLocalFile())
                event.acceptProposedAction()
                return

    def set_model(self, path: str) -> None:
        """Use this GGUF, and remember it among the recent ones (the model field's completer)."""
        self.model_edit.setText(path)
        state = QSettings("Corral", "Corral")
        recent = [path, *[p for p in (state.value("models/recent") or []) if p != path]][:10]
        state.setValue("models/recent", recent)
        self._recent.setStringList(recent)

    def log(self, text: str) -> None:
        self.events.appendPlainText(f"{time.strftime('%H:%M:%S')}  {text}")

    def _hosts_changed(self, hosts: dict[str, Any], event: Any) -> None:
        before = {h.key: h.status for h in self.hosts_model.hosts}
        self.hosts_model.set_hosts(hosts)
        names = [h.hostname for h in hosts.values()]
        for key, h in hosts.items():
            # the address too when two hosts share a hostname
            name = h.hostname if h.hostname and names.count(h.hostname) == 1 else h.address
            if before.get(key) != h.status:
                self.log(f"{name}: {h.status}" + (f" ({h.reason})" if h.reason else ""))
            inv = h.inventory
            if inv is None or not isinstance(event, Inventoried) or event.key != key:
                continue
            for g in inv.gpus:
                if g.memory_total:
                    used = 100.0 * (g.memory_total - g.memory_free) / g.memory_total
                    self.vram_plot.add(f"{name}/GPU{g.index}", used)
            if not inv.gpus and inv.ram_total:
                self.vram_plot.add(f"{name} RAM", 100.0 * (1 - inv.ram_free / inv.ram_total))

    # ------------------------------------------------------------------ shutdown

    def closeEvent(self, event: QCloseEvent) -> None:
        if not self.engine.loop.is_running():  # closed before (tests close twice)
            super().closeEvent(event)
            return
        state = QSettings("Corral", "Corral")
        state.setValue("window/geometry", self.saveGeometry())
        state.setValue("window/splitter", self.splitter.saveState())

        async def shutdown() -> None:
            await self.chat.close()
            await self.directory.close()

        try:
            self.engine.submit(shutdown()).result(timeout=15)
        except Exception:  # closing must not hang on a broken engine
            pass
        self.engine.stop()
        super().closeEvent(event)


def main(argv: list[str] | None = None) -> int:
    cap_malloc_arenas()  # before any thread starts (engine/procs.py says why)
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
