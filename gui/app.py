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

from PySide6.QtCore import QSettings, QStringListModel, Qt, QTimer
from PySide6.QtGui import (
    QCloseEvent,
    QDragEnterEvent,
    QDropEvent,
    QGuiApplication,
    QKeySequence,
    QShortcut,
)
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
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
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

import corral
from corral.discovery import Hosts, Inventoried
from corral.engine.model import default_model_path
from corral.engine.procs import cap_malloc_arenas
from corral.engine.runtime import history
from corral.engine.runtime.chatcontrol import (
    ChatController,
    History,
    Recovered,
    Replied,
)
from corral.engine.runtime.childproto import Shift
from corral.engine.runtime.errors import InferenceCrashed, WouldUnload
from corral.engine.runtime.hosts import HostDirectory
from corral.engine.runtime.kvstatus import KvStatus, ReplyUpdate
from corral.engine.runtime.session import LoadResult, LoadSettings
from corral.engine.security.identity import short

from .bridge import Bridge
from .engine_thread import EngineThread
from .models import HostsModel, VramDelegate
from .plan import DeviceBars, LayerMap, SettingsForm, TopologyView, window_words
from .plots import LivePlot
from .transcript import Transcript

T = TypeVar("T")

DEFAULT_MAX_REPLY = 1024
CONTINUE = "Continue from where you stopped."
FIRST_RUN = (
    "<b>No hosts yet.</b> On each machine with a GPU, in a checkout of Corral, run "
    "<code>sudo packaging/install-worker.sh</code>: it starts the agent and prints a pairing "
    "code (<code>corral-agent pair</code> prints a new one). Hosts on this network appear "
    "here by themselves; add others by address below, select one, press Pair… and type "
    "its code. Until then, Deploy runs the model on this computer's CPU."
)


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
        self.running: tuple[LoadSettings, tuple[str, ...]] | None = None  # what is loaded
        self._api_url = ""  # where the API beside the chat serves, while it does
        self.loaded_at = ""
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
        self.hosts_view.setTabKeyNavigation(False)  # Tab leaves the table; arrows move in it
        header = self.hosts_view.horizontalHeader()
        # sized when hosts come and go or change status, not on every live update
        # (measuring every cell of every row at each inventory stalled the window with 16)
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        self.hosts_model.modelReset.connect(self.hosts_view.resizeColumnsToContents)
        self.hosts_model.reshaped.connect(self.hosts_view.resizeColumnsToContents)
        self.hosts_view.verticalHeader().setVisible(False)
        self.hosts_view.setSelectionBehavior(QTableView.SelectionBehavior.SelectRows)
        self.hosts_view.setSelectionMode(QTableView.SelectionMode.SingleSelection)
        self.hosts_view.selectionModel().selectionChanged.connect(self._host_buttons)
        self.hosts_model.modelReset.connect(self._host_buttons)
        self.hosts_model.dataChanged.connect(self._host_buttons)
        lv.addWidget(self.hosts_view)
        self.first_run = QLabel(FIRST_RUN)
        self.first_run.setWordWrap(True)
        self.first_run.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lv.addWidget(self.first_run)
        add_row = QHBoxLayout()
        self.add_edit = QLineEdit()
        self.add_edit.setPlaceholderText("HOST:PORT of an agent mDNS cannot see")
        self.add_edit.returnPressed.connect(self._add_host)
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
        self.unpair_button = QPushButton("Unpair…")
        self.unpair_button.clicked.connect(self._unpair)
        pair_row.addWidget(self.pair_button)
        pair_row.addWidget(self.unpair_button)
        pair_row.addStretch(1)
        lv.addLayout(pair_row)
        self.pair_note = QLabel("")  # pairing's outcome, beside the buttons that asked
        self.pair_note.setWordWrap(True)
        lv.addWidget(self.pair_note)
        lv.addWidget(QLabel("Saved chats (double-click to continue one)"))
        self.chats = QListWidget()
        self.chats.setMaximumHeight(120)
        self.chats.itemDoubleClicked.connect(self._open_chat)
        self.chats.itemActivated.connect(self._open_chat)  # Enter, for the keyboard
        lv.addWidget(self.chats)
        self._refresh_chats()
        lv.addWidget(QLabel("Events"))
        self.events = QPlainTextEdit()
        self.events.setReadOnly(True)
        self.events.setMaximumBlockCount(500)
        self.events.setTabChangesFocus(True)
        lv.addWidget(self.events)

        # the right side: what runs (a bar), the plan (its settings and drawing), the chat;
        # plan and chat share a splitter so either can have the room
        right = QWidget()
        rv = QVBoxLayout(right)
        state_row = QHBoxLayout()
        self.state_label = QLabel("")
        self.state_label.setWordWrap(True)
        self.unload_button = QPushButton("Unload…")
        self.unload_button.setToolTip("Unload the model from every host (asks first)")
        self.unload_button.clicked.connect(self._unload)
        state_row.addWidget(self.state_label, 1)
        state_row.addWidget(self.unload_button)
        rv.addLayout(state_row)

        plan_area = QWidget()
        pv = QVBoxLayout(plan_area)
        pv.setContentsMargins(0, 0, 0, 0)
        model_row = QHBoxLayout()
        self.model_edit = QLineEdit(str(default_model_path()))
        self.model_edit.setToolTip("A GGUF file: type, pick with …, or drop one on the window")
        self.model_edit.textChanged.connect(self._show_state)
        recent = QSettings("Corral", "Corral").value("models/recent") or []
        self._recent = QStringListModel([str(p) for p in recent])
        completer = QCompleter(self._recent, self)
        completer.setCompletionMode(QCompleter.CompletionMode.UnfilteredPopupCompletion)
        self.model_edit.setCompleter(completer)
        self.setAcceptDrops(True)
        browse = QPushButton("…")
        browse.setToolTip("Pick a GGUF file")
        browse.clicked.connect(self._pick_model)
        model_label = QLabel("&Model")
        model_label.setBuddy(self.model_edit)
        model_row.addWidget(model_label)
        model_row.addWidget(self.model_edit, 1)
        model_row.addWidget(browse)
        pv.addLayout(model_row)
        plan_row = QHBoxLayout()
        self.settings_form = SettingsForm()
        self.settings_form.changed.connect(self._settings_changed)
        plan_row.addWidget(self.settings_form, 2)
        buttons = QVBoxLayout()
        self.plan_button = QPushButton("Plan on online hosts")
        self.plan_button.setToolTip(
            "Start the workers, check the settings, and show the plan (Ctrl+P)"
        )
        self.plan_button.clicked.connect(self._plan)
        self.load_button = QPushButton("Deploy")
        self.load_button.setToolTip("Load the model as planned (Ctrl+D)")
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
        pv.addLayout(plan_row)
        self.banner = QLabel("")
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet("color: #b00020;")
        pv.addWidget(self.banner)
        self.layer_map = LayerMap()
        self.layer_map.counts_chosen.connect(self.settings_form.set_counts)
        pv.addWidget(self.layer_map)
        self.device_bars = DeviceBars()
        pv.addWidget(self.device_bars)
        self.topology = TopologyView()
        pv.addWidget(self.topology)
        self.plan_text = QPlainTextEdit()
        self.plan_text.setReadOnly(True)
        self.plan_text.setTabChangesFocus(True)
        self.plan_text.setMinimumHeight(40)
        pv.addWidget(self.plan_text, 1)

        chat_area = QWidget()
        cv = QVBoxLayout(chat_area)
        cv.setContentsMargins(0, 0, 0, 0)
        self.transcript = Transcript()
        self.transcript.setTabChangesFocus(True)
        cv.addWidget(self.transcript, 1)
        plots = QHBoxLayout()
        self.speed_plot = LivePlot("tokens/s", "", gap=30.0)
        self.vram_plot = LivePlot("memory used", "%", fixed_max=100.0)
        plots.addWidget(self.speed_plot)
        plots.addWidget(self.vram_plot)
        cv.addLayout(plots)
        self.kv_bar = QProgressBar()
        self.kv_bar.setFormat("KV cache: nothing loaded")
        self.kv_bar.setValue(0)
        cv.addWidget(self.kv_bar)
        send_row = QHBoxLayout()
        self.input = QLineEdit()
        self.input.setPlaceholderText("Message (Enter to send; Ctrl+L comes here)")
        self.input.returnPressed.connect(self._send)
        self.send_button = QPushButton("Send")
        self.send_button.clicked.connect(self._send)
        self.send_button.setEnabled(False)
        send_row.addWidget(self.input, 1)
        send_row.addWidget(self.send_button)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self._stop)
        self.continue_button = QPushButton("Continue")
        self.continue_button.setToolTip("The reply stopped at its length: ask for the rest")
        self.continue_button.setEnabled(False)
        self.continue_button.clicked.connect(self._continue)
        self.regen_button = QPushButton("Regenerate")
        self.regen_button.setEnabled(False)
        self.regen_button.clicked.connect(self._regenerate)
        self.copy_button = QPushButton("Copy")
        self.copy_button.setToolTip("Copy the last reply (each message has its own copy link)")
        self.copy_button.clicked.connect(self._copy)
        self.save_button = QPushButton("Save…")
        self.save_button.clicked.connect(self._save_chat)
        self.new_button = QPushButton("New chat")
        self.new_button.clicked.connect(self._new_chat)
        send_row.addWidget(self.stop_button)
        # the loaded model served to other tools beside this chat (a slot each)
        api_row = QHBoxLayout()
        self.api_box = QCheckBox("Serve an &API, port")
        self.api_box.setToolTip(
            "An OpenAI-compatible API (corral serve's) on 127.0.0.1, for other tools, beside "
            "this chat: its replies take the model's other slots (set Slots to 2 or more "
            "before Deploy)"
        )
        self.api_port = QSpinBox()
        self.api_port.setRange(0, 65535)
        self.api_port.setValue(8080)
        self.api_port.setToolTip("0: any free port")
        self.api_state = QLabel("")
        self.api_state.setWordWrap(True)
        api_row.addWidget(self.api_box)
        api_row.addWidget(self.api_port)
        api_row.addWidget(self.api_state, 1)
        self.api_box.toggled.connect(self._toggle_api)
        self.api_timer = QTimer(self)
        self.api_timer.setInterval(1000)
        self.api_timer.timeout.connect(self._poll_api)
        actions = QHBoxLayout()
        for b in (
            self.continue_button,
            self.regen_button,
            self.copy_button,
            self.save_button,
            self.new_button,
        ):
            actions.addWidget(b)
        actions.addStretch(1)
        actions.addLayout(api_row)  # the API beside the chat: on the same line, for room
        self.max_reply = QSpinBox()
        self.max_reply.setRange(1, 1 << 16)
        self.max_reply.setValue(DEFAULT_MAX_REPLY)
        self.max_reply.setSuffix(" tokens")
        self.max_reply.setToolTip("The longest reply; Continue asks for more")
        reply_label = QLabel("Longest &reply")
        reply_label.setBuddy(self.max_reply)
        actions.addWidget(reply_label)
        actions.addWidget(self.max_reply)
        cv.addLayout(send_row)
        cv.addLayout(actions)

        self.work_split = QSplitter(Qt.Orientation.Vertical)
        self.work_split.addWidget(plan_area)
        self.work_split.addWidget(chat_area)
        self.work_split.setStretchFactor(0, 1)
        self.work_split.setStretchFactor(1, 2)
        self.work_split.setChildrenCollapsible(False)
        rv.addWidget(self.work_split, 1)
        QShortcut(QKeySequence("Ctrl+Return"), self, self._send)
        QShortcut(QKeySequence("Escape"), self, self._stop)
        QShortcut(QKeySequence("Ctrl+N"), self, self._new_chat)
        QShortcut(QKeySequence("Ctrl+P"), self, self._plan_if_idle)
        QShortcut(QKeySequence("Ctrl+D"), self, self._load_if_idle)
        QShortcut(QKeySequence("Ctrl+L"), self, self.input.setFocus)
        self.status = QLabel("Hosts running corral-agent appear on the left.")
        self.status.setWordWrap(True)
        rv.addWidget(self.status)

        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(left)
        self.splitter.addWidget(right)
        self.splitter.setSizes([560, 800])
        self.setCentralWidget(self.splitter)
        # where the user left the window (geometry, splitter), per user (QSettings)
        state = QSettings("Corral", "Corral")
        geometry = state.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)  # type: ignore[arg-type]
        split_state = state.value("window/splitter")
        if split_state is not None:
            self.splitter.restoreState(split_state)  # type: ignore[arg-type]
        self.model_edit.setFocus()
        self._host_buttons()
        self._show_state()

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

    def _host_buttons(self) -> None:
        """Pair… for a host not paired yet, Unpair… for one that is; the first-run help
        while there are no hosts at all."""
        host = self.selected_host()
        self.pair_button.setEnabled(host is not None and host.status == "unpaired")
        self.unpair_button.setEnabled(host is not None and host.status != "unpaired")
        self.first_run.setVisible(not self.hosts_model.hosts)

    def _pair(self) -> None:
        host = self.selected_host()
        if host is None:
            self.pair_note.setText("Select the host to pair with first.")
            return
        seen = (
            f"\n\nIts certificate here: {short(host.fingerprint)}; the agent printed its own "
            "as “identity …” when it started. Pairing checks them against each other too."
            if host.fingerprint
            else ""
        )
        code, ok = QInputDialog.getText(
            self,
            "Pair with a host",
            f"Pairing code shown by {host.hostname or host.address}\n"
            f"(run `corral-agent pair` there for a new one){seen}",
        )
        if not ok or not code.strip():
            return
        self.pair_note.setText(f"pairing with {host.address}…")
        self.pair_note.setStyleSheet("")

        def failed(e: BaseException) -> None:
            self.pair_note.setStyleSheet("color: #b00020;")
            self.pair_note.setText(str(e))

        self.bridge.deliver(
            self.engine.submit(self.directory.pair(host.key, code.strip())),
            lambda name: self.pair_note.setText(f"paired with {name}"),
            failed,
        )

    def _serves_model(self, host: Any) -> str:
        """The layers of the loaded model on `host`, in words ("" when none)."""
        if self.result is None or self.running is None or host.address not in self.running[1]:
            return ""
        mine = [p for p in self.result.placements if host.address in p.host and p.layers]
        return ", ".join(p.describe() for p in mine) or "part of the loaded model"

    def _unpair(self) -> None:
        host = self.selected_host()
        if host is None:
            self.pair_note.setText("Select the host to unpair first.")
            return
        name = host.hostname or host.address
        serves = self._serves_model(host)
        ask = f"Unpair {name}? This desktop forgets its key; pairing again needs a new code."
        if serves:
            ask += f"\n\nIt holds {serves}: the model is unloaded first."
        if not self._confirm("Unpair host", ask):
            return

        async def unpair() -> None:
            if serves:
                await self.chat.unload()
            await self.directory.unpair(host.key)

        if serves:
            self._unloaded(f"{name} was unpaired")
        self.bridge.deliver(
            self.engine.submit(unpair()),
            lambda _r: self.pair_note.setText(f"unpaired {name}"),
            lambda e: self.pair_note.setText(str(e)),
        )

    def _confirm(self, title: str, text: str) -> bool:
        answer = QMessageBox.question(
            self,
            title,
            text,
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        return answer == QMessageBox.StandardButton.Yes

    def hosts(self) -> Hosts:
        return {h.key: h for h in self.hosts_model.hosts}

    # ------------------------------------------------------------------ what runs

    def _draft_differs(self) -> list[str]:
        """How the settings and hosts in the window differ from what is loaded, in words."""
        if self.running is None:
            return []
        ran, hosts = self.running
        try:
            now = self._current()
        except ValueError:
            return ["the layers"]
        out = []
        if now.model != ran.model:
            out.append(f"model {now.model.name}")
        for what, a, b in (
            ("context", now.n_ctx, ran.n_ctx),
            ("K cache", now.type_k, ran.type_k),
            ("V cache", now.type_v, ran.type_v),
            ("flash attention", now.flash_attn, ran.flash_attn),
            ("strategy", now.strategy, ran.strategy),
            ("layers", now.layers, ran.layers),
            ("slots", now.parallel, ran.parallel),
        ):
            if a != b:
                shown = ("on" if a else "off") if isinstance(a, bool) else (a or "by strategy")
                out.append(f"{what} {shown}")
        if tuple(self.hosts_model.online_addresses()) != hosts:
            out.append(f"{len(self.hosts_model.online_addresses())} online host(s)")
        return out

    def _show_state(self) -> None:
        """The bar at the top: what is loaded, and whether the plan below is a draft."""
        if self.result is None or self.running is None:
            where = len(self.hosts_model.online_addresses())
            on = f"{where} online host(s)" if where else "this computer's CPU"
            self.state_label.setText(f"<b>Nothing loaded.</b> Deploy loads the model on {on}.")
            self.load_button.setText("Deploy")
            self.unload_button.setEnabled(False)
            return
        ran, hosts = self.running
        where = f"{len(hosts)} host(s)" if hosts else "this computer"
        text = (
            f"<b>Running</b> {ran.model.name} · context {self.result.n_ctx} · {where} · "
            f"loaded {self.loaded_at}"
        )
        draft = self._draft_differs()
        if draft:
            text += (
                f"<br><span style='color:#a05a00'>The plan below is a draft, not applied "
                f"({', '.join(draft)}): Apply loads it.</span>"
            )
        self.state_label.setText(text)
        self.load_button.setText("Apply" if draft else "Deploy")
        self.unload_button.setEnabled(not self._busy())

    def _busy(self) -> bool:
        return self.cancel_button.isEnabled() or self.stop_button.isEnabled()

    def _unload(self) -> None:
        if self.result is None or self._busy():
            return
        if not self._confirm("Unload the model", "Unload the model from every host?"):
            return
        self._submit(self.chat.unload(), lambda _r: None, self._failed)
        self._unloaded("you unloaded it")

    def _unloaded(self, why: str) -> None:
        """Nothing is loaded any more: say so everywhere, and why."""
        if self.api_box.isChecked():
            self._api_off("stopped: the model was unloaded")
        self.result = None
        self.running = None
        self.send_button.setEnabled(False)
        self.regen_button.setEnabled(False)
        self.continue_button.setEnabled(False)
        self.kv_bar.setValue(0)
        self.kv_bar.setFormat("KV cache: nothing loaded")
        self.status.setText(f"unloaded: {why}")
        self.log(f"model unloaded: {why}")
        self._show_state()

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
        self.unload_button.setEnabled(False)

    def _idle(self) -> None:
        self.busy.setRange(0, 1)
        self.busy.setTextVisible(False)
        self.plan_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self._show_state()

    def _plan_if_idle(self) -> None:
        if self.plan_button.isEnabled():
            self._plan()

    def _load_if_idle(self) -> None:
        if self.load_button.isEnabled():
            self._load()

    def _settings_changed(self) -> None:
        """The plan follows the settings (once there is one to follow)."""
        self._show_state()
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
        self._submit(self.chat.plan(addresses, settings), self._planned, self._not_planned)

    def _planned(self, got: Any) -> None:
        plan, verdicts, speed, host_speeds = got
        self._idle()
        self.hosts_model.set_speeds(host_speeds)
        self.plan = plan
        self.verdicts = verdicts
        self.layer_map.set_plan(plan)
        self.device_bars.set_plan(plan)
        self.topology.set_plan(plan)
        rest = self.settings_form.show_verdicts(verdicts)
        errors = [v for v in verdicts if v.level == "error"]
        self.banner.setText("\n".join(window_words(str(v)) for v in rest if v.level == "error"))
        lines = [self.layer_map.describe(), self.topology.describe(), *speed]
        lines += [f"warning: {window_words(str(v))}" for v in rest if v.level != "error"]
        self.plan_text.setPlainText("\n".join(x for x in lines if x))
        self.load_button.setEnabled(not errors)
        self.status.setText(
            "refused: fix the settings marked in red" if errors else "planned: ready to deploy"
        )
        self._replan_if_asked()

    def _not_planned(self, error: BaseException) -> None:
        if isinstance(error, WouldUnload):  # the loaded model stays; say what Apply does
            self._idle()
            self.load_button.setEnabled(True)
            self.plan_text.setPlainText(f"Not planned: {error}.")
            self.status.setText("the loaded model stays loaded")
            self._replan_if_asked()
            return
        self._failed(error)

    def _cancel(self) -> None:
        """Stop the plan or deploy under way: what this window submitted is cancelled where
        it awaits (its callbacks never run) and the session is closed, so no model is loaded
        afterwards."""
        for future in list(self._submitted):
            future.cancel()
        self.engine.submit(self.chat.close())
        self._idle()
        self.load_button.setEnabled(True)
        self._unloaded("cancelled; press Deploy to load")

    def _load(self) -> None:
        try:
            settings = self._current()
        except ValueError as exc:
            self.banner.setText(str(exc))
            return
        hosts = tuple(self.hosts_model.online_addresses())
        if self.result is not None and self.running is not None and self.running[1] != hosts:
            gone = [h for h in self.running[1] if h not in hosts]
            if gone and not self._confirm(
                "Apply the plan",
                f"The model is loaded on {', '.join(gone)}, which the new plan leaves out. "
                "Unload it there and load the plan?",
            ):
                return
        self._working(f"deploying on {len(hosts) or 'no'} host(s)…")

        size = settings.model.stat().st_size if settings.model.is_file() else 0
        self._deployed_size = size
        started = time.monotonic()
        self.load_progress = 0.0

        def progress(fraction: float) -> None:  # engine thread
            self.bridge.post(self._on_progress, fraction, size, started)

        # a model already loaded (or crashed) is replaced by a fresh session
        fresh = self.result is not None
        self._submit(
            self.chat.load(hosts, settings, fresh, progress),
            lambda result: self._loaded(result, (settings, hosts)),
            self._load_failed,
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

    def _loaded(self, result: Any, running: tuple[LoadSettings, tuple[str, ...]]) -> None:
        if self.api_box.isChecked():  # the load stopped it: it served the model replaced
            self._api_off("stopped: another model was deployed; tick it again to serve this one")
        self.result = result
        self.running = running
        self.loaded_at = time.strftime("%H:%M")
        self._idle()
        self.load_button.setEnabled(True)
        self.send_button.setEnabled(True)
        self.regen_button.setEnabled(bool(self.history))
        if result.plan is not None:
            self.plan = result.plan
            self.layer_map.set_plan(result.plan)
            self.device_bars.set_plan(result.plan)
            self.topology.set_plan(result.plan)
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
        # a new load, a new cache: the gauge starts over (the chat goes on, read again)
        self._shifts = 0
        self.kv_bar.setValue(0)
        self.kv_bar.setFormat(f"KV cache %p% (0/{result.n_ctx} cells)")
        self.status.setText(f"loaded in {result.load_s:.1f} s")
        self.input.setFocus()

    def _load_failed(self, error: BaseException) -> None:
        """A load that failed left nothing loaded (the session it replaced is closed)."""
        if self.result is not None:
            self._unloaded("the new load failed")
        self._failed(error)

    def _failed(self, error: Any) -> None:
        self._idle()
        self.load_button.setEnabled(True)
        self.send_button.setEnabled(self.result is not None)
        self.banner.setText(window_words(str(error)))
        self.status.setText("")

    def _send(self, text: str = "") -> None:
        text = text or self.input.text().strip()
        if not text or self.result is None or not self.send_button.isEnabled():
            return
        self.input.clear()
        self.send_button.setEnabled(False)
        self.regen_button.setEnabled(False)
        self.continue_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.unload_button.setEnabled(False)
        self.transcript.add("user", text)
        self.transcript.start_reply()
        bridge = self.bridge

        def on_update(update: ReplyUpdate) -> None:  # engine thread
            bridge.post(self._on_update, update)

        self._reply_tokens = 0
        self._submit(
            self.chat.ask(text, self.max_reply.value(), on_update), self._replied, self._crashed
        )

    def _on_update(self, update: ReplyUpdate) -> None:
        """One token or context shift of the reply under way (kvstatus.ReplyMeter's)."""
        if update.shift is not None:
            self._on_shift(update.shift)
        if update.text:
            self._on_token(update.text, update.kv.gen_tok_s)
        self._on_kv(update.kv)

    def _on_token(self, text: str, rate: float) -> None:
        self.transcript.append(text)
        self._reply_tokens += 1
        if self._reply_tokens % 8 == 0 and rate > 0:
            self.speed_plot.add("chat", rate)

    def _on_kv(self, status: KvStatus) -> None:
        self.kv_bar.setValue(round(status.fill * 100))
        per_device = ", ".join(
            f"{name} {used / 2**20:.1f} MiB" for name, used in status.device_bytes.items()
        )
        shifts = f"{self._shifts} context shift" + ("s" if self._shifts > 1 else "")
        self.kv_bar.setFormat(
            f"KV cache %p% ({status.used}/{status.n_ctx} cells"
            + (f"; {per_device}" if per_device else "")
            + (f"; {shifts}" if self._shifts else "")
            + ")"
        )

    def _on_shift(self, frame: Shift) -> None:
        self._shifts += 1
        self.transcript.shift(frame.n_discard)
        self.log(f"context shift: dropped {frame.n_discard} tokens to keep going")

    def _replied(self, replied: Replied) -> None:
        done, self.history = replied.done, replied.history
        self.send_button.setEnabled(True)
        self.regen_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.stop_button.setText("Stop")
        cut = {"length": "stopped at the longest reply: Continue asks for more"}
        note = cut.get(done.stop, "")
        if done.stop == "cancelled":
            note = "interrupted: you stopped it"
        self.transcript.finish(done.content, note)
        self.continue_button.setEnabled(done.stop == "length")
        rate = done.n_tokens / done.gen_s if done.gen_s else 0.0
        if rate:
            self.speed_plot.add("chat", rate)
        self.status.setText(f"{done.n_tokens} tokens, {rate:.1f} tok/s, stop: {done.stop}")
        self._show_state()

    def _continue(self) -> None:
        if self.continue_button.isEnabled():
            self._send(CONTINUE)

    def _crashed(self, error: Any) -> None:
        self.send_button.setEnabled(False)
        self.stop_button.setEnabled(False)
        self.stop_button.setText("Stop")
        self.log(f"chat failed: {error}")
        self.transcript.interrupt(str(error).split(":")[0])
        if not isinstance(error, InferenceCrashed):
            self.banner.setText(f"{window_words(str(error))} — press Deploy to load again")
            self.send_button.setEnabled(self.result is not None)
            self._show_state()
            return
        # the model went down with the reply: load it again on the hosts that answer, and
        # keep the chat; the reply cut short stays in the transcript, marked
        self.banner.setText(f"{error} — loading the model again…")
        self._working("loading the model again on the hosts that answer…")
        started = time.monotonic()
        size = self._deployed_size

        def progress(fraction: float) -> None:  # engine thread
            self.bridge.post(self._on_progress, fraction, size, started)

        self._submit(self.chat.recover(error.cause, progress), self._recovered, self._load_failed)

    def _recovered(self, recovered: Recovered) -> None:
        assert self.running is not None
        ran, before = self.running
        placed = [p.host for p in recovered.result.placements if p.layers]
        hosts = tuple(a for a in before if any(a in where for where in placed))
        self._loaded(recovered.result, (ran, hosts))
        self.history = recovered.history
        self.banner.setText(recovered.line)
        self.log(recovered.line)

    # ------------------------------------------------------------------ the API

    def _toggle_api(self, on: bool) -> None:
        if not on:
            self.api_timer.stop()
            self.api_state.setText("")
            self._submit(self.chat.stop_api(), lambda _r: None, self._failed)
            return
        if self.result is None:
            self._api_off("deploy a model first")
            return
        self.api_state.setText("starting…")
        self._submit(
            self.chat.start_api(self.api_port.value()), self._api_started, self._api_failed
        )

    def _api_started(self, url: str) -> None:
        self._api_url = url
        self.api_state.setText(f"serving at {url}")
        self.log(f"API: serving the model at {url}")
        self.api_timer.start()

    def _api_failed(self, error: BaseException) -> None:
        self._api_off(str(error))

    def _api_off(self, why: str) -> None:
        """The API is not served (`why`, in the state label): the box unticked, quietly."""
        self.api_timer.stop()
        self.api_box.blockSignals(True)
        self.api_box.setChecked(False)
        self.api_box.blockSignals(False)
        self.api_state.setText(why)

    def _poll_api(self) -> None:
        async def slots() -> dict[int, tuple[int, int]]:
            return self.chat.api_slots()

        self._submit(slots(), self._show_api_slots, lambda _e: None)

    def _show_api_slots(self, slots: dict[int, tuple[int, int]]) -> None:
        """Each slot the API's replies used: the cells of the KV cache it holds."""
        if not self.api_box.isChecked():
            return
        used = " · ".join(f"slot {k}: {a}/{b}" for k, (a, b) in sorted(slots.items()))
        self.api_state.setText(f"serving at {self._api_url}" + (f" — {used}" if used else ""))

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
        self.transcript.drop_last_exchange()
        self._send(text)

    def _not_regenerated(self, error: BaseException) -> None:  # nothing to take back yet
        self.banner.setText(str(error))
        self.regen_button.setEnabled(True)

    def _copy(self) -> None:
        reply = self.transcript.last_reply()
        if reply:
            QGuiApplication.clipboard().setText(reply)
            self.status.setText("copied the last reply")

    def _new_chat(self) -> None:
        if self.stop_button.isEnabled():
            return  # a reply is streaming: stop it first
        self.history = ()
        self._submit(self.chat.set_history([]), lambda _: None, self._failed)
        self.transcript.set_messages([])
        self._shifts = 0
        self.kv_bar.setValue(0)
        n_ctx = self.result.n_ctx if self.result is not None else 0
        self.kv_bar.setFormat(
            f"KV cache: new chat (0/{n_ctx} cells)" if n_ctx else "KV cache: nothing loaded"
        )
        self.regen_button.setEnabled(False)
        self.continue_button.setEnabled(False)
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
        self.banner.setText("")
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
        self.transcript.set_messages([(m["role"], m["content"]) for m in messages])
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
        if {k: h.status for k, h in hosts.items()} != before:
            self._show_state()
        names = [h.hostname for h in hosts.values()]
        series: dict[str, list[tuple[str, float]]] = {}
        for key, h in hosts.items():
            # the address too when two hosts share a hostname
            name = h.hostname if h.hostname and names.count(h.hostname) == 1 else h.address
            if before.get(key) != h.status:
                self.log(f"{name}: {h.status}" + (f" ({h.reason})" if h.reason else ""))
            series[key] = memory_series(name, h)
        # a host gone or renamed takes its lines with it; only a fresh inventory adds points
        self.vram_plot.keep({label for lines in series.values() for label, _ in lines})
        if isinstance(event, Inventoried) and event.key in series:
            for label, used in series[event.key]:
                self.vram_plot.add(label, used)

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


def memory_series(name: str, h: Any) -> list[tuple[str, float]]:
    """(plot label, % used) per GPU of a host's last inventory, or its RAM without GPUs."""
    inv = h.inventory
    if inv is None or h.status != "online":
        return []
    lines = [
        (f"{name}/GPU{g.index}", 100.0 * (g.memory_total - g.memory_free) / g.memory_total)
        for g in inv.gpus
        if g.memory_total
    ]
    if not inv.gpus and inv.ram_total:
        lines.append((f"{name} RAM", 100.0 * (1 - inv.ram_free / inv.ram_total)))
    return lines


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
