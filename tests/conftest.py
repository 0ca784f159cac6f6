"""Shared pytest fixtures.

`shared/` (the spec and the reference data) sits beside the repository: the repository root's parent
holds it. Fixtures that need it skip, with the path they looked at, when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_helpers import TinyFactory

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The `shared/` folder beside the repository."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DIR} (expected beside the repository)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def golden_dir(shared_dir: Path) -> Path:
    """`shared/golden/p2_gqa`: a P=2 GQA checkpoint (`ckpt/`) and its reference outputs (`cases.npz`)."""
    path = shared_dir / "golden" / "p2_gqa"
    needed = [path / "cases.npz", path / "ckpt" / "config.json"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        pytest.skip(f"golden reference data missing: {', '.join(missing)}")
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyFactory:
    """The memoized factory of tiny checkpoints and exports (tests/runtime_helpers.py)."""
    return TinyFactory(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_exports(tiny: TinyFactory) -> dict[int, tuple[Path, Path]]:
    """Tiny random fp32 checkpoints (prefix 8, byte-level tokenizer) and their exports, P = 1 and 4.

    Maps P -> (checkpoint folder, export folder).
    """
    made = {}
    for P in (1, 4):
        ckpt = tiny.checkpoint(P=P, seed=P, tokenizer=True)
        made[P] = (ckpt, tiny.export(ckpt, P=P, validate=False))
    return made


@pytest.fixture(scope="session")
def default_int8_export(tiny: TinyFactory) -> Path:
    """The embedded default model exported at P = 1, 2, 4 and 8 in one int8 folder (as `make demo` does,
    without validation): what `parscale serve` tests run against."""
    from parscale.cli import DEFAULT_MODEL
    from parscale.exporter.quant.policy import default_scheme

    return tiny.export(DEFAULT_MODEL, P=[1, 2, 4, 8], quantize=default_scheme(8, method="rtn"), validate=False)
