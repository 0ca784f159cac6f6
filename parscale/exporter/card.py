"""The model card: a README.md in every export folder, generated from the manifest.

It says what the model is (P, prefix, sizes, dtype, quantization and its measured fidelity) and how
to run it: `parscale.runtime`, onnxruntime-genai (Python, C, C#, Java), transformers.js, ONNX Runtime
Mobile, and plain ONNX Runtime through the graph contract. The Python code blocks are meant to run
as written from the folder that holds the export (tests/test_card.py executes them), so they name
the export folder by its final name and use a text prompt only where the folder has the tokenizer
files the runtime in question reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from parscale import contract
from parscale.exporter.mobile import ORT_MODEL, ORT_OPERATORS
from parscale.exporter.web import TRANSFORMERS_JS_CONFIG, TRANSFORMERS_JS_VERSION, node_snippet
from parscale.manifest import MANIFEST, MODEL_FILE

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


def write_card(folder: Path, manifest: dict[str, Any], name: str) -> str:
    """Write README.md into the export folder being built (named `name` once in place)."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != CARD}
    (folder / CARD).write_text(model_card(manifest, name, files))
    return CARD


def model_card(manifest: dict[str, Any], name: str, files: dict[str, int]) -> str:
    """The card's Markdown. `files`: name -> bytes of the folder's other files."""
    parts = [
        _summary(manifest, name), _files(files), _python(name, files), _genai(manifest, name, files),
        _web(name, files), _mobile(name, files), _plain(manifest, name),
    ]
    return "\n".join(p for p in parts if p)


