"""The runtime through the CLI, without torch, and against onnxruntime-genai."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
from runtime_helpers import BLOCK_TORCH, run_cli, torch_greedy

from parscale.modeling.checkpoint import load_model
from parscale.runtime import Model


def test_generate_json(tiny_exports):
    export = tiny_exports[4][1]
    r = run_cli("generate", str(export), "--prompt-ids", "5,17,300", "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    expected = Model.load(export).generate(prompt_ids=[5, 17, 300], max_new_tokens=6)
    assert data["generated_ids"] == expected.generated_ids
    assert data["text"] == expected.text
    assert data["finish_reason"] == expected.finish_reason
    assert {"time_to_first_token_s", "prefill_tokens_per_s", "decode_ms_per_token"} <= set(data["timings"])


def test_generate_streams_text_and_sampling_options(tiny_exports):
    export = tiny_exports[1][1]
    args = ("generate", str(export), "--prompt", "def f(x):", "--max-new-tokens", "10", "--temperature", "0.8",
            "--top-k", "40", "--top-p", "0.9", "--repetition-penalty", "1.1", "--seed", "3")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    expected = Model.load(export).generate("def f(x):", max_new_tokens=10, temperature=0.8, top_k=40, top_p=0.9,
                                           repetition_penalty=1.1, seed=3)
    assert r.stdout == expected.text + "\n"
    assert "finish" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-ids", "1,2,999"], "outside the vocabulary"),
        (["--prompt-ids", "1,x"], "comma-separated"),
        ([], "exactly one of --prompt and --prompt-ids"),
        (["--prompt", "hi", "--greedy", "--temperature", "0.7"], "greedy"),
        (["--prompt", "hi", "--provider", "tpu"], "auto, cpu or cuda"),
    ],
)
def test_generate_errors_are_one_line(tiny_exports, args, message):
    r = run_cli("generate", str(tiny_exports[4][1]), *args)
    assert r.returncode == 1
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_generate_refuses_a_non_export(tmp_path):
    r = run_cli("generate", str(tmp_path), "--prompt-ids", "1")
    assert r.returncode == 1 and "not a parscale export" in r.stderr


def test_inspect_and_bench(tiny_exports):
    export = tiny_exports[4][1]
    r = run_cli("inspect", str(export))
    assert r.returncode == 0, r.stderr
    assert "P=4" in r.stdout and "past_key_values.0.key" in r.stdout
    r = run_cli("bench", str(export), "--prompt-len", "8", "--gen", "4", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["P"] == 4 and data["gen"] == 4 and data["decode_ms_per_token"] > 0


def test_bench_batch(tiny_exports):
    export = tiny_exports[1][1]
    runs = {}
    for b in (1, 2):
        r = run_cli("bench", str(export), "--prompt-len", "8", "--gen", "3", "--threads", "1", "--batch", str(b),
                    "--json")
        assert r.returncode == 0, r.stderr
        runs[b] = json.loads(r.stdout)
    assert runs[1]["batch"] == 1 and runs[2]["batch"] == 2
    assert runs[2]["kv_cache_mb"] == 2 * runs[1]["kv_cache_mb"]
    assert runs[2]["decode_ms_per_token"] > 0 and runs[2]["prefill_tokens_per_s"] > 0


def test_runtime_works_without_torch(tiny_exports):
    """parscale.runtime and the CLI's runtime commands import and generate with torch unavailable."""
    export = tiny_exports[4][1]
    code = BLOCK_TORCH + textwrap.dedent(f"""
        from parscale.runtime import Model
        m = Model.load({str(export)!r})
        r = m.generate("def f", max_new_tokens=5, ignore_eos=True)
        assert len(r.generated_ids) == 5
        assert "".join(m.stream("def f", max_new_tokens=5, ignore_eos=True)) == r.text
        import parscale.cli
        banned = [n for n in sys.modules if n.split(".")[0] in BLOCKED]
        assert not banned, banned
        print("ok", r.generated_ids)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")
    r = run_cli("generate", str(export), "--prompt", "def f", "--max-new-tokens", "3", "--json", prelude=BLOCK_TORCH)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["generated_ids"]) <= 3


@pytest.mark.parametrize("P", [1, 4])
def test_onnxruntime_genai_gives_the_same_greedy_tokens(tiny_exports, P):  # noqa: N803
    """A third-party runtime drives the export unchanged and picks our runtime's and PyTorch's greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    ckpt, export = tiny_exports[P]
    prompt, n = [5, 17, 300, 42, 7], 10
    ours = Model.load(export).generate(prompt_ids=prompt, max_new_tokens=n)
    model = og.Model(str(export))
    params = og.GeneratorParams(model)
    # genai's shared KV buffer (max_length rows) also holds the prefix rows (folder.genai_config).
    prefix = json.loads((export / "config.json").read_text()).get("parscale_n_tokens", 0) if P > 1 else 0
    params.set_search_options(do_sample=False, max_length=len(prompt) + n + prefix)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done() and len(gen.get_sequence(0)) < len(prompt) + n:
        gen.generate_next_token()
    theirs = list(gen.get_sequence(0))[len(prompt):]
    assert theirs == ours.generated_ids
    reference = torch_greedy(load_model(ckpt)[1], [prompt], n)[0]
    assert ours.generated_ids == reference[:len(ours.generated_ids)]  # both stop at an EOS; torch does not


def test_onnxruntime_genai_runs_the_lm_head_on_the_last_prompt_position_only(tiny_exports):
    """genai reads our `logits` output's static length 1 and takes its trimmed-prefill path: the prompt's
    logits come back as (1, 1, vocab), not one row per prompt token (genai's own log says which)."""
    pytest.importorskip("onnxruntime_genai")
    script = (
        "import sys, onnxruntime_genai as og\n"
        "og.set_log_options(enabled=True, model_output_shapes=True)\n"
        "m = og.Model(sys.argv[1]); p = og.GeneratorParams(m); p.set_search_options(max_length=40)\n"
        "g = og.Generator(m, p); g.append_tokens([5, 17, 300, 42, 7, 9, 11]); g.generate_next_token()\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(tiny_exports[4][1])], capture_output=True, text=True,
                       timeout=120)
    log = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)  # genai colours its log
    assert r.returncode == 0, log[-2000:]
    assert "Using Trimmed Prefill Logits" in log
    assert re.search(r"Name: logits ShapeDims\[ 3\]Shape\[ 1 1 \d+ \]", log), log[-2000:]
