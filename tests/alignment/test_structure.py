"""The alignment package layout: imported without matplotlib, its modules importing in one direction."""

import ast
import subprocess
import sys
from graphlib import TopologicalSorter
from pathlib import Path

import hf_resdecay.alignment

PACKAGE = Path(hf_resdecay.alignment.__file__).parent


def _sibling_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
    return found


def test_importing_alignment_does_not_import_matplotlib():
    code = "import hf_resdecay.alignment, sys; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_alignment_modules_import_each_other_without_cycles():
    graph = {path.stem: _sibling_imports(path) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    list(TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert {name for name, imported in graph.items() if "plots" in imported} == {"command"}
