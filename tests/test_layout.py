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


def _module_name(path: Path) -> str:
    """corral's dotted name for a source file under one of ROOTS."""
    rel = path.relative_to(REPO).with_suffix("")
    parts = [ROOTS[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved to absolute names (only for
    files under ROOTS; elsewhere a relative import is kept as written, with its dots)."""
    inside = path.relative_to(REPO).parts[0] in ROOTS
    package = ""
    if inside:
        me = _module_name(path)
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module)
                continue
            if not inside:
                names.add("." * node.level + (node.module or ""))
                continue
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            if node.module:
                names.add(".".join([*base, node.module]))
            else:  # from . import a, b: modules (or names) of the package itself
                names.update(".".join([*base, a.name]) for a in node.names)
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
        "import sys, corral.engine.cli, corral.engine.agentcli, corral.discovery; "
        "bad = [m for m in sys.modules if m.startswith(('PySide6', 'llama_cpp'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# The layers, top to bottom: a module imports only from its own layer's package or from
# layers below it (docs/ARCHITECTURE.md draws them). engine's loose modules (aio, procs,
# logfile, hostmem) and corral itself are the floor.
LAYERS: list[tuple[str, ...]] = [
    ("corral.gui",),
    ("corral.engine.cli", "corral.engine.agentcli"),
    ("corral.engine.doctor", "corral.engine.localagents"),
    ("corral.engine.runtime",),
    ("corral.engine.agent",),
    ("corral.engine.security", "corral.discovery", "corral.engine.planner"),
    ("corral.engine.ggml",),
    ("corral.engine.protocol", "corral.engine.model"),
    (
        "corral.engine.aio",
        "corral.engine.procs",
        "corral.engine.logfile",
        "corral.engine.hostmem",
        "corral.engine",
        "corral",
    ),
]


def _unit(module: str) -> tuple[int, str]:
    """(layer index, the package or module of LAYERS that holds `module`)."""
    best = (-1, "")
    for rank, units in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and len(unit) > len(best[1]):
                best = (rank, unit)
    if best[0] < 0:
        raise AssertionError(f"{module} is in no layer of tests/test_layout.py's LAYERS")
    return best


def _product_modules() -> dict[str, set[str]]:
    """corral module → the corral modules it imports (absolute and relative)."""
    out = {}
    for folder in ROOTS:
        for path in (REPO / folder).rglob("*.py"):
            out[_module_name(path)] = {n for n in _imports(path) if n.split(".")[0] == "corral"}
    return out


def test_imports_go_down_the_layers_only() -> None:
    offenders = []
    for module, imported in sorted(_product_modules().items()):
        rank, unit = _unit(module)
        for name in sorted(imported):
            their_rank, their_unit = _unit(name)
            if their_unit != unit and their_rank <= rank:
                offenders.append(f"{module} ({unit}) imports {name} ({their_unit})")
    assert offenders == []


def test_no_import_cycles_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for module, imported in _product_modules().items():
        unit = _unit(module)[1]
        graph.setdefault(unit, set()).update(
            u for u in (_unit(n)[1] for n in imported) if u != unit
        )
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " → ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


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
