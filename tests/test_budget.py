"""The memory estimate against the peaks measured by benchmarks/export_memory.py, and its refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError
from parscale.exporter import budget
from parscale.exporter.quant.policy import default_scheme
from parscale.modeling.random_init import make_config

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def measured() -> list[dict]:
    """Every successful case of benchmarks/results/export_memory*.json."""
    return [r for path in sorted(RESULTS.glob("export_memory*.json")) for r in json.loads(path.read_text())
            if r["exit_code"] == 0]


@pytest.mark.parametrize("record", measured(), ids=lambda r: r["case"])
def test_estimate_bounds_every_measured_peak(record: dict) -> None:
    """The estimate must not promise less than an export really took (else the check lets OOMs through)."""
    cfg = ParScaleConfig.from_dict(make_config(record["preset"], P=record["P"]))
    scheme = default_scheme(int(record["kind"][3:])) if record["kind"] != "fp32" else None
    plan = budget.plan(cfg, dtype="fp32", quantize=scheme, validate=True)
    assert plan.params == record["params"]
    assert plan.peak_bytes >= record["peak_rss"], (plan, record["peak_rss"])
    assert plan.peak_bytes <= 1.5 * record["peak_rss"] + budget.BASE_BYTES  # and is not absurdly loose


def test_results_are_present() -> None:
    assert measured(), f"{RESULTS} holds no successful export_memory measurement"


def test_check_refuses_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ParScaleConfig.from_dict(make_config("qwen2.5-1.5b", P=8))
    plan = budget.plan(cfg, dtype="fp32", quantize=default_scheme(4), validate=True)
    monkeypatch.setattr(budget, "available_bytes", lambda: plan.peak_bytes - 1)
    with pytest.raises(ParScaleError, match=r"--no-validate.*--method rtn.*--force-memory"):
        budget.check(plan)
    monkeypatch.setattr(budget, "available_bytes", lambda: plan.peak_bytes)
    budget.check(plan)  # fits exactly: no error


def test_quantized_output_estimate_is_close_to_real_sizes() -> None:
    """Against the 0.5B P=4 sizes in the README's quantization table (int8 591.8 MB, int4 337.1 MB)."""
    cfg = ParScaleConfig.from_dict(make_config("qwen2.5-0.5b", P=4))
    for bits, real in ((8, 591_792_946), (4, 337_094_035)):
        est = budget.plan(cfg, dtype="fp32", quantize=default_scheme(bits), validate=False).output_bytes
        assert 0.9 * real <= est <= 1.1 * real, (bits, est, real)
