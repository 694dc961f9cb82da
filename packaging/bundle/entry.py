"""The desktop bundle's one program: the app, the command line, and Corral's own children.

Corral starts its helpers as `sys.executable -m MODULE ...` (the inference child, local
agents, device probes). In a bundle `sys.executable` is this program, not a Python, so it
answers `-m MODULE` itself; anything else goes to `corral` as usual.
"""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    """`-m MODULE ARGS` runs MODULE, as Python would; anything else is `corral ARGS`."""
    if len(sys.argv) >= 3 and sys.argv[1] == "-m":
        module, args = sys.argv[2], sys.argv[3:]
    else:
        module, args = "corral.gui.launch", sys.argv[1:]
    sys.argv = [sys.argv[0], *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
