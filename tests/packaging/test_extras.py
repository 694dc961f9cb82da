"""`corral[agent]` (a worker) pulls in no Qt; `corral[gui]` is what brings the app's Qt."""

from __future__ import annotations

import re
from importlib.metadata import metadata, requires


def _requirements() -> list[tuple[str, str]]:
    """(distribution name, extra or '') for every requirement of the installed corral."""
    found = []
    for text in requires("corral") or []:
        name = re.match(r"[A-Za-z0-9_.-]+", text)
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", text)
        assert name is not None
        found.append((name.group(0).lower(), extra.group(1) if extra else ""))
    return found


def test_the_agent_extra_and_the_base_pull_no_qt() -> None:
    assert "agent" in (metadata("corral").get_all("Provides-Extra") or [])
    reqs = _requirements()
    worker = [name for name, extra in reqs if extra in ("", "agent")]
    assert "msgpack" in worker and "zeroconf" in worker
    assert not [n for n in worker if n.startswith(("pyside6", "shiboken6", "pyqt"))]


def test_the_gui_extra_brings_pyside6() -> None:
    gui = [name for name, extra in _requirements() if extra == "gui"]
    assert gui == ["pyside6-essentials"]
