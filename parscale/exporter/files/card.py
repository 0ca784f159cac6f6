"""The model card: a README.md in every export folder, generated from the manifest.

It says what the model is (P, prefix, sizes, dtype, quantization and its measured fidelity) and how
to run it: `parscale.runtime` (and `parscale serve`), onnxruntime-genai (Python; a pointer to its other languages),
transformers.js, ONNX Runtime Mobile, and plain ONNX Runtime through the graph contract. The text
and the code snippets are templates in `card_templates/` (templates.py). Every snippet the card
shows is run by a test as written (tests/test_card.py, tests/test_web.py), from the folder that
holds the export, so the snippets name the export folder by its final name and use a text prompt
only where the folder has the tokenizer files the runtime in question reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from parscale import contract
from parscale.exporter.files.mobile import ORT_MODEL, ORT_OPERATORS
from parscale.exporter.files.templates import fill
from parscale.exporter.files.web import TRANSFORMERS_JS_CONFIG, TRANSFORMERS_JS_VERSION, node_snippet
from parscale.manifest import MANIFEST, MODEL_FILE, Manifest

CARD = "README.md"
PROMPT = "def fibonacci(n):"
PROMPT_IDS = [1, 2, 3]  # used where the folder has no tokenizer for that runtime
NEW_TOKENS = 32

FILE_ROLES = {
    MODEL_FILE: "the ONNX graph (graph contract below)",
    MODEL_FILE + ".data": "the graph's weights (external data, loaded with model.onnx)",
    "genai_config.json": "onnxruntime-genai configuration",
    "config.json": "the source checkpoint's configuration",
    "generation_config.json": "the source checkpoint's generation defaults (EOS ids)",
    "tokenizer.json": "tokenizer (Hugging Face tokenizers format)",
    "tokenizer_config.json": "tokenizer settings",
    TRANSFORMERS_JS_CONFIG: "the export as transformers.js sees it (a Qwen2 decoder with P times the KV heads)",
    ORT_MODEL: "the graph in ORT format, for ONNX Runtime Mobile and minimal builds",
    ORT_OPERATORS: "operators the ORT model uses, for a reduced ONNX Runtime build",
    MANIFEST: "parscale's manifest: metadata, I/O names, size and sha256 of every file",
    CARD: "this model card",
}


def write_card(folder: Path, manifest: Manifest, name: str) -> str:
    """Write README.md into the export folder being built (named `name` once in place)."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != CARD}
    (folder / CARD).write_text(model_card(manifest, name, files))
    return CARD


def model_card(manifest: Manifest, name: str, files: dict[str, int]) -> str:
    """The card's Markdown. `files`: name -> bytes of the folder's other files."""
    parts = [
        _summary(manifest, name), _streams(manifest, name, files), _files(files),
        _python(name, files, manifest.streams), _genai(name, files, manifest.model.prefix_tokens), _web(name, files),
        _mobile(manifest, name, files), _plain(manifest, name),
    ]
    return "\n".join(p for p in parts if p)


def _summary(m: Manifest, name: str) -> str:
    info = m.model
    others = [p for p in m.streams if p != info.P]
    rows = [
        ("parallel streams P", f"{info.P} (the default; also {', '.join(map(str, others))})" if others else info.P),
        ("prefix tokens per stream", info.prefix_tokens),
        ("layers", info.num_hidden_layers),
        ("hidden size", info.hidden_size),
        ("attention heads / KV heads", f"{info.num_attention_heads} / {info.num_key_value_heads}"),
        ("KV-cache heads (P × KV heads)", info.cache_heads),
        ("head dim", info.head_dim),
        ("vocabulary", info.vocab_size),
        ("context length", info.max_position_embeddings),
        ("tied embeddings", info.tie_word_embeddings),
        ("dtype", m.dtype),
        ("ONNX opset", m.opset),
        ("quantization", _quantization(m.quantization)),
    ]
    v = m.validation
    if v:
        rows.append(("validation against PyTorch", f"max logit difference {v['max_abs_logit_diff']:.2e} over "
                     f"prefill and {v['decode_steps']} cached decode steps; greedy tokens match: {v['greedy_match']}"))
        if v.get("fidelity"):
            rows.append(("quantized vs float graph", _fidelity(v["fidelity"])))
    rows += [("source", f"{m.source['name']} (sha256 {m.source['sha256'][:16]}…)"),
             ("exported by", f"parscale {m.tool['version']}")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return fill("summary.md", name=name, P=", ".join(map(str, m.streams)), table=table)


def _streams(m: Manifest, name: str, files: dict[str, int]) -> str:
    """How to pick P in a multi-P export ("" for a single-P one)."""
    streams = m.streams
    if len(streams) < 2:
        return ""
    text = "tokenizer.json" in files
    return fill("streams.md", name=name, streams=", ".join(map(str, streams)), streams_csv=",".join(map(str, streams)),
                default=m.model.P, kv_heads=m.model.num_key_value_heads, first=streams[0], new_tokens=NEW_TOKENS,
                prompt=f'"{PROMPT}"' if text else f"prompt_ids={PROMPT_IDS}",
                field="text" if text else "generated_ids")


def _quantization(q: dict[str, Any] | None) -> str:
    if not q:
        return "none (float weights)"
    s = q["scheme"]
    # Older manifests have no method (they were round-to-nearest) and no calibration source.
    method = {"gptq": "GPTQ", "rtn": "round-to-nearest"}.get(s.get("method", "rtn"), s.get("method"))
    calibrated = f"; calibration: {q['calibration']}" if q.get("calibration") else ""
    return (f"int{s['bits']} weight-only ({method}{calibrated}), block {s['block_size']}, "
            f"{'symmetric' if s['symmetric'] else 'asymmetric'} (embeddings int{s['embedding_bits']}); "
            f"{q['bits_per_weight']['model']:.2f} bits per weight over the model; kept in float: {q['kept_float']}")


def _fidelity(f: dict[str, Any]) -> str:
    ppl = ""
    if f.get("perplexity_a") is not None:
        ppl = f", perplexity {f['perplexity_a']:.3f} → {f['perplexity_b']:.3f}"
    return (f"top-1 agreement {100 * f['top1_agreement']:.2f}%, mean KL {f['mean_kl']:.2e} nats{ppl} "
            f"({f['positions']} positions of {f['source']})")


def _files(files: dict[str, int]) -> str:
    rows = "\n".join(f"| `{n}` | {_size(b)} | {_role(n)} |" for n, b in files.items())
    return fill("files.md", rows=rows, card=CARD, card_role=FILE_ROLES[CARD])


def _role(name: str) -> str:
    if name.startswith("genai_overlay.p"):
        return f"onnxruntime-genai: what genai_config.json changes for P={name.split('.p')[1].split('.')[0]}"
    return FILE_ROLES.get(name, "")


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} kB" if n >= 1e3 else f"{n} B"


