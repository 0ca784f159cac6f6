"""Fidelity bars of the int8 / int4 defaults on the trained embedded model, on held-out text.

Bars (issue 4), each export against the fp32 export of the same model: int8 top-1 agreement
>= 99% and mean KL <= 0.002; int4 top-1 >= 92% and mean KL <= 0.02. Skipped until the trained
model is in parscale/assets/default.

The held-out text is the asset folder's own when it ships one, else the held-out split of this
Python's standard library (`parscale.train.corpus`), which the model never trained on.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
import torch
from runtime_helpers import rehash

from parscale.cli import DEFAULT_MODEL
from parscale.config import ParScaleConfig
from parscale.exporter.pipeline import export
from parscale.exporter.quant.calibrate import LayerwiseHessians, calibration_tokens
from parscale.exporter.quant.policy import default_scheme
from parscale.exporter.quant.rewrite import quantize_graph
from parscale.fidelity import Fidelity, compare_exports
from parscale.manifest import MODEL_FILE
from parscale.modeling.checkpoint import load_model

BARS = {8: (0.99, 0.002), 4: (0.92, 0.02)}  # bits -> (min top-1 agreement, max mean KL)
HELD_OUT_NAMES = ("held_out.txt", "heldout.txt", "held_out.py")
WINDOWS = 32  # x 128 tokens: 4096 positions, top-1 standard error ~0.2% at 95%

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model() -> Path:
    if not (DEFAULT_MODEL / "config.json").is_file():
        pytest.skip(f"the trained embedded model is not in {DEFAULT_MODEL} yet")
    return DEFAULT_MODEL


@pytest.fixture(scope="module")
def held_out(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    for name in HELD_OUT_NAMES:
        if (default_model / name).is_file():
            return default_model / name
    from parscale.train.corpus import write_held_out

    return write_held_out(tmp_path_factory.mktemp("text") / "held_out.txt")


@pytest.fixture(scope="module")
def measured(default_model: Path, held_out: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Fidelity]:
    """The fp32 export, made once; the int8 and int4 defaults applied to copies of its graph."""
    root = tmp_path_factory.mktemp("default")
    fp32 = export(default_model, root / "fp32", validate=False).out
    cfg = ParScaleConfig.load(default_model)
    results = {}
    for bits in (8, 4):
        scheme = default_scheme(bits)
        hessians = None
        if scheme.method == "gptq":  # the same calibration `export` runs
            model = load_model(default_model, torch.float32)[1]
            hessians = LayerwiseHessians(model, calibration_tokens(default_model, None)[0])
        out = shutil.copytree(fp32, root / f"int{bits}")
        proto = onnx.load(str(out / MODEL_FILE))
        quantize_graph(proto, scheme, cfg.num_hidden_layers, hessians)
        onnx.save(proto, str(out / MODEL_FILE))
        rehash(out)  # the manifest lists the quantized graph: compare_exports checks the folder
        results[bits] = compare_exports(fp32, out, text=held_out, max_windows=WINDOWS)
    return results


@pytest.mark.parametrize("bits", [8, 4])
def test_fidelity_bars_on_held_out_text(bits: int, measured: dict[int, Fidelity]) -> None:
    f = measured[bits]
    min_top1, max_kl = BARS[bits]
    print(f"int{bits}: top-1 {100 * f.top1_agreement:.2f}%, KL {f.mean_kl:.2e}, "
          f"perplexity {f.perplexity_a:.3f} -> {f.perplexity_b:.3f} ({f.positions} positions)")
    assert f.positions == WINDOWS * 128
    assert f.top1_agreement >= min_top1 and f.mean_kl <= max_kl, f
    assert f.perplexity_b is not None and f.perplexity_a is not None
    assert f.perplexity_b < f.perplexity_a * (1.01 if bits == 8 else 1.05)
