"""The house rules of the package layout (HOUSE_STYLE.md, "Layout"), checked statically:
no import cycles (imports inside functions included), imports only go down the rooms,
a small package root, every package says what it holds and may import, test faults
through one seam, a README that is a front door, and docs whose links resolve."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "moe_train"

# Bottom to top: a module may import modules of a LOWER rank, or of its own package.
RANKS = {
    "moe_train": 0, "moe_train.config_checks": 0,
    "moe_train.parallel": 1, "moe_train.data": 1,
    "moe_train.moe": 2,
    "moe_train.model": 3,
    "moe_train.config": 4,
    "moe_train.checkpoint": 5,
    "moe_train.train": 6,
    "moe_train.inference": 7,
    "moe_train.transform": 8, "moe_train.hf": 8,
    "moe_train.commands": 9,
    "moe_train.cli": 10, "moe_train.__main__": 11,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module ``name`` refers to: itself, or the nearest enclosing module."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(name: str, path: Path) -> set[str]:
    """Every moe_train module ``name`` imports, anywhere in the file (functions included).
    ``from P import x`` is an import of ``P.x`` when that is a module, else of ``P``."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        out.update(_resolve(t) for t in targets if t.split(".")[0] == "moe_train")
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _room(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_function_level_imports_and_cycles():
    src = "def f():\n    from moe_train.train.loop import train\n"
    tree_imports = {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    assert tree_imports == {"moe_train.train.loop"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "moe_train.train.loop" in GRAPH["moe_train.train"]  # the lazy export, inside a function


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_imports_only_go_down():
    for name in MODULES:
        assert _room(name) in RANKS, f"{name}: a new room; give it a rank in RANKS (and a docstring)"
    wrong = [f"{a} (rank {RANKS[_room(a)]}) imports {b} (rank {RANKS[_room(b)]})"
             for a, targets in GRAPH.items() for b in sorted(targets)
             if _room(a) != _room(b) and RANKS[_room(b)] >= RANKS[_room(a)]]
    assert wrong == []


def test_package_root_holds_at_most_six_modules():
    root_modules = sorted(p.name for p in PKG.glob("*.py"))
    assert len(root_modules) <= 6, root_modules


def test_every_package_says_what_it_holds_and_may_import():
    for init in sorted(PKG.rglob("__init__.py")):
        if init.parent == PKG:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.splitlines()) >= 3 and "May import" in doc, f"{init.relative_to(ROOT)}: docstring"


def test_test_faults_reach_the_loop_through_one_seam():
    readers = sorted(str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if "MOE_TRAIN_FAULT" in p.read_text())
    assert readers == ["moe_train/train/faults.py"]


def test_cli_and_control_load_without_torch():
    """``moe-train --help`` stays fast and ``train``'s stop handlers go in before torch."""
    code = ("import sys, moe_train.train.control, moe_train.cli as c; c.build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_import_from_their_documented_homes():
    from moe_train.checkpoint import CheckpointError, find_checkpoint, verify_checkpoint  # noqa: F401
    from moe_train.config import MoEConfig as OldHome
    from moe_train.config import load_config  # noqa: F401
    from moe_train.inference import generate_text, heldout_loss, load_for_inference  # noqa: F401
    from moe_train.moe import MoEConfig, MoELayer  # noqa: F401
    from moe_train.train import TrainResult, train  # noqa: F401
    from moe_train.transform import convert, prune_checkpoint, quantize_checkpoint, upcycle_checkpoint  # noqa: F401

    assert OldHome is MoEConfig
    with pytest.raises(AttributeError):
        import moe_train.train as package

        package.no_such_name  # noqa: B018


# ------------------------------------------------------------------------------ docs

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    out = set()
    in_code = False
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return out


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    text = "\n".join(lines)
    for must in ("bash launchers/demo.sh", "bash tests/run.sh"):
        assert must in text


@pytest.mark.parametrize("md", _docs(), ids=lambda p: p.name)
def test_every_relative_link_resolves(md):
    broken = []
    for match in LINK.finditer(md.read_text()):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor})")
    assert broken == [], f"{md.relative_to(ROOT)}: {broken}"
