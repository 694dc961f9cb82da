"""The GUI stall bench (corral.gui.stall: Qt code lives under gui/); arguments pass through.

xvfb-run -a -s "-screen 0 1440x900x24" .venv/bin/python bench/gui_stall.py [--seconds 20]
"""

from __future__ import annotations

import subprocess
import sys

if __name__ == "__main__":
    sys.exit(subprocess.call([sys.executable, "-m", "corral.gui.stall", *sys.argv[1:]]))
