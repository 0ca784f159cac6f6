"""`optimum-cli export parscale` (optimum's command-plugin namespace) equals `parscale export`.

Both commands run as a user would run them, in subprocesses, on the same checkpoint; their export
folders must hold the same files byte for byte and their output the same lines (less timings).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("optimum.commands.base", reason="optimum is not installed (pip install optimum)")

BIN = Path(sys.executable).parent
Done = subprocess.CompletedProcess
OPTIONS = ["--P", "2", "--int8", "--no-validate"]  # --no-validate: the pipeline is the same, and half the time


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found beside {sys.executable} or on PATH")
    return str(path)


def run(*argv: str, cwd: Path) -> Done:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def steady(stdout: str) -> list[str]:
    """The output without what differs between any two runs: stage timings and peak memory."""
    lines = [re.sub(r"^\s*[\d.]+s ", "", line) for line in stdout.splitlines()]
    return [line for line in lines if not line.startswith("peak RSS")]


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Done, Done]:
    """One checkpoint exported by each command into a folder of the same name (the card names it)."""
    from parscale.exporter.init import init_checkpoint

    root = tmp_path_factory.mktemp("optimum")
    ckpt = init_checkpoint(root / "ckpt", P=2, preset="tiny", prefix=4, dtype="float32", seed=2)
    (root / "a").mkdir()
    (root / "b").mkdir()
    ours = run(tool("parscale"), "export", str(ckpt), "-o", "a/out", *OPTIONS, cwd=root)
    theirs = run(tool("optimum-cli"), "export", "parscale", str(ckpt), "b/out", *OPTIONS, cwd=root)
    return root, ours, theirs


def test_optimum_cli_lists_the_command(tmp_path):
    done = run(tool("optimum-cli"), "export", "--help", cwd=tmp_path)
    assert done.returncode == 0 and "parscale" in done.stdout


def test_optimum_cli_export_equals_parscale_export(both):
    root, ours, theirs = both
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    assert digests(root / "a" / "out") == digests(root / "b" / "out")
    assert steady(theirs.stdout) == [line.replace("a/out", "b/out") for line in steady(ours.stdout)]


@pytest.mark.parametrize("extra", [["--P", "3"], ["--int8", "--int4"]], ids=str)
def test_same_errors(tmp_path, extra):
    """The same one-line error and exit code, and no output folder, from either command."""
    from parscale.exporter.init import init_checkpoint

    ckpt = init_checkpoint(tmp_path / "ckpt", P=2, preset="tiny", prefix=4, dtype="float32")
    ours = run(tool("parscale"), "export", str(ckpt), "-o", "out", *extra, cwd=tmp_path)
    theirs = run(tool("optimum-cli"), "export", "parscale", str(ckpt), "out", *extra, cwd=tmp_path)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.strip().splitlines()[-1] == theirs.stderr.strip().splitlines()[-1]
    assert ours.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_usage_error_names_the_arguments(tmp_path):
    done = run(tool("optimum-cli"), "export", "parscale", "only-one-argument", cwd=tmp_path)
    assert done.returncode == 2 and "MODEL and OUT come first" in done.stderr
