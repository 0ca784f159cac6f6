"""`--ort-format`: the ORT flatbuffer model generates what model.onnx generates, and its operator list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from parscale import contract
from parscale.exporter.mobile import ORT_MODEL, ORT_OPERATORS, operators
from parscale.manifest import MODEL_FILE, read_manifest


def greedy(session: ort.InferenceSession, prompts: list[list[int]], n: int, cache_heads: int, head_dim: int,
           layers: int) -> list[list[int]]:
    """Greedy tokens of a left-padded batch over the graph contract, nothing but the session."""
    width = max(len(p) for p in prompts)
    ids = np.array([[0] * (width - len(p)) + p for p in prompts], np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int64)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    past = dict.fromkeys(contract.past_names(layers), np.zeros((len(prompts), cache_heads, 0, head_dim), np.float32))
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(n):
        logits, *present = session.run(contract.output_names(layers), {
            contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask, contract.POSITION_IDS: pos,
            contract.NUM_LOGITS_TO_KEEP: np.array(1, np.int64), **past})
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        for row, token in zip(out, ids[:, 0], strict=True):
            row.append(int(token))
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
        pos = pos[:, -1:] + 1
        past = dict(zip(contract.past_names(layers), present, strict=True))
    return out


@pytest.fixture(scope="module")
def int8_ort_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny P=2 int8 export with --ort-format: MatMulNBits and GatherBlockQuantized in ORT format."""
    from parscale.exporter.export import export
    from parscale.exporter.quantize import default_scheme
    from parscale.modeling.init import init_checkpoint

    root = tmp_path_factory.mktemp("mobile")
    ckpt = init_checkpoint(root / "ckpt", P=2, preset="tiny", prefix=4, dtype="float32", seed=5)
    return export(ckpt, root / "export", P=2, validate=False, quantize=default_scheme(8), ort_format=True).out


def test_ort_files_are_listed_and_portable(int8_ort_export):
    files = read_manifest(int8_ort_export)["files"]
    assert {ORT_MODEL, ORT_OPERATORS, MODEL_FILE} <= set(files)
    config = (int8_ort_export / ORT_OPERATORS).read_text()
    assert str(int8_ort_export.parent) not in config and "/tmp" not in config  # no build machine paths
    ops = operators(int8_ort_export)
    contrib = {op for key, names in ops.items() if key.startswith("com.microsoft;") for op in names}
    assert "MatMulNBits" in contrib  # the int8 projections, kept through the conversion
    assert any(key.startswith("ai.onnx;") for key in ops)


def test_ort_model_generates_like_the_onnx_model(int8_ort_export):
    m = read_manifest(int8_ort_export)["model"]
    shape = dict(cache_heads=m["cache_heads"], head_dim=m["head_dim"], layers=m["num_hidden_layers"])
    prompts, n = [[7, 8, 9, 10, 11], [300, 2]], 10
    sessions = {}
    for name in (MODEL_FILE, ORT_MODEL):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(int8_ort_export / name), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in sessions[ORT_MODEL].get_inputs()] == [i.name for i in sessions[MODEL_FILE].get_inputs()]
    assert greedy(sessions[ORT_MODEL], prompts, n, **shape) == greedy(sessions[MODEL_FILE], prompts, n, **shape)

