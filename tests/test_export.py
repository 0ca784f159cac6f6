"""ONNX exports against the PyTorch module, the golden reference data and onnxruntime-genai."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from runtime_helpers import greedy_graph

from parscale import contract
from parscale.config import ParScaleConfig
from parscale.driver import GraphInfo, open_session, step
from parscale.exporter.pipeline import Dtype, export
from parscale.exporter.torch_reference import compare
from parscale.manifest import MANIFEST, Manifest
from parscale.modeling.checkpoint import load_model, save_checkpoint
from parscale.modeling.random_init import make_config, random_model

# (P, kv heads, tied, stored dtype, shards): together they cover P in {1,2,3,4,8}, GQA (2 of 4
# heads) and MHA, tied and untied embeddings, bf16 storage and sharded weights.
CASES = [
    pytest.param(1, 2, True, "float32", 1, id="P1-gqa-tied-fp32"),
    pytest.param(2, 4, False, "bfloat16", 1, id="P2-mha-untied-bf16"),
    pytest.param(3, 2, False, "float32", 3, id="P3-gqa-untied-sharded"),
    pytest.param(4, 2, True, "bfloat16", 2, id="P4-gqa-tied-bf16-sharded"),
    pytest.param(8, 4, True, "float32", 1, id="P8-mha-tied-fp32"),
]


def make_checkpoint(path: Path, *, P: int, kv: int = 2, tied: bool = False, dtype: str = "float32",  # noqa: N803
                    shards: int = 1, seed: int = 0, prefix: int = 5) -> Path:
    d = make_config("tiny", P=P, prefix=prefix, tied=tied, dtype=dtype, num_key_value_heads=kv)
    save_checkpoint(random_model(ParScaleConfig.from_dict(d), seed), d, path, shards=shards)
    return path


@pytest.mark.parametrize(("P", "kv", "tied", "dtype", "shards"), CASES)
def test_export_matches_pytorch(tmp_path, P, kv, tied, dtype, shards):  # noqa: N803
    ckpt = make_checkpoint(tmp_path / "ckpt", P=P, kv=kv, tied=tied, dtype=dtype, shards=shards)
    result = export(ckpt, tmp_path / "out", P=P)
    assert result.validation is not None and result.validation.ok
    _, module = load_model(ckpt)
    report = compare(open_session(tmp_path / "out" / "model.onnx"), module, steps=8, seed=7)
    assert report.steps == 8
    assert report.prefill_diff < 1e-4, report
    assert report.decode_diff < 1e-4, report
    assert report.greedy_match


def test_golden_reference(tmp_path, golden_dir):
    """The export reproduces the original implementation's logits and greedy tokens."""
    cases = np.load(golden_dir / "cases.npz")
    export(golden_dir / "ckpt", tmp_path / "out")
    session = open_session(tmp_path / "out" / "model.onnx")
    ids, mask = cases["input_ids"], cases["attention_mask"]
    logits, _ = step(session, GraphInfo.of(session), ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None))
    real = mask.astype(bool)
    assert np.abs(logits - cases["logits"])[real].max() < 1e-3
    n = cases["greedy_batch"].shape[1] - ids.shape[1]
    assert (greedy_graph(session, ids, mask, n) == cases["greedy_batch"]).all()
    single = greedy_graph(session, ids[1:], mask[1:], n)
    assert (single == cases["greedy_single"]).all()


@pytest.fixture(scope="module")
def p4_export(tiny):
    ckpt = tiny.checkpoint(P=4, tied=True, prefix=6)
    return ckpt, tiny.export(ckpt, P=4)


def test_folder_layout_and_manifest(p4_export):
    _, out = p4_export
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "genai_config.json", MANIFEST} <= names
    manifest = Manifest.read(out)
    assert manifest.model.P == 4 and manifest.model.prefix_tokens == 6
    assert manifest.model.cache_heads == 8
    assert manifest.dtype == "fp32" and manifest.quantization is None
    assert manifest.io["inputs"] == contract.input_names(2)
    assert manifest.io["outputs"] == contract.output_names(2)
    assert len(manifest.source["sha256"]) == 64
    assert manifest.files["model.onnx"].bytes == (out / "model.onnx").stat().st_size
    proto = onnx.load(out / "model.onnx", load_external_data=False)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["parscale"])
    assert meta["model"] == manifest.to_dict()["model"] and meta["source"] == manifest.source


def test_graph_io_follows_contract(p4_export):
    _, out = p4_export
    session = open_session(out / "model.onnx")
    inputs = {i.name: i for i in session.get_inputs()}
    # num_logits_to_keep is an optional input: an initializer supplies its default (0: all logits).
    assert list(inputs) == [n for n in contract.input_names(2) if n != contract.NUM_LOGITS_TO_KEEP]
    assert contract.NUM_LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}
    assert inputs[contract.past_key(0)].shape == [contract.BATCH, 8, "past", 16]
    assert inputs[contract.ATTENTION_MASK].shape == [contract.BATCH, "total"]
    outputs = {o.name: o for o in session.get_outputs()}
    assert outputs[contract.present_value(1)].shape == [contract.BATCH, 8, "total", 16]
    assert outputs[contract.LOGITS].type == "tensor(float)"
    # The cache holds the prefix: a first step with an empty past returns prefix rows + real tokens.
    cfg = ParScaleConfig.load(out)
    ids = np.array([[3, 4, 5]], np.int64)
    logits, present = step(session, GraphInfo.of(session), ids, np.ones_like(ids), np.arange(3)[None], keep=2)
    assert logits.shape == (1, 2, cfg.vocab_size)
    assert present[contract.past_key(0)].shape == (1, 8, cfg.n_prefix + 3, cfg.head_dim)
    assert GraphInfo.of(session).prefix_rows == cfg.n_prefix > 0


def test_fp16_export(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", P=2, tied=False)
    result = export(ckpt, tmp_path / "out", dtype=Dtype.fp16)
    assert result.validation is not None and result.validation.ok
    session = open_session(tmp_path / "out" / "model.onnx")
    assert GraphInfo.of(session).cache_dtype is np.float16
    assert next(o for o in session.get_outputs() if o.name == "logits").type == "tensor(float)"
    assert Manifest.read(tmp_path / "out").dtype == "fp16"


def test_module_keeps_last_logits():
    d = make_config("tiny", P=3, prefix=4, dtype="float32")
    module = random_model(ParScaleConfig.from_dict(d), seed=1)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        full, _ = module(ids)
        last, _ = module(ids, num_logits_to_keep=1)
    assert last.shape == (1, 1, d["vocab_size"])
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=0)
