"""benchmarks/genai_bench.py, the onnxruntime-genai peer of benchmarks/run.py, end to end on a tiny checkpoint:
its model builder must run in the environment `make install` makes (it imports onnx_ir without declaring it,
so the bench extra has to)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import genai_bench

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_genai_builds_and_runs_the_p1_weights(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-m", "parscale", "init", str(ckpt), "--preset", "tiny", "--P", "1"],
                   check=True, capture_output=True)
    hf = genai_bench.make_hf_qwen2(ckpt, tmp_path / "hf_qwen2_p1")
    assert json.loads((hf / "config.json").read_text())["model_type"] == "qwen2"
    out = genai_bench.build(hf, tmp_path / "genai_int8", "int8", threads=1)
    assert (out / "genai_config.json").is_file()
    run = subprocess.run([sys.executable, "-m", "benchmarks.genai_bench", "run", str(out), "--prompt-len", "8",
                          "--gen", "4", "--threads", "1"], cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["decode_ms_per_token"] > 0
