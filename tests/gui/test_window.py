"""The desktop window against real local agents (offscreen): hosts, load, chat, KV, crash."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt
from pytestqt.qtbot import QtBot

from corral.engine.localagents import LocalAgents
from corral.engine.security.identity import load_or_create, short
from corral.gui.app import MainWindow
from corral.gui.models import NOTE, SPEED
from tests.gui.window import open_window


@pytest.fixture()
def window(qtbot: QtBot) -> Iterator[MainWindow]:
    with LocalAgents(2) as agents, open_window(qtbot, agents.addresses) as win:
        win.agents = agents  # type: ignore[attr-defined]
        yield win


def test_hosts_load_chat_kv_and_a_killed_agent(
    window: MainWindow, qtbot: QtBot, smollm2: Path
) -> None:
    assert window.windowTitle().startswith("Corral")
    qtbot.waitUntil(lambda: len(window.hosts_model.online_addresses()) == 2, timeout=20000)
    assert window.hosts_model.rowCount() == 2
    # live memory from each host's inventory (this machine has no NVIDIA GPU)
    qtbot.waitUntil(lambda: all(h.inventory for h in window.hosts_model.hosts), timeout=20000)
    model = window.hosts_model
    assert model.data(model.index(0, 4)).startswith("CPU only; RAM")
    assert model.data(model.index(0, 3)) == "none"

    window.model_edit.setText(str(smollm2))
    window.max_reply.setValue(24)  # short replies: this test is about the crash, not length
    window.load_button.click()
    qtbot.waitUntil(window.send_button.isEnabled, timeout=60000)
    assert "RPC0" in window.plan_text.toPlainText() and "RPC1" in window.plan_text.toPlainText()

    window.input.setText("Say hello.")
    window.send_button.click()
    qtbot.waitUntil(lambda: "tok/s" in window.status.text(), timeout=60000)
    reply = window.transcript.last_reply()
    assert reply.strip() and reply in window.transcript.toPlainText()
    assert window.kv_bar.value() > 0

    victim = window.agents.addresses[1]  # type: ignore[attr-defined]
    os.kill(window.agents.procs[1].pid, signal.SIGKILL)  # type: ignore[attr-defined]
    qtbot.waitUntil(
        lambda: any(h.status == "offline" for h in window.hosts_model.hosts), timeout=20000
    )
    window.input.setText("Again?")
    window.send_button.click()
    # the model went down with the reply; the window loads it again on the host still up,
    # says so in one line naming the host it left out, and the chat goes on
    qtbot.waitUntil(lambda: "reloaded over" in window.banner.text(), timeout=60000)
    assert f"without {victim}" in window.banner.text(), window.banner.text()
    assert window.banner.text().startswith("lost agent"), window.banner.text()
    assert "RPC1" not in window.plan_text.toPlainText()
    qtbot.waitUntil(window.send_button.isEnabled, timeout=10000)
    window.status.setText("")
    window.input.setText("Still there?")
    window.send_button.click()
    qtbot.waitUntil(lambda: "tok/s" in window.status.text(), timeout=60000)
    roles = [b.role for b in window.transcript.blocks]
    assert roles.count("assistant") >= 3, roles
    # the reply the crash cut short stays, marked as such
    assert any(b.note.startswith("interrupted") for b in window.transcript.blocks)


def test_an_unpaired_host_is_paired_from_the_window(
    qtbot: QtBot, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from PySide6.QtWidgets import QInputDialog, QMessageBox

    with LocalAgents(1, pair=False) as agents, open_window(qtbot, agents.addresses) as win:
        model = win.hosts_model
        qtbot.waitUntil(lambda: [h.status for h in model.hosts] == ["unpaired"], timeout=20000)
        assert model.data(model.index(0, 0)) == "not paired"
        assert "corral pair" in model.data(model.index(0, NOTE))
        # a wrong code: a banner that says so, still not paired; the dialog shows the
        # certificate this desktop saw, which the agent's own printout can be held to
        asked: list[str] = []

        def wrong(_parent: object, _title: str, text: str, *_a: object) -> tuple[str, bool]:
            asked.append(text)
            return "0000-0000", True

        monkeypatch.setattr(QInputDialog, "getText", wrong)
        code = agents.issue_code(0)
        win.pair_button.click()
        theirs = load_or_create(agents.state_dir(0) / "identity", "agent").fingerprint
        assert f"Its certificate here: {short(theirs)}" in asked[0], asked
        qtbot.waitUntil(lambda: "code is wrong" in win.pair_note.text(), timeout=20000)
        monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: (code, True))
        win.pair_button.click()
        qtbot.waitUntil(lambda: [h.status for h in model.hosts] == ["online"], timeout=20000)
        qtbot.waitUntil(lambda: "paired with" in win.pair_note.text(), timeout=5000)
        win.hosts_view.selectRow(0)
        assert not win.pair_button.isEnabled()  # it is paired: Unpair… is what applies
        yes = QMessageBox.StandardButton.Yes
        monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: yes)
        win.unpair_button.click()
        qtbot.waitUntil(lambda: [h.status for h in model.hosts] == ["unpaired"], timeout=20000)


def _plan_on_both(window: MainWindow, qtbot: QtBot, model: Path) -> None:
    """Both agents online, `model` chosen, Plan pressed, and the plan shown."""
    qtbot.waitUntil(lambda: len(window.hosts_model.online_addresses()) == 2, timeout=20000)
    window.model_edit.setText(str(model))
    window.plan_button.click()
    qtbot.waitUntil(lambda: window.layer_map.plan is not None, timeout=60000)
    qtbot.waitUntil(window.plan_button.isEnabled, timeout=60000)


def test_the_plan_shows_follows_settings_and_refuses_what_would_crash(
    window: MainWindow, qtbot: QtBot, smollm2: Path
) -> None:
    _plan_on_both(window, qtbot, smollm2)
    plan = window.layer_map.plan
    assert plan is not None and {d.name for d in plan.devices} == {"RPC0", "RPC1"}
    rows = [r[0] for r in window.device_bars.rows()]  # the two workers, and this computer
    assert len(rows) == 3 and rows[-1] == "this computer" and window.load_button.isEnabled()
    assert "RPC0" in window.layer_map.describe()
    # a quantized V cache without flash attention would fail at load: refused, beside V
    form = window.settings_form
    form.type_v.setCurrentText("q4_0")
    qtbot.waitUntil(lambda: form.messages["cache-type-v"].isVisible(), timeout=60000)
    qtbot.waitUntil(window.plan_button.isEnabled, timeout=60000)
    assert not window.load_button.isEnabled()
    assert "flash" in form.messages["cache-type-v"].text().lower()
    form.flash.setChecked(True)  # the fix: the plan follows, the message goes
    qtbot.waitUntil(lambda: not form.messages["cache-type-v"].isVisible(), timeout=60000)
    qtbot.waitUntil(window.load_button.isEnabled, timeout=60000)
    window.load_button.click()
    qtbot.waitUntil(window.send_button.isEnabled, timeout=60000)
    assert window.result is not None and window.load_progress == 1.0  # progress reached 100 %
    assert "planned" in window.plan_text.toPlainText()
    # the CPU kernels the load followed, as the CLI says them
    assert window.result.cpu_kernels and "CPU kernels: " in window.plan_text.toPlainText()


def test_the_speed_strategy_measures_and_shows_its_prediction(
    window: MainWindow, qtbot: QtBot, smollm2: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CORRAL_SPEEDS_DIR", str(tmp_path))
    _plan_on_both(window, qtbot, smollm2)
    assert "not measured" in window.plan_text.toPlainText()  # balanced, nothing kept yet
    window.settings_form.strategy.setCurrentText("speed")  # the plan follows the setting
    # timing the devices: up to six passes of probes each, minutes on a busy 2-core CI VM
    qtbot.waitUntil(lambda: "predicted:" in window.plan_text.toPlainText(), timeout=300000)
    text = window.plan_text.toPlainText()
    assert "ms a layer" in text and "round trip" in text and "a token's time" in text, text
    assert window.layer_map.plan is not None and window.layer_map.plan.strategy == "speed"
    # the hosts table shows each host's link and, where the plan put a device, its layer time
    model = window.hosts_model
    assert model.headerData(SPEED, Qt.Orientation.Horizontal) == "Speed (measured)"
    cells = [model.data(model.index(r, SPEED)) for r in range(model.rowCount())]
    assert len(cells) == 2 and all("round trip" in c for c in cells), cells
    assert any("ms a layer" in c for c in cells), cells


def test_choosing_speed_with_a_model_loaded_keeps_the_model(
    window: MainWindow, qtbot: QtBot, smollm2: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """Timing the devices would run probes in the loaded model's place: the plan says so
    and the model stays (the chat answers); Apply measures and loads."""
    monkeypatch.setenv("CORRAL_SPEEDS_DIR", str(tmp_path))
    _plan_on_both(window, qtbot, smollm2)
    window.load_button.click()
    qtbot.waitUntil(window.send_button.isEnabled, timeout=60000)
    window.settings_form.strategy.setCurrentText("speed")
    qtbot.waitUntil(lambda: "would unload" in window.plan_text.toPlainText(), timeout=60000)
    assert window.status.text() == "the loaded model stays loaded"
    assert window.load_button.isEnabled()
    window.max_reply.setValue(4)
    window.input.setText("Hello")
    window.send_button.click()
    qtbot.waitUntil(lambda: "tok/s" in window.status.text(), timeout=60000)
    window.load_button.click()  # Apply: measures the devices, then loads speed's plan
    qtbot.waitUntil(lambda: (tmp_path / "speeds.json").exists(), timeout=300000)
    qtbot.waitUntil(window.send_button.isEnabled, timeout=120000)


def test_dragging_a_boundary_in_the_layer_map_moves_layers(
    window: MainWindow, qtbot: QtBot, smollm2: Path
) -> None:
    from PySide6.QtCore import QPoint

    _plan_on_both(window, qtbot, smollm2)
    lm = window.layer_map
    before = lm.counts()
    (b,) = lm.boundaries()
    w = lm.width() / len(lm.cells)
    y = lm.height() // 2
    qtbot.mousePress(lm, Qt.MouseButton.LeftButton, pos=QPoint(int(b * w), y))
    qtbot.mouseMove(lm, QPoint(int((b - 4) * w), y))
    qtbot.mouseRelease(lm, Qt.MouseButton.LeftButton, pos=QPoint(int((b - 4) * w), y))
    want = [before[0] - 4, before[1] + 4]
    assert window.settings_form.layers.text() == f"{want[0]},{want[1]}"
    # the plan follows: llama.cpp's own dry run now puts 4 layers more on the second device
    qtbot.waitUntil(
        lambda: window.layer_map.plan is not None and window.layer_map.counts() == want,
        timeout=60000,
    )
    qtbot.waitUntil(window.plan_button.isEnabled, timeout=60000)
    assert window.load_button.isEnabled()


def test_a_chat_is_saved_listed_and_continued(
    window: MainWindow, qtbot: QtBot, smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PySide6.QtWidgets import QInputDialog

    qtbot.waitUntil(lambda: len(window.hosts_model.online_addresses()) == 2, timeout=20000)
    window.set_model(str(smollm2))
    window.load_button.click()
    qtbot.waitUntil(window.send_button.isEnabled, timeout=60000)
    window.max_reply.setValue(8)
    window.input.setText("My name is Ada.")
    window.send_button.click()
    qtbot.waitUntil(lambda: "tok/s" in window.status.text(), timeout=60000)
    name = f"gui-{os.getpid()}"
    monkeypatch.setattr(QInputDialog, "getText", lambda *a, **k: (name, True))
    window.save_button.click()
    items = window.chats.findItems(name, Qt.MatchFlag.MatchExactly)
    assert items, "the saved chat is listed"
    window._new_chat()
    assert window.transcript.blocks == [] and not window.history
    window._open_chat(items[0])
    assert (window.transcript.blocks[0].role, window.transcript.blocks[0].text) == (
        "user",
        "My name is Ada.",
    )
    assert "My name is Ada." in window.transcript.toPlainText()
    assert [m["role"] for m in window.history] == ["user", "assistant"]
    # and the engine thread's session took it (the window only keeps the snapshot)
    took = window.engine.submit(window.chat.set_history(window.history)).result(timeout=10)
    assert [m["role"] for m in took] == ["user", "assistant"]
