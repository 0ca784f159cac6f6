"""Failures at the CLI edge: an unexpected exception in the library is one line, exit 1, nothing left behind.

The failure is injected into a real `parscale export` process (a stage function replaced before
the CLI runs), so the whole path from the library to the console is exercised.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parscale.modeling.random_init import make_config

pytestmark = pytest.mark.slow  # exports and CLI runs: the full tier (CI), not `-m "not slow"`

INJECT = """
import sys
import parscale.exporter.export_checks as checks_module
import parscale.exporter.pipeline as export_module
from parscale.cli import main

def boom(*args, **kwargs):
    raise RuntimeError("injected failure\\nsecond line")

for module in (export_module, checks_module):  # the stages' functions, where each looks them up
    if hasattr(module, sys.argv[1]):
        setattr(module, sys.argv[1], boom)
sys.argv = ["parscale", *sys.argv[2:]]
main()
"""


@pytest.fixture(scope="module")
def ckpt(tiny) -> Path:
    return tiny.checkpoint(P=2, prefix=4)


def run(target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", INJECT, target, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("target", "stage"), [
    ("build_decoder", "writing the ONNX graph"),
    ("quantize_graph", "quantizing"),
    ("check_graph", "validating on CPU against PyTorch"),
    ("write_runtime_files_and_card", "writing files for other runtimes and the model card"),
])
def test_unexpected_failure_is_one_line_naming_the_stage(target: str, stage: str, ckpt: Path, tmp_path: Path) -> None:
    r = run(target, "export", str(ckpt), "-o", str(tmp_path / "out"), "--int8")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0] == (f"error: {stage}: RuntimeError: injected failure; run with --verbose for the traceback")
    assert list(tmp_path.iterdir()) == []  # no output, no partial or float work folder


def test_verbose_shows_the_traceback(ckpt: Path, tmp_path: Path) -> None:
    r = run("build_decoder", "export", str(ckpt), "-o", str(tmp_path / "out"), "--verbose")
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "injected failure" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: writing the ONNX graph: RuntimeError: injected failure"
    assert list(tmp_path.iterdir()) == []


def config_only(path: Path, preset: str, P: int) -> Path:  # noqa: N803
    """A checkpoint folder with a real config and no weights: the checks below run before any are read."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(make_config(preset, P=P)))
    return path


def test_head_size_fused_attention_cannot_rotate_is_refused_before_any_work(tmp_path: Path) -> None:
    tmp_path.joinpath("ck").mkdir()
    config = make_config("tiny", P=2, hidden_size=32)  # 4 heads of 8: GroupQueryAttention rotates multiples of 16
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    r = subprocess.run([sys.executable, "-m", "parscale", "export", str(tmp_path / "ck"), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("error: head_dim 8 is not a multiple of 16, which ONNX Runtime's GroupQueryAttention "
                                "needs; every published Qwen2 / ParScale shape has 64 or 128")
    assert not (tmp_path / "out").exists()


def test_memory_estimate_refuses_before_any_work(tmp_path: Path) -> None:
    ck = config_only(tmp_path / "ck3", "qwen2.5-3b", 4)
    script = ("import sys; import parscale.exporter.budget as b; b.available_bytes = lambda: 8 << 30;"
              "from parscale.cli import main; sys.argv = ['parscale', *sys.argv[1:]]; main()")
    r = subprocess.run([sys.executable, "-c", script, "export", str(ck), "-o", str(tmp_path / "out"), "--int4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and "Traceback" not in msg
    assert "GiB of memory" in msg and "8.0 GiB are available" in msg
    assert "--no-validate" in msg and "--method rtn" in msg and "--force-memory" in msg
    assert not (tmp_path / "out").exists()
    # With --force-memory the estimate is not a barrier: the export goes on and fails on the missing weights.
    r = subprocess.run([sys.executable, "-c", script, "export", str(ck), "-o", str(tmp_path / "out"), "--int4",
                        "--force-memory"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no weight files" in r.stderr


def test_ort_format_too_large_is_refused_before_any_work(tmp_path: Path) -> None:
    ck = config_only(tmp_path / "ck", "qwen2.5-1.5b", 2)
    r = subprocess.run([sys.executable, "-m", "parscale", "export", str(ck), "-o", str(tmp_path / "out"),
                        "--ort-format", "--force-memory"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "ORT format file cannot exceed 2 GiB" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
