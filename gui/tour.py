"""A scripted tour of the app against two local agents, saving a screenshot of each screen.

    xvfb-run -a -s "-screen 0 1440x900x24" .venv/bin/python -m corral.gui.tour assets/screenshots
    ... -m corral.gui.tour assets/screenshots --size 1280x720 --suffix=-1280x720
    QT_SCALE_FACTOR=2 xvfb-run -a -s "-screen 0 2560x1440x24" ... --size 1280x720 --suffix=-2x

Real agents, real pairing, a real model: what the screenshots in the docs show is what a
user sees. Each step waits for the window to reach its state, then grabs the screen.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PySide6.QtWidgets import QApplication, QInputDialog

from corral.engine.localagents import LocalAgents
from corral.engine.model import default_model_path

from .app import MainWindow


def _wait(app: QApplication, cond: Callable[[], bool], timeout: float = 900.0) -> None:
    """Until the window reaches a state (the bound only guards a hang: a loaded 2-core
    machine can take minutes to load and answer)."""
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
    pixmap.save(str(out / f"{name}{SUFFIX[0]}.png"))
    print(f"saved {out / name}{SUFFIX[0]}.png", flush=True)


SUFFIX = [""]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m corral.gui.tour")
    parser.add_argument("out", nargs="?", default="assets/screenshots")
    parser.add_argument("--size", default="1440x880", help="window size, WIDTHxHEIGHT")
    parser.add_argument("--suffix", default="", help="added to each screenshot's name")
    args = parser.parse_args(argv)
    try:
        width, height = (int(x) for x in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size {args.size!r}: give WIDTHxHEIGHT, like 1280x720")
    SUFFIX[0] = args.suffix
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication([sys.argv[0]])
    assert isinstance(app, QApplication)
    with LocalAgents(1) as paired, LocalAgents(1, pair=False) as fresh:
        win = MainWindow(browse=False, agents=(*paired.addresses, *fresh.addresses))
        win.resize(width, height)
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
        win.max_reply.setValue(160)  # a short reply: the tour also runs on a busy machine
        win.input.setText("Write a short poem about a lighthouse, as a Markdown list.")
        win.send_button.click()
        _wait(app, lambda: "tok/s" in win.status.text())
        _shot(app, win, out, "4-chat")
        win.settings_form.ctx.setValue(win.settings_form.ctx.value() * 2)
        _wait(app, lambda: "draft" in win.state_label.text() and win.plan_button.isEnabled())
        _shot(app, win, out, "5-draft")
        win.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
