"""transformers.js (npm @huggingface/transformers on Node, onnxruntime-node) runs an export.

The reference tokens come from transformers.js itself (web/generate.mjs, the pinned package in
web/package-lock.json) and must equal our runtime's greedy tokens. Skipped only without node/npm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from parscale.config import ParScaleConfig
from parscale.exporter.files.web import TRANSFORMERS_JS_CONFIG, TRANSFORMERS_JS_VERSION
from parscale.manifest import Manifest

WEB = Path(__file__).resolve().parents[1] / "web"
PACKAGE = WEB / "node_modules" / "@huggingface" / "transformers" / "package.json"


def _installed_version() -> str | None:
    return json.loads(PACKAGE.read_text())["version"] if PACKAGE.is_file() else None


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with web/'s pinned packages installed (`npm ci`, as `make web` does)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the transformers.js test (not found on PATH)")
    if _installed_version() != TRANSFORMERS_JS_VERSION:
        # onnxruntime-node's install script would download CUDA binaries from outside the npm
        # registry; its CPU binaries are in the package, and CPU is all the test uses.
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=WEB, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"npm ci failed in {WEB}:\n{done.stderr[-3000:]}"
    assert _installed_version() == TRANSFORMERS_JS_VERSION, "web/package.json and the test disagree"
    return node


@pytest.fixture(scope="module")
def p2_export(tiny) -> Path:
    """A tiny P=2 export with the tokenizer files a published checkpoint has (for the card's snippet)."""
    return tiny.export(tiny.checkpoint(P=2, prefix=4, seed=3, tokenizer_config=True), P=2, validate=False)


def run_node(node: str, folder: Path, prompts: list[list[int]], n: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([node, str(WEB / "generate.mjs"), str(folder), json.dumps(prompts), str(n), *extra],
                          cwd=WEB, capture_output=True, text=True, timeout=300)


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """Tokens up to and including the first EOS: after it the two runtimes pad differently."""
    return next((tokens[: i + 1] for i, t in enumerate(tokens) if t in eos), tokens)


def test_export_has_transformers_js_config(p2_export):
    cfg = ParScaleConfig.load(p2_export)
    web = json.loads((p2_export / TRANSFORMERS_JS_CONFIG).read_text())
    assert web["model_type"] == "qwen2"
    assert web["num_key_value_heads"] == cfg.cache_heads == 2 * cfg.num_key_value_heads
    assert web["num_attention_heads"] == 2 * cfg.num_attention_heads
    assert web["head_dim"] == cfg.head_dim and web["num_hidden_layers"] == cfg.num_hidden_layers
    files = Manifest.read(p2_export).files
    assert TRANSFORMERS_JS_CONFIG in files and "README.md" in files
    assert "model.ort" not in files  # ORT format only with --ort-format: it doubles the folder's size
    # The source config stays as it was: our runtime and tools read it.
    assert json.loads((p2_export / "config.json").read_text())["model_type"] == "qwen2_parscale"


def test_transformers_js_generates_our_greedy_tokens(node, p2_export):
    from parscale.runtime import Model

    prompts, n = [[5, 17, 42, 99, 7, 300], [11, 23]], 12  # a left-padded batch of two
    done = run_node(node, p2_export, prompts, n)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = json.loads(done.stdout.strip().splitlines()[-1])
    assert reference["transformers_js"] == TRANSFORMERS_JS_VERSION
    model = Model.load(p2_export, provider="cpu")
    ours = [r.generated_ids for r in model.generate(prompts, max_new_tokens=n, greedy=True)]
    eos = set(model.eos_ids)
    for theirs, mine in zip(reference["tokens"], ours, strict=True):
        assert until_eos(theirs, eos) == until_eos(mine, eos)
    assert any(len(until_eos(t, eos)) > 1 for t in ours), "too short to compare: every row ended at once"


def test_transformers_js_cannot_read_the_source_config(node, p2_export):
    """Why the extra file exists: without it transformers.js refuses the model type (README)."""
    done = run_node(node, p2_export, [[5, 6]], 2, "--source-config")
    assert done.returncode != 0
    assert "Unsupported model type: qwen2_parscale" in done.stderr


def test_transformers_js_reads_external_data(node, p2_export, tmp_path):
    """Large exports keep their weights in model.onnx.data; on Node, ONNX Runtime finds them."""
    import onnx

    from parscale.manifest import EXTERNAL_DATA

    copy = tmp_path / "external"
    copy.mkdir()
    for path in p2_export.glob("*.json"):
        shutil.copyfile(path, copy / path.name)
    proto = onnx.load(p2_export / "model.onnx")
    onnx.save_model(proto, copy / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA, size_threshold=1024)  # as export.py
    assert (copy / EXTERNAL_DATA).stat().st_size > (copy / "model.onnx").stat().st_size
    prompts = [[5, 17, 42, 99, 7, 300]]
    done, reference = run_node(node, copy, prompts, 6), run_node(node, p2_export, prompts, 6)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["tokens"] == json.loads(reference.stdout.splitlines()[-1])["tokens"]


def run_card_js(node: str, folder: Path, scratch: Path) -> str:
    """The card's transformers.js program, pasted into a file beside `node_modules` and run; its stdout."""
    import re

    card = (folder / "README.md").read_text()
    (snippet,) = re.findall(r"^```js\n(.*?)^```$", card, re.S | re.M)
    script = scratch / "snippet.mjs"
    script.write_text(snippet)
    (scratch / "node_modules").symlink_to(WEB / "node_modules")  # what `npm install` beside it gives
    done = subprocess.run([node, str(script)], cwd=folder.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_card_js_snippet_runs_as_written(node, p2_export, tmp_path):
    """The model card's transformers.js program (tokenizer included), pasted into a file and run."""
    out = run_card_js(node, p2_export, tmp_path)
    assert out.startswith("def fibonacci(n):")  # the prompt, then the (random) continuation


def test_card_js_snippet_without_a_tokenizer_runs_as_written(node, p2_export, tmp_path):
    """Without tokenizer files the card's program feeds token ids, and gets our greedy tokens."""
    from runtime_helpers import without_tokenizer

    from parscale.exporter.files.card import NEW_TOKENS, PROMPT_IDS
    from parscale.runtime import Model

    bare = without_tokenizer(p2_export, tmp_path / "bare")
    theirs = json.loads(run_card_js(node, bare, tmp_path).strip().splitlines()[-1])
    model = Model.load(bare, provider="cpu")
    ours = model.generate(prompt_ids=PROMPT_IDS, max_new_tokens=NEW_TOKENS, greedy=True).generated_ids
    eos = set(model.eos_ids)
    assert until_eos(theirs, eos) == until_eos(ours, eos)
