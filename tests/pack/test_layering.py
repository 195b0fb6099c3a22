"""The runtime package stands on its own: ``umbrella_ds`` imports nothing from ``data_prep``.

Why: ``data_prep`` is the packing tool (CLI, planning, synth, BIDS); training, evaluation and
inference share scan reading and preprocessing from ``umbrella_ds.scan`` instead, so the
runtime never depends on the tool built on top of it. Checked on the source (every import
statement, lazy ones inside functions included), not by importing, so a function-level import
that only runs on some path cannot hide.
"""

from __future__ import annotations

import ast
from pathlib import Path

import umbrella_ds

PACKAGE = Path(umbrella_ds.__file__).parent
FORBIDDEN = "data_prep"


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def imports_of_forbidden(root: Path) -> list[str]:
    """``file:line: module`` for every import of ``data_prep`` (or a submodule) under ``root``."""
    hits = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, module in _imported_modules(tree):
            if module == FORBIDDEN or module.startswith(FORBIDDEN + "."):
                hits.append(f"{path.relative_to(root.parent)}:{line}: {module}")
    return hits


def test_umbrella_ds_imports_nothing_from_data_prep() -> None:
    modules = list(PACKAGE.rglob("*.py"))
    assert len(modules) > 20, f"walked too few modules under {PACKAGE}: {len(modules)}"
    assert imports_of_forbidden(PACKAGE) == []


def test_the_check_sees_lazy_and_from_imports(tmp_path: Path) -> None:
    """The walker would catch each form the old infer.py used (so the test above can fail)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text(
        "import os\n"
        "def f():\n"
        "    from data_prep.preprocess import preprocess\n"
        "    import data_prep.readers as r\n"
        "from data_prepx import y\n"
    )
    assert imports_of_forbidden(pkg) == [
        "pkg/a.py:3: data_prep.preprocess",
        "pkg/a.py:4: data_prep.readers",
    ]
