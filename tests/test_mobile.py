"""`--ort-format`: the ORT flatbuffer model generates what model.onnx generates, and its operator list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from runtime_helpers import greedy_graph

from parscale.driver import open_session
from parscale.exporter.files.mobile import ORT_MODEL, ORT_OPERATORS, operators
from parscale.manifest import MODEL_FILE, Manifest


def greedy(session: ort.InferenceSession, prompts: list[list[int]], n: int) -> list[list[int]]:
    """The new greedy tokens of a left-padded batch of prompts."""
    width = max(len(p) for p in prompts)
    ids = np.array([[0] * (width - len(p)) + p for p in prompts], np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int64)
    return greedy_graph(session, ids, mask, n)[:, width:].tolist()


@pytest.fixture(scope="module")
def int8_ort_export(tiny) -> Path:
    """A tiny P=2 int8 export with --ort-format: MatMulNBits and GatherBlockQuantized in ORT format."""
    from parscale.exporter.quant.policy import default_scheme

    return tiny.export(tiny.checkpoint(P=2, prefix=4, seed=5), P=2, validate=False, quantize=default_scheme(8),
                       ort_format=True)


def test_ort_files_are_listed_and_portable(int8_ort_export):
    files = Manifest.read(int8_ort_export).files
    assert {ORT_MODEL, ORT_OPERATORS, MODEL_FILE} <= set(files)
    config = (int8_ort_export / ORT_OPERATORS).read_text()
    assert str(int8_ort_export.parent) not in config and "/tmp" not in config  # no build machine paths
    ops = operators(int8_ort_export)
    contrib = {op for key, names in ops.items() if key.startswith("com.microsoft;") for op in names}
    assert "MatMulNBits" in contrib  # the int8 projections, kept through the conversion
    assert any(key.startswith("ai.onnx;") for key in ops)


def test_ort_model_generates_like_the_onnx_model(int8_ort_export):
    prompts, n = [[7, 8, 9, 10, 11], [300, 2]], 10
    sessions = {name: open_session(int8_ort_export / name) for name in (MODEL_FILE, ORT_MODEL)}
    assert [i.name for i in sessions[ORT_MODEL].get_inputs()] == [i.name for i in sessions[MODEL_FILE].get_inputs()]
    assert greedy(sessions[ORT_MODEL], prompts, n) == greedy(sessions[MODEL_FILE], prompts, n)

