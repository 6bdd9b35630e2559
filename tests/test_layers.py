"""The layout shows the design: layers import one way, no module circles, one installed namespace.

The import graph is read from the source (every ``import`` / ``from ... import`` anywhere in a module, including
imports inside functions, which are dependencies too) rather than from ``sys.modules``, so the test sees lazy
imports and needs no heavy import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> the folders it may import (DESIGN.md, "Layout"); a folder may always import itself
ALLOWED = {
    "core": set(),
    "squeeze": {"core"},
    "generative": {"core"},
    "recover": {"core", "squeeze", "generative"},
    "relabel": {"core", "squeeze"},
    "launch": {"core", "squeeze", "generative", "recover", "relabel"},
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "distillset." + ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    files = {_module(p): p for folder in ALLOWED for p in (ROOT / folder).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("distillset."):
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("distillset."))
        graph[mod] = {t for t in targets if t in files and t != mod}
    return graph


def _folder(mod: str) -> str:
    return mod.split(".")[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {t}" for m, ts in graph.items() for t in ts
                  if _folder(t) != _folder(m) and _folder(t) not in ALLOWED[_folder(m)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_layers_import_one_way():
    bad = upward_imports(import_graph())
    assert not bad, "imports against DESIGN.md's layers:\n" + "\n".join(bad)


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_checks_can_fail():
    """The two checks above see a crafted upward import and a crafted circle."""
    graph = {"distillset.core.a": {"distillset.recover.b"}, "distillset.recover.b": {"distillset.core.a"}}
    assert upward_imports(graph) == ["distillset.core.a imports distillset.recover.b"]
    assert cycles(graph) == [["distillset.core.a", "distillset.recover.b"]]


def test_no_bare_stage_imports():
    """Code imports the installed namespace (``distillset.recover``), never a bare top-level ``recover``."""
    bare = []
    for folder in [*ALLOWED, "tests", "benchmarks"]:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else (
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                bare += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ALLOWED]
    assert not bare, "\n".join(bare)


@pytest.mark.slow
def test_wheel_installs_one_namespace(tmp_path):
    """``pip install .`` installs only ``distillset`` (and its dist-info) and one console script, ``distillset``."""
    import shutil

    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "output", "build", "*.egg-info",
                                                             "__pycache__", "benchmarks", "docs", "tests"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("distillset-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"distillset", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for stage in ALLOWED:
        assert f"distillset/{stage}/__init__.py" in names, stage
    info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(info).decode()
    assert entry_points.split() == ["[console_scripts]", "distillset", "=", "distillset.launch.cli:main"]
