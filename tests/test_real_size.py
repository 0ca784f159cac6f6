"""The model card's headline command with its defaults on a checkpoint of a size people deploy.

A random ParScale checkpoint with qwen2.5-0.5b shapes at P=4 (1 GB in bf16, 2 GB of float32 weights,
far above the external-data threshold) goes through `parscale export ck -o out --P 4 --int8`
(validation and fidelity on), then `parscale generate` runs the result. A few minutes, a few GB.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from parscale.manifest import EXTERNAL_DATA, Manifest, check_files


def parscale(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parscale", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_headline_command_at_half_a_billion_parameters(tmp_path: Path) -> None:
    ck, out = tmp_path / "ck", tmp_path / "out"
    r = parscale("init", str(ck), "--preset", "qwen2.5-0.5b", "--P", "4")
    assert r.returncode == 0, r.stderr

    r = parscale("export", str(ck), "-o", str(out), "--P", "4", "--int8")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "greedy match True" in r.stdout
    m = Manifest.read(out)
    check_files(out, m, checksums=True)
    assert m.validation["max_abs_logit_diff"] <= 1e-3 and m.validation["greedy_match"]
    assert m.quantization["scheme"]["bits"] == 8
    assert m.validation["fidelity"]["positions"] == 4 * 128
    assert (out / EXTERNAL_DATA).stat().st_size > 400e6  # int8 codes of 0.5B weights
    peak = float(re.search(r"peak RSS ([\d,]+) MB", r.stdout).group(1).replace(",", ""))
    print(f"export peak RSS {peak:.0f} MB for {4 * m.quantization['quantized_weights'] / 1e6:.0f} MB of "
          "quantized float32 weights")

    r = parscale("generate", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert len(result["generated_ids"]) == 8 and result["P"] == 4
