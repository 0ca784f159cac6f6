"""The large-model code path on small models: every export option with the weights in `model.onnx.data`.

Real checkpoints are far above the external-data threshold (64 MB); with `external_data_threshold=0`
a tiny model takes the same path: the float graph traced to disk, quantized tensor by tensor from
its external data, validated and compared with ONNX Runtime from files. Each export must give the
same tokens as the same export kept in one file, and load in the runtime as a user would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from parscale.driver import GraphInfo, open_session, step
from parscale.exporter.pipeline import Dtype, export
from parscale.exporter.quant.policy import QuantScheme, default_scheme
from parscale.manifest import EXTERNAL_DATA, MODEL_FILE, Manifest, check_files
from parscale.modeling.random_init import init_checkpoint
from parscale.runtime import Model

PROMPT = [3, 17, 250, 9, 41]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {tied: init_checkpoint(root / f"tied-{tied}", P=4, preset="tiny", prefix=8, dtype="bfloat16",
                                  tied=tied, seed=int(tied)) for tied in (True, False)}


def greedy(folder: Path, n: int = 12) -> list[int]:
    model = Model.load(folder, provider="cpu", threads=1)
    return model.generate(prompt_ids=PROMPT, max_new_tokens=n, ignore_eos=True).generated_ids


CASES = [
    pytest.param(Dtype.fp32, None, True, True, False, id="fp32-float-tied"),
    pytest.param(Dtype.fp32, None, False, False, False, id="fp32-float-untied-novalidate"),
    pytest.param(Dtype.fp16, None, True, False, False, id="fp16-float-untied"),
    pytest.param(Dtype.fp32, default_scheme(8), True, True, False, id="fp32-int8-rtn-tied"),
    pytest.param(Dtype.fp32, default_scheme(8), False, False, True, id="fp32-int8-untied-novalidate-ort"),
    pytest.param(Dtype.fp32, default_scheme(4), True, False, False, id="fp32-int4-gptq-untied"),
    pytest.param(Dtype.fp32, default_scheme(4, method="rtn"), True, True, True, id="fp32-int4-rtn-tied-ort"),
    pytest.param(Dtype.fp16, default_scheme(4), True, True, False, id="fp16-int4-gptq-tied"),
    pytest.param(Dtype.fp16, default_scheme(8, dtype="fp16"), False, False, False, id="fp16-int8-untied-novalidate"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "scheme", "validate", "tied", "ort_format"), CASES)
def test_external_data_export_equals_single_file_export(
    dtype: Dtype, scheme: QuantScheme | None, validate: bool, tied: bool, ort_format: bool,
    checkpoints: dict[bool, Path], tmp_path: Path,
) -> None:
    options = dict(dtype=dtype, quantize=scheme, validate=validate, ort_format=ort_format)
    big = export(checkpoints[tied], tmp_path / "external", external_data_threshold=0, **options)
    small = export(checkpoints[tied], tmp_path / "inline", **options)

    data = (big.out / EXTERNAL_DATA).stat().st_size
    moved = (small.out / MODEL_FILE).stat().st_size - (big.out / MODEL_FILE).stat().st_size
    assert data > 0 and moved > 0.8 * data  # the weights left the graph file for the data file
    assert not (small.out / EXTERNAL_DATA).exists()
    check_files(big.out, Manifest.read(big.out), checksums=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["external", "inline"]  # no work folders left
    if validate:
        assert big.validation is not None and big.validation.ok
        assert big.validation.max_abs_diff == small.validation.max_abs_diff
        if scheme is not None:
            assert big.fidelity == small.fidelity
    if scheme is not None:
        assert big.quantization.bits_per_weight == small.quantization.bits_per_weight
    assert greedy(big.out) == greedy(small.out)
    if ort_format:
        assert (big.out / "model.ort").stat().st_size > 0


@pytest.mark.slow
def test_external_data_logits_equal_single_file(checkpoints: dict[bool, Path], tmp_path: Path) -> None:
    """Bit for bit: the same weights are read, whether from the proto or from model.onnx.data."""
    runs = []
    for name, threshold in (("a", 0), ("b", 1 << 30)):
        out = export(checkpoints[True], tmp_path / name, quantize=default_scheme(8), validate=False,
                     external_data_threshold=threshold).out
        s = open_session(out / MODEL_FILE)
        runs.append(step(s, GraphInfo.of(s), np.array([PROMPT]), np.ones((1, 5), np.int64), np.arange(5)[None])[0])
    np.testing.assert_array_equal(runs[0], runs[1])
