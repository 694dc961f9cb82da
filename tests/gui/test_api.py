"""The window serves the loaded model to other tools beside its own chat: an openai client
streams from the API while a reply streams in the window, each in its own slot."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
from pytestqt.qtbot import QtBot

from corral.engine.localagents import LocalAgents
from tests.gui.window import open_window

LOAD = 120_000


def test_the_chat_goes_on_while_the_api_serves_another_client(qtbot: QtBot, smollm2: Path) -> None:
    with LocalAgents(2) as agents, open_window(qtbot, agents.addresses) as win:
        qtbot.waitUntil(lambda: len(win.hosts_model.online_addresses()) == 2, timeout=30000)
        win.max_reply.setValue(48)
        win.model_edit.setText(str(smollm2))
        win.settings_form.ctx.setValue(2048)
        # one slot: the chat's own; the API is refused, saying what to set
        qtbot.waitUntil(win.load_button.isEnabled, timeout=LOAD)
        win.load_button.click()
        qtbot.waitUntil(
            lambda: win.result is not None and win.send_button.isEnabled(), timeout=LOAD
        )
        win.api_port.setValue(0)
        win.api_box.setChecked(True)
        qtbot.waitUntil(lambda: "Slots" in win.api_state.text(), timeout=LOAD)
        assert not win.api_box.isChecked()
        # two slots (1024 cells each): deploy again, then serve
        win.settings_form.slots.setValue(2)
        qtbot.waitUntil(win.load_button.isEnabled, timeout=LOAD)
        win.load_button.click()
        qtbot.waitUntil(
            lambda: win.running is not None and win.running[0].parallel == 2, timeout=LOAD
        )
        qtbot.waitUntil(win.send_button.isEnabled, timeout=LOAD)
        win.api_box.setChecked(True)
        qtbot.waitUntil(lambda: "serving at" in win.api_state.text(), timeout=LOAD)
        url = win.api_state.text().split("serving at ")[1].split(" ")[0]

        api: dict = {"times": []}
        chat_done = threading.Event()

        def client() -> None:
            """A long API reply, read until the window's chat has answered (then it hangs
            up): however fast this machine, it streams all through the chat's reply."""
            c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=300)
            stream = c.chat.completions.create(
                model=smollm2.stem,
                stream=True,
                max_tokens=900,
                temperature=0,
                messages=[{"role": "user", "content": "Write the numbers from 1 to 500."}],
                extra_body={"ignore_eos": True},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    api["times"].append(time.monotonic())
                if chat_done.is_set():
                    break
            stream.close()

        other = threading.Thread(target=client)
        other.start()
        qtbot.waitUntil(lambda: "slot" in win.api_state.text(), timeout=LOAD)  # it streams
        started = time.monotonic()
        win.status.setText("")
        win.input.setText("Name three colours.")
        win.send_button.click()
        qtbot.waitUntil(
            lambda: (
                win.transcript.blocks[-1].role == "assistant"
                and bool(win.transcript.blocks[-1].text.strip())
            ),
            timeout=LOAD,
        )
        first_text = time.monotonic()
        qtbot.waitUntil(lambda: "tok/s" in win.status.text(), timeout=LOAD)
        assert "/1024" in win.api_state.text()  # the API's slot, in the window's words
        chat_done.set()
        other.join(300)
        # the window's reply began while the API's was still streaming: decoded together,
        # not one after the other
        assert api["times"] and started < first_text < api["times"][-1], (
            started,
            first_text,
            api["times"][-1],
        )
        assert win.transcript.blocks[-1].text.strip()
        win.api_box.setChecked(False)
        qtbot.waitUntil(lambda: win.api_state.text() == "", timeout=LOAD)
