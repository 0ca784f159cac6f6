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
           "parscale.driver", "parscale.scoring", "parscale.fidelity", "parscale.evaluate", "parscale.cli"}
       for m in BASE},
    "driver": {"torch", "parscale.modeling", "parscale.exporter", "parscale.runtime", "parscale.train",
               "parscale.serve", "parscale.cli"},
    "scoring": {"torch", "parscale.modeling", "parscale.exporter", "parscale.runtime", "parscale.train",
                "onnxruntime"},
    "modeling": {"parscale.exporter", "parscale.runtime", "parscale.train", "parscale.cli", "onnxruntime"},
    "runtime": {"torch", "parscale.modeling", "parscale.exporter", "parscale.train", "parscale.serve",
                "parscale.cli"},
    "browser": {"torch", "onnxruntime", "parscale.modeling", "parscale.exporter", "parscale.train", "parscale.cli"},
    "serve": {"torch", "parscale.modeling", "parscale.exporter", "parscale.train", "parscale.cli"},
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


def _violations(unit: str, forbidden: set[str], root: Path = ROOT) -> list[str]:
    paths = sorted((root / unit).rglob("*.py")) if (root / unit).is_dir() else [root / f"{unit}.py"]
    assert paths and all(p.is_file() for p in paths), unit
    return [f"{p.relative_to(root)} imports {name}" for p in paths for name in sorted(_imports(p))
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_every_layer_imports_only_from_below() -> None:
    bad = [v for unit, forbidden in FORBIDDEN.items() for v in _violations(unit, forbidden)]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """Planted violations are reported (a lazy import, a `from parscale import X`, a package's submodule);
    an allowed import and a name that merely starts like a forbidden one are not."""
    (tmp_path / "driver.py").write_text("import numpy\n\ndef f():\n    from parscale import runtime\n")
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "a.py").write_text("from parscale.driver import step\nimport parscale.exporter.quant\n")
    (tmp_path / "runtime" / "b.py").write_text("import torchvision_like_name\nfrom parscale.config import Streams\n")
    assert _violations("driver", FORBIDDEN["driver"], tmp_path) == ["driver.py imports parscale.runtime"]
    assert _violations("runtime", FORBIDDEN["runtime"], tmp_path) == [
        "runtime/a.py imports parscale.exporter.quant"]
    assert _violations("driver", {"numpy"}, tmp_path) == ["driver.py imports numpy"]
