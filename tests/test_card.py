"""The model card (README.md in every export): its facts, and its Python snippets run as written.

The snippets are taken from the generated README.md and executed in a fresh interpreter from the
folder that holds the export, the way a reader would paste them. The card shows Python and
JavaScript only; the JavaScript runs in tests/test_web.py.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
from runtime_helpers import without_tokenizer

from parscale.exporter.files.card import CARD, NEW_TOKENS, PROMPT, PROMPT_IDS, model_card
from parscale.exporter.files.templates import TEMPLATE_DIR
from parscale.manifest import Manifest

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def code_blocks(markdown: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(markdown) if lang == language]


@pytest.fixture(scope="module")
def carded_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny P=2 export with a tokenizer (tokenizer.json + tokenizer_config.json, as published
    checkpoints have) and --ort-format, so that every section of the card is present."""
    from runtime_helpers import byte_level_tokenizer

    from parscale.exporter.pipeline import export
    from parscale.modeling.random_init import init_checkpoint

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
    manifest = Manifest.read(carded_export)
    assert CARD in manifest.files
    assert card.startswith("# tiny-p2: ParScale P=2, ONNX")
    assert "| parallel streams P | 2 |" in card and "| prefix tokens per stream | 4 |" in card
    assert f"| KV-cache heads (P × KV heads) | {manifest.model.cache_heads} |" in card
    assert "| quantization | none (float weights) |" in card
    for name in manifest.files:
        assert f"`{name}`" in card, f"{name} is not in the card's file table"
    for section in ("parscale.runtime", "onnxruntime-genai", "transformers.js", "ONNX Runtime Mobile",
                    "plain ONNX Runtime", "--include_ops_by_config tiny-p2/required_operators.config"):
        assert section in card
    # Only languages whose snippets a test runs; other genai languages get a link to its documentation.
    assert {lang for lang, _ in FENCE.findall(card)} == {"python", "js"}
    assert "onnxruntime.ai/docs/genai/api" in card
    assert not re.search(r"\$\{?[A-Za-z_]", card), "a template placeholder was left unfilled"


def test_card_templates_ship_with_the_package():
    """Every template file is matched by the package-data globs: a wheel without them could not write a card."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself does not need it
    root = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = setuptools["package-data"]["parscale"]
    templates = [p.relative_to(root / "parscale").as_posix()
                 for p in (root / "parscale" / "exporter" / "files" / TEMPLATE_DIR).iterdir() if p.is_file()]
    assert len(templates) >= 8
    assert [t for t in templates if not any(fnmatch(t, g) for g in globs)] == []


def test_card_reports_quantization_and_fidelity(carded_export):
    """Rendered from a manifest as a quantized, validated export writes it (no second export needed)."""
    manifest = Manifest.read(carded_export).replace(quantization={
        "scheme": {"bits": 4, "block_size": 32, "symmetric": False, "embedding_bits": 4, "method": "gptq"},
        "calibration": "sampled from the float model: 8 x 128 tokens (seed 0)",
        "bits_per_weight": {"quantized": 9.0, "model": 9.5}, "kept_float": "prefix keys/values, norms",
    }, validation={
        "max_abs_logit_diff": 2e-6, "greedy_match": True, "decode_steps": 8, "tolerance": 1e-3,
        "fidelity": {"top1_agreement": 0.998, "mean_kl": 2e-5, "positions": 512, "perplexity_a": 3.21,
                     "perplexity_b": 3.22, "source": "text held_out.py"},
    })
    card = model_card(manifest, "q", {"model.onnx": 123})
    assert ("int4 weight-only (GPTQ; calibration: sampled from the float model: 8 x 128 tokens (seed 0)), block 32, "
            "asymmetric (embeddings int4); 9.50 bits per weight") in card
    assert "top-1 agreement 99.80%, mean KL 2.00e-05 nats, perplexity 3.210 → 3.220" in card
    assert "max logit difference 2.00e-06" in card


def run_python_snippets(folder: Path) -> list[str]:
    """Run every Python block of the folder's card from its parent folder; their outputs, in order."""
    outputs = []
    for code in code_blocks((folder / CARD).read_text(), "python"):
        done = run_snippet(code, folder.parent)
        assert done.returncode == 0, f"snippet failed:\n{code}\n{done.stderr[-3000:]}"
        assert done.stdout.strip(), f"snippet printed nothing:\n{code}"
        outputs.append(done.stdout)
    return outputs


