"""`corral`: with no command, the desktop app; with one, the command line (corral.engine.cli).

Lives in gui/ because it may open the window; Qt is imported only when it does, so an
install without the app's extra still runs every command.
"""

from __future__ import annotations

import os
import sys


def wants_window(args: list[str]) -> bool:
    return all(a.startswith("--agent=") for a in args)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from corral.engine.cli import main as cli_main

    if not wants_window(args):
        return cli_main(args)
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) and (
        os.environ.get("QT_QPA_PLATFORM") not in ("offscreen", "minimal")
    ):
        print(
            "corral: no display to open the app on. `corral demo` runs a headless demo; "
            "`corral --help` lists the commands.",
            file=sys.stderr,
        )
        return 2
    try:
        from corral.gui.app import main as window_main
    except ImportError as exc:
        print(
            f"corral: the desktop app is not installed ({exc}): pip install 'corral[gui]', "
            "or use the commands (`corral --help`)",
            file=sys.stderr,
        )
        return 2
    from corral.engine.logfile import setup_logging

    # the app's log: JSON lines in the platform's log dir (~/.local/state/corral/log)
    level = os.environ.get("CORRAL_LOG_LEVEL", "INFO").upper()
    setup_logging(
        "corral", level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO", None
    )
    return window_main([sys.argv[0], *args])


if __name__ == "__main__":
    sys.exit(main())