def _summary(m: dict[str, Any], name: str) -> str:
    info, q = m["model"], m.get("quantization")
    rows = [
        ("parallel streams P", info["P"]),
        ("prefix tokens per stream", info["prefix_tokens"]),
        ("layers", info["num_hidden_layers"]),
        ("hidden size", info["hidden_size"]),
        ("attention heads / KV heads", f"{info['num_attention_heads']} / {info['num_key_value_heads']}"),
        ("KV-cache heads (P × KV heads)", info["cache_heads"]),
        ("head dim", info["head_dim"]),
        ("vocabulary", info["vocab_size"]),
        ("context length", info["max_position_embeddings"]),
        ("tied embeddings", info["tie_word_embeddings"]),
        ("dtype", m["dtype"]),
        ("ONNX opset", m["opset"]),
        ("quantization", _quantization(q)),
    ]
    v = m.get("validation")
    if v:
        rows.append(("validation against PyTorch", f"max logit difference {v['max_abs_logit_diff']:.2e} over "
                     f"prefill and {v['decode_steps']} cached decode steps; greedy tokens match: {v['greedy_match']}"))
        if v.get("fidelity"):
            rows.append(("quantized vs float graph", _fidelity(v["fidelity"])))
    rows += [("source", f"{m['source']['name']} (sha256 {m['source']['sha256'][:16]}…)"),
             ("exported by", f"parscale {m['tool']['version']}")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""\
# {name}: ParScale P={info['P']}, ONNX

A [ParScale](https://arxiv.org/abs/2505.10475) (parallel scaling) language model exported to ONNX by
parscale. ParScale runs P parallel streams of one Qwen2 decoder over the same input, each stream
with its own learned prefix keys/values in every layer, and mixes the P final hidden states with a
small MLP before the LM head. In this graph the streams, prefixes and mixing are built in: to a
runtime it is a plain decoder whose KV cache has P times the KV heads.

| | |
|---|---|
{table}
"""


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
    rows = "\n".join(f"| `{n}` | {_size(b)} | {FILE_ROLES.get(n, '')} |" for n, b in files.items())
    return f"""\
## Files

| file | size | what |
|---|---|---|
{rows}
| `{CARD}` | | {FILE_ROLES[CARD]} |
"""


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} kB" if n >= 1e3 else f"{n} B"


def _python(name: str, files: dict[str, int]) -> str:
    if "tokenizer.json" in files:
        call = f'result = model.generate("{PROMPT}", max_new_tokens={NEW_TOKENS})\nprint(result.text)'
    else:
        call = (f"result = model.generate(prompt_ids={PROMPT_IDS}, max_new_tokens={NEW_TOKENS})\n"
                "print(result.generated_ids)")
    return f"""\
## Run it from Python: parscale.runtime

With parscale installed (at run time it needs only numpy, onnxruntime and tokenizers), from the
folder that holds `{name}/`:

```python
from parscale.runtime import Model

model = Model.load("{name}")  # provider="cuda" with onnxruntime-gpu
{call}
```

Or from the shell: `parscale generate {name} --prompt "{PROMPT}" --max-new-tokens {NEW_TOKENS}`.
"""


def _genai(m: dict[str, Any], name: str, files: dict[str, int]) -> str:
    text = "tokenizer.json" in files and "tokenizer_config.json" in files  # both: genai's tokenizer reads both
    n = NEW_TOKENS
    if text:
        py_in = (f'tokenizer = og.Tokenizer(model)\nprompt = tokenizer.encode("{PROMPT}")')
        py_out = "print(tokenizer.decode(generator.get_sequence(0)[len(prompt):]))"
    else:
        py_in, py_out = f"prompt = {PROMPT_IDS}", "print(list(generator.get_sequence(0)[len(prompt):]))"
    return f"""\
## Run it with onnxruntime-genai

The folder is an onnxruntime-genai model as it stands (`genai_config.json`); greedy search gives the
same tokens as `parscale.runtime`. Python (`pip install onnxruntime-genai`):

```python
import onnxruntime_genai as og

model = og.Model("{name}")
{py_in}
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(prompt) + {n}, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(prompt)
while not generator.is_done():
    generator.generate_next_token()
{py_out}
```

C (`ort_genai_c.h`; check each `OgaResult*` for errors in real code):

```c
OgaModel* model;          OgaCreateModel("{name}", &model);
OgaTokenizer* tokenizer;  OgaCreateTokenizer(model, &tokenizer);
OgaTokenizerStream* stream; OgaCreateTokenizerStream(tokenizer, &stream);
OgaSequences* prompt;     OgaCreateSequences(&prompt);
OgaTokenizerEncode(tokenizer, "{PROMPT}", prompt);
OgaGeneratorParams* params; OgaCreateGeneratorParams(model, &params);
OgaGeneratorParamsSetSearchNumber(params, "max_length", OgaSequencesGetSequenceCount(prompt, 0) + {n});
OgaGenerator* generator;  OgaCreateGenerator(model, params, &generator);
OgaGenerator_AppendTokenSequences(generator, prompt);
while (!OgaGenerator_IsDone(generator)) {{
  OgaGenerator_GenerateNextToken(generator);
  size_t count = OgaGenerator_GetSequenceCount(generator, 0);
  const char* piece;
  OgaTokenizerStreamDecode(stream, OgaGenerator_GetSequenceData(generator, 0)[count - 1], &piece);
  fputs(piece, stdout);
}}
OgaDestroyGenerator(generator); OgaDestroyGeneratorParams(params); OgaDestroySequences(prompt);
OgaDestroyTokenizerStream(stream); OgaDestroyTokenizer(tokenizer); OgaDestroyModel(model);
```

C# (NuGet `Microsoft.ML.OnnxRuntimeGenAI`):

```csharp
using Microsoft.ML.OnnxRuntimeGenAI;

using var model = new Model("{name}");
using var tokenizer = new Tokenizer(model);
using var stream = tokenizer.CreateStream();
using var prompt = tokenizer.Encode("{PROMPT}");
using var generatorParams = new GeneratorParams(model);
generatorParams.SetSearchOption("max_length", prompt[0].Length + {n});
using var generator = new Generator(model, generatorParams);
generator.AppendTokenSequences(prompt);
while (!generator.IsDone())
{{
    generator.GenerateNextToken();
    Console.Write(stream.Decode(generator.GetSequence(0)[^1]));
}}
```

Java (Maven `com.microsoft.onnxruntime:onnxruntime-genai`):

```java
import ai.onnxruntime.genai.*;

try (Model model = new Model("{name}");
     Tokenizer tokenizer = new Tokenizer(model);
     TokenizerStream stream = tokenizer.createStream();
     Sequences prompt = tokenizer.encode("{PROMPT}");
     GeneratorParams params = new GeneratorParams(model)) {{
    params.setSearchOption("max_length", prompt.getSequence(0).length + {n});
    try (Generator generator = new Generator(model, params)) {{
        generator.appendTokenSequences(prompt);
        while (!generator.isDone()) {{
            generator.generateNextToken();
            System.out.print(stream.decode(generator.getLastTokenInSequence(0)));
        }}
    }}
}}
```

The C, C# and Java snippets need the tokenizer files (`tokenizer.json`, `tokenizer_config.json`);
{'this folder has them.' if text else 'this folder lacks them, so append token ids instead of an encoded prompt.'}
"""


def _web(name: str, files: dict[str, int]) -> str:
    if TRANSFORMERS_JS_CONFIG not in files:
        return ""
    return f"""\
## Run it with transformers.js (Node or the browser)

transformers.js (`npm install @huggingface/transformers`, checked with {TRANSFORMERS_JS_VERSION} on Node)
does not know the `qwen2_parscale` model type in `config.json`; pass `{TRANSFORMERS_JS_CONFIG}`
as the config instead, and `subfolder: ''` because `model.onnx` is at the top of the folder:

```js
{node_snippet(name).rstrip()}
```

In a browser, fetch the JSON from where the folder is served and call `from_pretrained` the same
way. Weights stored as external data (`model.onnx.data`) are found by ONNX Runtime on Node; a
browser must be given them through `session_options.externalData`.
"""


def _mobile(name: str, files: dict[str, int]) -> str:
    if ORT_MODEL not in files:
        return ""
    return f"""\
## Run it on a phone: ONNX Runtime Mobile

`{ORT_MODEL}` is the graph in ONNX Runtime's flatbuffer format (converted and optimized by
`onnxruntime.tools.convert_onnx_models_to_ort`); any ONNX Runtime loads it like `model.onnx`,
including the prebuilt `onnxruntime-android` / `onnxruntime-c` (iOS) packages. To ship a smaller
runtime that contains only the kernels this model uses, build ONNX Runtime from source with

```sh
# in a checkout of onnxruntime (docs: onnxruntime.ai/docs/build/custom.html)
./build.sh --config MinSizeRel --build_shared_lib --skip_tests \\
  --minimal_build --include_ops_by_config {name}/{ORT_OPERATORS} \\
  --android --android_sdk_path "$ANDROID_HOME" --android_ndk_path "$ANDROID_NDK_HOME" \\
  --android_abi arm64-v8a --android_api 29
# iOS: replace the --android* flags by --ios --use_xcode --apple_sysroot iphoneos --osx_arch arm64
```

Keep contrib operators enabled (no `--disable_contrib_ops`) when the list names `com.microsoft`
operators.

A minimal build reads only `{ORT_MODEL}`, not `{MODEL_FILE}`. Drive it with the loop below.
"""


def _plain(m: dict[str, Any], name: str) -> str:
    info = m["model"]
    n, heads, hd, vocab = info["num_hidden_layers"], info["cache_heads"], info["head_dim"], info["vocab_size"]
    dtype = "np.float16" if m["dtype"] == "fp16" else "np.float32"
    float_type = "float16" if m["dtype"] == "fp16" else "float32"
    return f"""\
## Run it with plain ONNX Runtime, in any language

The graph follows parscale's contract: a standard decoder with a KV cache, whatever the language.
Here L = {n} layers, {heads} cache heads (P × KV heads), head_dim = {hd}, vocab = {vocab}.

| name | dtype | shape |
|---|---|---|
| input `{contract.INPUT_IDS}` | int64 | `[batch, seq]` |
| input `{contract.ATTENTION_MASK}` | int64 | `[batch, past+seq]`: 1 for real tokens, 0 for padding |
| input `{contract.POSITION_IDS}` | int64 | `[batch, seq]`: counts real tokens only |
| input `past_key_values.{{i}}.key` / `.value` | {float_type} | `[batch, {heads}, past, {hd}]`; past = 0 at first |
| input `{contract.NUM_LOGITS_TO_KEEP}` (optional) | int64 | scalar: 0 = logits for every position, k = the last k |
| output `{contract.LOGITS}` | float32 | `[batch, seq or k, {vocab}]` |
| output `present.{{i}}.key` / `.value` | {float_type} | `[batch, {heads}, past+seq, {hd}]`: the next step's past |

Greedy decoding in Python with numpy; the same loop works with ONNX Runtime's C, C++, C#, Java,
JavaScript or Objective-C API:

```python
import numpy as np
import onnxruntime as ort

session = ort.InferenceSession("{name}/{MODEL_FILE}")
layers, cache_heads, head_dim = {n}, {heads}, {hd}
tokens = {PROMPT_IDS}  # the prompt's token ids
past = {{f"past_key_values.{{i}}.{{kv}}": np.zeros((1, cache_heads, 0, head_dim), {dtype})
        for i in range(layers) for kv in ("key", "value")}}
step = tokens[:]  # the first step feeds the whole prompt, later steps one token
for _ in range({NEW_TOKENS}):
    logits, *present = session.run(None, {{
        "input_ids": np.array([step], np.int64),
        "attention_mask": np.ones((1, len(tokens)), np.int64),
        "position_ids": np.arange(len(tokens) - len(step), len(tokens), dtype=np.int64)[None],
        "num_logits_to_keep": np.array(1, np.int64),  # only the last position's logits
        **past,
    }})
    past = dict(zip(past, present))  # present.i.key/value come in the order of past_key_values.i.key/value
    step = [int(logits[0, -1].argmax())]
    tokens += step  # stop at an EOS id from generation_config.json in real use
print(tokens)
```
"""
