"""The import graph follows the layers in README's architecture table (parsed, not imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import parscale

ROOT = Path(parscale.__file__).parent
BASE = {"errors", "args", "config", "contract", "manifest", "atomic", "locking", "text"}
# Module (or package) -> what it may not import, directly or lazily inside a function.
FORBIDDEN = {
    **{m: {"torch", "parscale.modeling", "parscale.exporter", "parscale.runtime", "parscale.train",
           "parscale.graph", "parscale.scoring", "parscale.fidelity", "parscale.evaluate", "parscale.cli"}
       for m in BASE},
    "graph": {"torch", "parscale.modeling", "parscale.exporter", "parscale.runtime", "parscale.train"},
    "scoring": {"torch", "parscale.modeling", "parscale.exporter", "parscale.runtime", "parscale.train",
                "onnxruntime"},
    "modeling": {"parscale.exporter", "parscale.runtime", "parscale.train", "parscale.cli", "onnxruntime"},
    "runtime": {"torch", "parscale.modeling", "parscale.exporter", "parscale.train", "parscale.cli"},
    "fidelity": {"torch", "parscale.modeling", "parscale.exporter", "parscale.train", "parscale.cli"},
    "exporter": {"parscale.train", "parscale.cli"},
    "train": {"parscale.exporter", "parscale.runtime", "parscale.cli"},
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # from parscale import graph
    return names


def _violations(unit: str, forbidden: set[str]) -> list[str]:
    paths = sorted((ROOT / unit).rglob("*.py")) if (ROOT / unit).is_dir() else [ROOT / f"{unit}.py"]
    assert paths and all(p.is_file() for p in paths), unit
    return [f"{p.relative_to(ROOT)} imports {name}" for p in paths for name in sorted(_imports(p))
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_every_layer_imports_only_from_below() -> None:
    bad = [v for unit, forbidden in FORBIDDEN.items() for v in _violations(unit, forbidden)]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from parscale.exporter import export\n")
    assert _imports(bad) >= {"parscale.exporter", "parscale.exporter.export"}
