"""A scripted tour of the app against two local agents, saving a screenshot of each screen.

    xvfb-run -s "-screen 0 1440x900x24" .venv/bin/python -m corral.gui.tour assets/screenshots

Real agents, real pairing, a real model: what the screenshots in the docs show is what a
user sees. Each step waits for the window to reach its state, then grabs the screen.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from PySide6.QtWidgets import QApplication, QInputDialog

from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path

from .app import MainWindow


def _wait(app: QApplication, cond: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("the window did not get there in time")
        app.processEvents()
        time.sleep(0.02)
    for _ in range(20):  # let it paint
        app.processEvents()
        time.sleep(0.01)


def _shot(app: QApplication, win: MainWindow, out: Path, name: str) -> None:
    screen = app.primaryScreen()
    pixmap = screen.grabWindow(0) if screen is not None else win.grab()
    if pixmap.isNull():
        pixmap = win.grab()
    pixmap.save(str(out / f"{name}.png"))
    print(f"saved {out / name}.png", flush=True)


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "assets/screenshots")
    out.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication([sys.argv[0]])
    assert isinstance(app, QApplication)
    with LocalAgents(1) as paired, LocalAgents(1, pair=False) as fresh:
        win = MainWindow(browse=False, agents=(*paired.addresses, *fresh.addresses))
        win.resize(1440, 880)
        win.move(0, 0)
        win.show()
        model = win.hosts_model
        _wait(app, lambda: sorted(h.status for h in model.hosts) == ["online", "unpaired"])
        _shot(app, win, out, "1-hosts-unpaired")
        code = fresh.issue_code(0)
        QInputDialog.getText = lambda *a, **k: (code, True)  # type: ignore[method-assign]
        win.pair_button.click()
        _wait(app, lambda: [h.status for h in model.hosts] == ["online", "online"])
        win.model_edit.setText(str(default_model_path()))
        win.plan_button.click()
        _wait(app, lambda: win.layer_map.plan is not None and win.plan_button.isEnabled())
        _shot(app, win, out, "2-plan")
        win.settings_form.type_v.setCurrentText("q4_0")
        _wait(app, lambda: win.settings_form.messages["cache-type-v"].isVisible())
        _wait(app, win.plan_button.isEnabled)
        _shot(app, win, out, "3-plan-refused")
        win.settings_form.flash.setChecked(True)
        _wait(app, lambda: win.load_button.isEnabled() and win.plan_button.isEnabled())
        win.load_button.click()
        _wait(app, win.send_button.isEnabled)
        win.input.setText("Write a short poem about a lighthouse, as a Markdown list.")
        win.send_button.click()
        _wait(app, lambda: "tok/s" in win.status.text())
        _shot(app, win, out, "4-chat")
        win.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
