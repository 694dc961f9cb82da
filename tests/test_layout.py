"""The folders are the architecture: packaging and import rules that keep them honest."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = {
    "corral_pkg": "corral",
    "engine": "corral.engine",
    "discovery": "corral.discovery",
    "gui": "corral.gui",
}


def _package_dirs() -> set[str]:
    found = set()
    for folder, dotted in ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([dotted, *rel.parts]))
    return found


def test_every_package_directory_is_listed_in_pyproject() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert _package_dirs() - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - _package_dirs() == set(), "listed packages without an __init__.py"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _sources() -> list[Path]:
    return [
        p
        for folder in ("engine", "discovery", "gui", "corral_pkg", "bench", "packaging")
        for p in (REPO / folder).rglob("*.py")
    ]


def test_pyside6_is_imported_only_under_gui() -> None:
    offenders = [
        str(p.relative_to(REPO))
        for p in _sources()
        if p.parts[len(REPO.parts)] != "gui"
        and any(n.split(".")[0] == "PySide6" for n in _imports(p))
    ]
    assert offenders == []


def test_nothing_imports_the_gui() -> None:
    offenders = [
        str(p.relative_to(REPO))
        for p in _sources()
        if p.parts[len(REPO.parts)] != "gui"
        and any(n.startswith("corral.gui") for n in _imports(p))
    ]
    assert offenders == []


def test_llama_cpp_only_in_engine_ggml_and_the_inference_child() -> None:
    allowed = {REPO / "engine" / "runtime" / "child.py"}
    offenders = [
        str(p.relative_to(REPO))
        for p in _sources()
        if any(n.split(".")[0] == "llama_cpp" for n in _imports(p))
        and p not in allowed
        and (REPO / "engine" / "ggml") not in p.parents
        and p.parts[len(REPO.parts)] != "bench"  # the bare-loop baseline is llama_cpp itself
    ]
    assert offenders == []


def test_engine_and_discovery_import_no_qt_at_runtime() -> None:
    import subprocess
    import sys

    code = (
        "import sys, corral.engine.cli, corral.engine.agent.main, corral.discovery; "
        "bad = [m for m in sys.modules if m.startswith(('PySide6', 'llama_cpp'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# package → corral packages it must not import (DESIGN.md: protocol ← discovery ← runtime ← gui;
# protocol ← discovery ← agent: the agent advertises). engine/procs.py and engine/ggml are leaves.
_FORBIDDEN = {
    "engine/protocol": (
        "corral.engine.agent",
        "corral.engine.runtime",
        "corral.engine.ggml",
        "corral.discovery",
        "corral.engine.cli",
    ),
    "engine/ggml": (
        "corral.engine.agent",
        "corral.engine.runtime",
        "corral.discovery",
        "corral.engine.cli",
    ),
    "engine/agent": ("corral.engine.runtime", "corral.engine.cli"),
    "engine/runtime": ("corral.engine.agent", "corral.engine.cli"),
    "discovery": ("corral.engine.runtime", "corral.engine.agent", "corral.engine.cli"),
}


def test_dependency_direction() -> None:
    offenders = []
    for folder, banned in _FORBIDDEN.items():
        for path in (REPO / folder).rglob("*.py"):
            bad = [n for n in _imports(path) if n.startswith(banned)]
            if bad:
                offenders.append(f"{path.relative_to(REPO)} imports {', '.join(sorted(bad))}")
    assert offenders == []


def test_no_asyncio_wait_for_in_the_product() -> None:
    """engine.aio.within says why: 3.11's wait_for can drop a cancellation."""
    offenders = []
    for p in _sources():
        if p.parts[len(REPO.parts)] in ("bench", "packaging"):
            continue
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "wait_for"
                and isinstance(node.value, ast.Name)
                and node.value.id == "asyncio"
            ):
                offenders.append(f"{p.relative_to(REPO)}:{node.lineno}")
    assert offenders == [], "use corral.engine.aio.within"
