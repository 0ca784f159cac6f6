"""transformers.js support: the one extra file with which `@huggingface/transformers` runs an export.

transformers.js cannot run a ParScale export folder as it stands (checked with 4.3.2 on Node):

- it reads `config.json` and refuses `model_type` "qwen2_parscale" ("Unsupported model type");
- it derives the cache names from that config (`num_hidden_layers`), so it must see a plain decoder;
- it looks for the graph at `onnx/model.onnx`, while ours is `model.onnx` at the root;
- it builds the empty first-step cache from the graph's input shapes, resolving only the symbolic
  axis `batch_size` (any other name becomes 0). `parscale.contract` names the batch axis that way.

We keep the source `config.json` untouched (our runtime and tools read it) and write beside it
`transformers_js_config.json`: the same model seen as a plain Qwen2 decoder with P times the heads,
which is exactly what the graph contract promises. A caller passes it as `config` together with
`subfolder: ''` (see `node_snippet`); `web/generate.mjs` in the repository does so in the tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parscale.config import ParScaleConfig
from parscale.exporter.files.templates import fill

TRANSFORMERS_JS_CONFIG = "transformers_js_config.json"
# The npm package and version the tests and the model card were checked with (web/package.json).
TRANSFORMERS_JS_VERSION = "4.3.2"


def transformers_js_config(cfg: ParScaleConfig, eos: list[int]) -> dict[str, Any]:
    """The export as transformers.js should see it: a Qwen2 decoder whose cache has P*Hkv heads."""
    in_vocab = [e for e in eos if 0 <= e < cfg.vocab_size]
    return {
        # A plain decoder to transformers.js: the P streams and the aggregation live inside the graph,
        # and the cache is a standard one with P*Hkv heads whose first rows the graph fills with the
        # prefix on the first step (contract.py); transformers.js grows it step by step.
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.P * cfg.num_attention_heads,
        "num_key_value_heads": cfg.cache_heads,
        "head_dim": cfg.head_dim,  # explicit: P*H*head_dim is not hidden_size
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": in_vocab if len(in_vocab) != 1 else in_vocab[0],
        "tie_word_embeddings": cfg.tie_word_embeddings,
        # transformers.js picks the file by dtype (q8 -> model_quantized.onnx by default on wasm);
        # an export has one graph, model.onnx, whatever its weights' precision.
        "transformers.js_config": {"dtype": "fp32"},
        "parscale": {
            "P": cfg.P, "prefix_tokens": cfg.n_prefix, "source_model_type": cfg.model_type,
            "note": "load with {config: <this file>, subfolder: ''}; the source config is config.json",
        },
    }


def write_web_files(cfg: ParScaleConfig, eos: list[int], out: Path) -> list[str]:
    """Write the transformers.js config into the export folder being built; returns the names written."""
    (out / TRANSFORMERS_JS_CONFIG).write_text(json.dumps(transformers_js_config(cfg, eos), indent=2) + "\n")
    return [TRANSFORMERS_JS_CONFIG]


def node_snippet(folder: str = "./my-export", prompt: str | list[int] = "def fibonacci(n):",
                 new_tokens: int = 32) -> str:
    """A Node (ES module) program that generates greedily from an export folder with transformers.js.

    A text `prompt` goes through the folder's tokenizer (tokenizer.json and tokenizer_config.json,
    which transformers.js reads); token ids need neither, and the program prints the new ids.
    """
    if isinstance(prompt, str):
        return fill("transformers_js_text.mjs.txt", folder=folder, config=TRANSFORMERS_JS_CONFIG, prompt=prompt,
                    new_tokens=new_tokens)
    return fill("transformers_js_ids.mjs.txt", folder=folder, config=TRANSFORMERS_JS_CONFIG,
                prompt_ids=json.dumps(prompt), new_tokens=new_tokens)