def run_shell_command(folder: Path) -> str:
    """Run the card's `parscale generate ...` line (as `python -m parscale`) from the folder's parent."""
    (line,) = re.findall(r"`(parscale generate [^`]+)`", (folder / CARD).read_text())
    argv = shlex.split(line)
    done = subprocess.run([sys.executable, "-m", *argv], cwd=folder.parent, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{line} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_python_snippets_run_as_written(carded_export):
    """parscale.runtime, onnxruntime-genai (Python API), and the plain ONNX Runtime loop over model.ort
    (the ONNX Runtime Mobile section) and over model.onnx."""
    from parscale.runtime import Model

    card = (carded_export / CARD).read_text()
    snippets = code_blocks(card, "python")
    assert len(snippets) == 4
    runtime, genai, mobile, plain = snippets
    assert "from parscale.runtime import Model" in runtime and "import onnxruntime_genai" in genai
    assert 'InferenceSession("tiny-p2/model.ort")' in mobile and 'InferenceSession("tiny-p2/model.onnx")' in plain
    outputs = run_python_snippets(carded_export)
    model = Model.load(carded_export, provider="cpu")
    text = model.generate(PROMPT, max_new_tokens=NEW_TOKENS).text
    assert outputs[0] == f"{text}\n"
    assert run_shell_command(carded_export) == f"{text}\n"
    # The plain loops really are greedy decoding over the contract: they pick our runtime's tokens.
    ours = model.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS, greedy=True).generated_ids
    for out in outputs[2:]:
        tokens = ast.literal_eval(out.strip().splitlines()[-1])
        assert tokens[: len(PROMPT_IDS)] == PROMPT_IDS
        assert tokens[len(PROMPT_IDS):][: len(ours)] == ours


def test_the_serve_line_serves_the_export(carded_export):
    """The card's `parscale serve NAME --port 8000` line, run from the folder's parent (on a free port
    instead of 8000): it answers to the model name the card gives, with what the runtime generates."""
    pytest.importorskip("uvicorn", reason="parscale serve needs the serve extra (pip install -e '.[serve]')")
    from serve_helpers import http, running

    from parscale.runtime import Model

    (line,) = re.findall(r"`(parscale serve [^`]+)`", (carded_export / CARD).read_text())
    argv = shlex.split(line)
    assert argv[-2:] == ["--port", "8000"]
    with running([*argv[1:-1], "0"], cwd=carded_export.parent) as server:
        status, _, models = http(server.url + "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == [carded_export.name, f"{carded_export.name}:p2"]
        status, _, answer = http(server.url + "/v1/completions", {"model": carded_export.name, "prompt": PROMPT,
                                                                  "max_tokens": NEW_TOKENS, "temperature": 0})
        want = Model.load(carded_export).generate(PROMPT, max_new_tokens=NEW_TOKENS).text
        assert status == 200 and answer["choices"][0]["text"] == want
        assert server.stop() == 0


def test_python_snippets_without_a_tokenizer_run_as_written(carded_export, tmp_path):
    """A folder without tokenizer files gets the token-id variants of the snippets, which run too."""
    from parscale.runtime import Model

    bare = without_tokenizer(carded_export, tmp_path / "bare-p2")
    card = (bare / CARD).read_text()
    assert "lacks the tokenizer files" in card and PROMPT not in card.split("## Files")[1]
    runtime, genai, *loops = run_python_snippets(bare)
    assert len(loops) == 2
    model = Model.load(bare, provider="cpu")
    ours = model.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS).generated_ids
    assert ast.literal_eval(runtime.strip()) == ours
    assert run_shell_command(bare) == ",".join(map(str, ours)) + "\n"
    theirs = ast.literal_eval(genai.strip())
    assert theirs[: len(ours)] == ours  # genai stops at an EOS id as ours does, or runs to the length
