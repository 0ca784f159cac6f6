"""The model card (README.md in every export): its facts, and its Python snippets run as written.

The snippets are taken from the generated README.md and executed in a fresh interpreter from the
folder that holds the export, the way a reader would paste them.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from parscale.exporter.card import CARD, NEW_TOKENS, PROMPT_IDS, model_card
from parscale.manifest import Manifest

pytestmark = pytest.mark.slow  # exports and CLI runs: the full tier (CI), not `-m "not slow"`

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def code_blocks(markdown: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(markdown) if lang == language]


@pytest.fixture(scope="module")
def carded_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny P=2 export with a tokenizer (tokenizer.json + tokenizer_config.json, as published
    checkpoints have) and --ort-format, so that every section of the card is present."""
    from runtime_helpers import byte_level_tokenizer

    from parscale.exporter.export import export
    from parscale.modeling.init import init_checkpoint

    root = tmp_path_factory.mktemp("card")
    ckpt = init_checkpoint(root / "ckpt", P=2, preset="tiny", prefix=4, dtype="float32", seed=11)
    byte_level_tokenizer(ckpt / "tokenizer.json")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "model_max_length": 512,
    }))
    return export(ckpt, root / "tiny-p2", P=2, validate=False, ort_format=True).out


def run_snippet(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_card_describes_the_export(carded_export):
    card = (carded_export / CARD).read_text()
    manifest = Manifest.read(carded_export).to_dict()
    assert CARD in manifest["files"]
    assert card.startswith("# tiny-p2: ParScale P=2, ONNX")
    assert "| parallel streams P | 2 |" in card and "| prefix tokens per stream | 4 |" in card
    assert f"| KV-cache heads (P × KV heads) | {manifest['model']['cache_heads']} |" in card
    assert "| quantization | none (float weights) |" in card
    for name in manifest["files"]:
        assert f"`{name}`" in card, f"{name} is not in the card's file table"
    for section in ("parscale.runtime", "onnxruntime-genai", "transformers.js", "ONNX Runtime Mobile",
                    "plain ONNX Runtime", "--include_ops_by_config tiny-p2/required_operators.config"):
        assert section in card
    for language in ("c", "csharp", "java", "js"):
        assert code_blocks(card, language), f"no {language} snippet"


def test_card_reports_quantization_and_fidelity(carded_export):
    """Rendered from a manifest as a quantized, validated export writes it (no second export needed)."""
    manifest = Manifest.read(carded_export).to_dict()
    manifest["quantization"] = {
        "scheme": {"bits": 4, "block_size": 32, "symmetric": False, "embedding_bits": 4, "method": "gptq"},
        "calibration": "sampled from the float model: 8 x 128 tokens (seed 0)",
        "bits_per_weight": {"quantized": 9.0, "model": 9.5}, "kept_float": "prefix keys/values, norms",
    }
    manifest["validation"] = {
        "max_abs_logit_diff": 2e-6, "greedy_match": True, "decode_steps": 8, "tolerance": 1e-3,
        "fidelity": {"top1_agreement": 0.998, "mean_kl": 2e-5, "positions": 512, "perplexity_a": 3.21,
                     "perplexity_b": 3.22, "source": "text held_out.py"},
    }
    card = model_card(manifest, "q", {"model.onnx": 123})
    assert ("int4 weight-only (GPTQ; calibration: sampled from the float model: 8 x 128 tokens (seed 0)), block 32, "
            "asymmetric (embeddings int4); 9.50 bits per weight") in card
    assert "top-1 agreement 99.80%, mean KL 2.00e-05 nats, perplexity 3.210 → 3.220" in card
    assert "max logit difference 2.00e-06" in card


def test_python_snippets_run_as_written(carded_export):
    """parscale.runtime, onnxruntime-genai (Python API) and the plain ONNX Runtime loop."""
    from parscale.runtime import Model

    card = (carded_export / CARD).read_text()
    snippets = code_blocks(card, "python")
    assert len(snippets) == 3
    runtime, genai, plain = snippets
    assert "from parscale.runtime import Model" in runtime and "import onnxruntime_genai" in genai
    assert "import onnxruntime as ort" in plain
    outputs = []
    for code in snippets:
        done = run_snippet(code, carded_export.parent)
        assert done.returncode == 0, f"snippet failed:\n{code}\n{done.stderr[-3000:]}"
        assert done.stdout.strip(), f"snippet printed nothing:\n{code}"
        outputs.append(done.stdout)
    # The plain loop really is greedy decoding over the contract: it picks our runtime's tokens.
    tokens = ast.literal_eval(outputs[2].strip().splitlines()[-1])
    model = Model.load(carded_export, provider="cpu")
    ours = model.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS, greedy=True).generated_ids
    assert tokens[: len(PROMPT_IDS)] == PROMPT_IDS
    assert tokens[len(PROMPT_IDS):][: len(ours)] == ours