def _has_tokenizer(files: dict[str, int]) -> bool:
    """Whether onnxruntime-genai's and transformers.js's tokenizers can load: they read both files."""
    return "tokenizer.json" in files and "tokenizer_config.json" in files


def _python(name: str, files: dict[str, int], streams: list[int]) -> str:
    if "tokenizer.json" in files:
        call = f'result = model.generate("{PROMPT}", max_new_tokens={NEW_TOKENS})\nprint(result.text)'
    else:
        call = (f"result = model.generate(prompt_ids={PROMPT_IDS}, max_new_tokens={NEW_TOKENS})\n"
                "print(result.generated_ids)")
    prompt = f'--prompt "{PROMPT}"' if "tokenizer.json" in files else f"--prompt-ids {','.join(map(str, PROMPT_IDS))}"
    models = "" if len(streams) < 2 else (" (its default P) or " + ", ".join(f"`{name}:p{P}`" for P in streams)
                                         + " for one P")
    return fill("runtime.md", name=name, call=call, prompt=prompt, new_tokens=NEW_TOKENS, models=models)


def _genai(name: str, files: dict[str, int], prefix_rows: int) -> str:
    if _has_tokenizer(files):
        encode = f'tokenizer = og.Tokenizer(model)\nprompt = tokenizer.encode("{PROMPT}")'
        decode = "print(tokenizer.decode(generator.get_sequence(0)[len(prompt):]))"
        note = ""
    else:
        encode, decode = f"prompt = {PROMPT_IDS}", "print(generator.get_sequence(0)[len(prompt):].tolist())"
        note = ("\nThis folder lacks the tokenizer files (`tokenizer.json`, `tokenizer_config.json`) that\n"
                "onnxruntime-genai's tokenizer reads, so append token ids as above.")
    return fill("genai.md", name=name, encode=encode, decode=decode, new_tokens=NEW_TOKENS, prefix_rows=prefix_rows,
                tokenizer_note=note)


def _web(name: str, files: dict[str, int]) -> str:
    if TRANSFORMERS_JS_CONFIG not in files:
        return ""
    return fill("web.md", version=TRANSFORMERS_JS_VERSION, config=TRANSFORMERS_JS_CONFIG,
                snippet=node_snippet(name, PROMPT if _has_tokenizer(files) else PROMPT_IDS, NEW_TOKENS).rstrip())


def _mobile(m: Manifest, name: str, files: dict[str, int]) -> str:
    if ORT_MODEL not in files:
        return ""
    return fill("mobile.md", name=name, ort_model=ORT_MODEL, model_file=MODEL_FILE, operators=ORT_OPERATORS,
                loop=_greedy_loop(m, name, ORT_MODEL))


def _plain(m: Manifest, name: str) -> str:
    info = m.model
    return fill(
        "plain.md", layers=info.num_hidden_layers, heads=info.cache_heads, head_dim=info.head_dim,
        vocab=info.vocab_size, float_type="float16" if m.dtype == "fp16" else "float32",
        input_ids=contract.INPUT_IDS, attention_mask=contract.ATTENTION_MASK, position_ids=contract.POSITION_IDS,
        num_logits_to_keep=contract.NUM_LOGITS_TO_KEEP, logits=contract.LOGITS, kept_logits=contract.KEPT_LOGITS,
        loop=_greedy_loop(m, name, MODEL_FILE),
    )


def _greedy_loop(m: Manifest, name: str, graph: str) -> str:
    """Greedy decoding over the graph contract with nothing but onnxruntime and numpy."""
    info = m.model
    return fill("greedy_loop.py.txt", name=name, graph=graph, layers=info.num_hidden_layers,
                heads=info.cache_heads, head_dim=info.head_dim, prompt_ids=PROMPT_IDS,
                new_tokens=NEW_TOKENS, dtype="np.float16" if m.dtype == "fp16" else "np.float32").rstrip()
