"""`optimum-cli export parscale` (optimum's command-plugin namespace) equals `parscale export`.

Both commands run as a user would run them, in subprocesses, on the same checkpoint; their export
folders must hold the same files byte for byte and their output the same lines (less timings).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # exports and CLI runs: the full tier (CI), not `-m "not slow"`

pytest.importorskip("optimum.commands.base", reason="optimum is not installed (pip install optimum)")

BIN = Path(sys.executable).parent
Done = subprocess.CompletedProcess
# --no-validate: the pipeline is the same, in half the time; --ort-format: the CLI option end to end.
OPTIONS = ["--P", "2", "--int8", "--no-validate", "--ort-format"]


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found beside {sys.executable} or on PATH")
    return str(path)


def run(*argv: str, cwd: Path) -> Done:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file; of model.ort, of its graph (see `ort_graph`), and the manifest without its
    sha256 and size (ONNX Runtime's flatbuffer writer does not lay the same graph out byte for byte)."""
    d = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
    if (folder / "model.ort").exists():
        d["model.ort"] = ort_graph(folder / "model.ort")
        manifest = json.loads((folder / "parscale.json").read_text())
        manifest["files"]["model.ort"].pop("sha256")
        manifest["files"]["model.ort"].pop("bytes")
        d["parscale.json"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return d


def ort_graph(path: Path) -> str:
    """A digest of an ORT-format model's graph: nodes, attributes, initializers, node args, I/O.

    ONNX Runtime's flatbuffer writer does not lay a model out the same way twice (the bytes differ
    from run to run even in one process, same size, same content), so model.ort is compared by content.
    """
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py import fbs

    session = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(bytearray(path.read_bytes()), 0)
    g, h = session.Model().Graph(), hashlib.sha256()
    for i in range(g.NodesLength()):
        n = g.Nodes(i)
        h.update(repr((n.Name(), n.Domain(), n.OpType(), n.SinceVersion(),
                       [n.Inputs(k) for k in range(n.InputsLength())],
                       [n.Outputs(k) for k in range(n.OutputsLength())])).encode())
        for k in range(n.AttributesLength()):
            a = n.Attributes(k)
            h.update(repr((a.Name(), a.Type(), a.I(), a.F(), a.S(), a.IntsAsNumpy().tolist() if a.IntsLength() else [],
                           a.FloatsAsNumpy().tolist() if a.FloatsLength() else [])).encode())
    for i in range(g.InitializersLength()):
        t = g.Initializers(i)
        h.update(repr((t.Name(), t.DataType(), t.DimsAsNumpy().tolist() if t.DimsLength() else [])).encode())
        h.update(t.RawDataAsNumpy().tobytes() if t.RawDataLength() else b"")
    h.update(repr(sorted(g.NodeArgs(i).Name() for i in range(g.NodeArgsLength()))).encode())
    io = [g.Inputs(i) for i in range(g.InputsLength())], [g.Outputs(i) for i in range(g.OutputsLength())]
    h.update(repr(io).encode())
    return h.hexdigest()


def steady(stdout: str) -> list[str]:
    """The output without what differs between any two runs: stage timings and peak memory."""
    lines = [re.sub(r"^\s*[\d.]+s ", "", line) for line in stdout.splitlines()]
    return [line for line in lines if not line.startswith("peak RSS")]


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Done, Done]:
    """One checkpoint exported by each command into a folder of the same name (the card names it)."""
    from parscale.modeling.random_init import init_checkpoint

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
    assert {"model.ort", "required_operators.config", "README.md"} <= set(digests(root / "a" / "out"))
    assert steady(theirs.stdout) == [line.replace("a/out", "b/out") for line in steady(ours.stdout)]


@pytest.mark.parametrize("extra", [["--P", "3"], ["--int8", "--int4"]], ids=str)
def test_same_errors(tmp_path, extra):
    """The same one-line error and exit code, and no output folder, from either command."""
    from parscale.modeling.random_init import init_checkpoint

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
