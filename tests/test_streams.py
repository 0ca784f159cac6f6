"""Several P over one backbone: head sets in a checkpoint, one multi-P export, the runtime's per-call P."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from runtime_helpers import run_cli, torch_greedy
from safetensors.torch import load_file, save_file

from parscale.errors import ParScaleError
from parscale.exporter.pipeline import export
from parscale.manifest import EXTERNAL_DATA, MODEL_FILE
from parscale.modeling.heads import Stream, head_sets, is_head_tensor, load_streams
from parscale.modeling.random_init import init_checkpoint, init_heads
from parscale.runtime import Model
from parscale.runtime.bench import bench_streams

STREAMS = [1, 2, 4, 8]
PROMPTS = [[5, 17, 300, 42, 7, 9, 11], [3, 99, 250]]  # the second is left-padded in the batch


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("streams") / "ckpt"
    shutil.copytree(tiny.checkpoint(P=4, tokenizer=True), folder)
    init_heads(folder, [2, 8], seed=1, std=0.5)  # prefixes far from zero: the P really differ
    return folder


@pytest.fixture(scope="module")
def exports(ckpt, tmp_path_factory) -> dict[str, Path]:
    """One int8 multi-P export (weights in external data) and a single-P export of each P, validated."""
    root = tmp_path_factory.mktemp("streams-exports")
    made = {"multi": export(ckpt, root / "multi", P=STREAMS, quantize=_int8(), external_data_threshold=0).out}
    for P in STREAMS:
        made[P] = export(ckpt, root / f"p{P}", P=P, quantize=_int8(), external_data_threshold=0).out
    return made


def _int8():  # type: ignore[no-untyped-def]
    from parscale.exporter.quant.policy import default_scheme

    return default_scheme(8, method="rtn")


def test_a_checkpoint_lists_and_loads_its_head_sets(ckpt):
    assert head_sets(ckpt) == STREAMS
    models = load_streams([Stream(ckpt, P) for P in STREAMS])
    ptrs = {m.model.layers[0].mlp.down_proj.weight.data_ptr() for _, m in models.values()}
    assert len(ptrs) == 1  # the backbone's tensors are read once and shared by every module
    assert [m.model.layers[0].self_attn.prefix_k.shape[0] for P, (_, m) in models.items() if P > 1] == [2, 4, 8]
    own = load_file(ckpt / "model.safetensors")
    assert torch.equal(models[4][1].model.layers[1].self_attn.prefix_v, own["model.layers.1.self_attn.prefix_v"])


def test_the_multi_p_export_stores_the_backbone_once(ckpt, exports):
    multi, single = exports["multi"], exports[8]
    manifest = json.loads((multi / "parscale.json").read_text())
    assert manifest["format_version"] == 4 and manifest["io"]["cache"]["streams"] == STREAMS
    assert manifest["model"]["P"] == 8
    graph = onnx.load(str(multi / MODEL_FILE), load_external_data=False).graph
    names = [t.name for t in graph.initializer]
    assert len(names) == len(set(names))
    quantized = [n.input[1] for n in graph.node if n.op_type == "MatMulNBits"]
    single_graph = onnx.load(str(single / MODEL_FILE), load_external_data=False).graph
    assert sorted(quantized) == sorted(n.input[1] for n in single_graph.node if n.op_type == "MatMulNBits")
    # Every backbone weight is in the outer graph once; the branches hold no initializer of their own.
    branches = [a.g for n in graph.node if n.op_type == "If" for a in n.attribute
                if a.type == onnx.AttributeProto.GRAPH]
    assert branches and not any(b.initializer for b in branches)
    # The multi-P data file is the P=8 export's plus the other P's own tensors (prefixes, aggregation).
    models = load_streams([Stream(ckpt, P) for P in (2, 4)])
    heads = sum(t.numel() * 4 for _, m in models.values() for n, t in m.state_dict().items() if is_head_tensor(n))
    extra = (multi / EXTERNAL_DATA).stat().st_size - (single / EXTERNAL_DATA).stat().st_size
    assert 0 < extra <= heads + 64 * 1024, (extra, heads)  # at most the P=2 and P=4 heads, plus page alignment


def test_every_p_is_validated_against_its_own_module(exports):
    validation = json.loads((exports["multi"] / "parscale.json").read_text())["validation"]
    assert sorted(map(int, validation["by_P"])) == STREAMS
    for record in validation["by_P"].values():
        assert record["greedy_match"] and record["max_abs_logit_diff"] < 1e-3
        assert 0.9 < record["fidelity"]["top1_agreement"] <= 1.0


def test_each_p_generates_what_its_single_export_and_pytorch_do(ckpt, exports):
    multi = Model.load(exports["multi"])
    assert list(multi.streams) == STREAMS and multi.P == 8
    models = load_streams([Stream(ckpt, P) for P in STREAMS])
    for P in STREAMS:
        ours = [r.generated_ids for r in multi.generate(prompt_ids=PROMPTS, max_new_tokens=8, P=P, ignore_eos=True)]
        single = Model.load(exports[P]).generate(prompt_ids=PROMPTS, max_new_tokens=8, ignore_eos=True)
        assert ours == [r.generated_ids for r in single], f"P={P}"
    float_multi = export(ckpt, exports["multi"].parent / "float", P=STREAMS).out
    m = Model.load(float_multi)
    for P in STREAMS:
        got = m.generate(prompt_ids=PROMPTS[0], max_new_tokens=8, P=P, ignore_eos=True).generated_ids
        assert got == torch_greedy(models[P][1], [PROMPTS[0]], 8)[0], f"P={P}"


def test_a_gptq_int4_multi_p_export_calibrates_once_on_the_largest_p(ckpt, exports, tmp_path):
    from parscale.exporter.quant.policy import default_scheme

    result = export(ckpt, tmp_path / "int4", P=[1, 4], quantize=default_scheme(4))
    assert result.manifest.quantization["scheme"]["method"] == "gptq"
    assert sorted(result.validations) == sorted(result.fidelities) == [1, 4]
    assert all(v.ok for v in result.validations.values())
    m = Model.load(result.out)
    for P in (1, 4):
        assert len(m.generate(prompt_ids=PROMPTS, max_new_tokens=4, P=P, ignore_eos=True)[0].generated_ids) == 4


@pytest.mark.parametrize("Ps", [[4], [2, 4]])
def test_no_module_outlives_its_release_before_onnx_runtime_runs(ckpt, tmp_path, monkeypatch, Ps):  # noqa: N803
    """The modules (and the weights the graph writer pinned, the embedding table among them) are gone by the
    time ONNX Runtime validates: a module kept alive there cost 544 MB at 0.5B."""
    import weakref

    import parscale.exporter.pipeline as export_module

    refs, alive = [], []
    real = export_module.load_streams

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        refs.extend(weakref.ref(m) for _, m in out.values())
        return out

    def log(msg: str) -> None:
        if msg.startswith("validating"):
            alive.append(sum(r() is not None for r in refs))

    monkeypatch.setattr(export_module, "load_streams", spy)
    export(ckpt, tmp_path / "out", P=Ps, quantize=_int8(), log=log)
    assert len(refs) == len(Ps) and alive == [0]


def test_calls_with_different_p_share_one_session(exports):
    m = Model.load(exports["multi"])
    a = m.generate(prompt_ids=PROMPTS[0], max_new_tokens=6, P=2, ignore_eos=True).generated_ids
    m.generate(prompt_ids=PROMPTS[0], max_new_tokens=6, P=8, ignore_eos=True)
    assert m.generate(prompt_ids=PROMPTS[0], max_new_tokens=6, P=2, ignore_eos=True).generated_ids == a
    results = bench_streams(exports["multi"], [1, 8], prompt_len=8, gen=4, threads=1)
    assert [r.P for r in results] == [1, 8] and all(r.decode_ms_per_token > 0 for r in results)


def test_onnxruntime_genai_runs_every_p_of_the_one_graph(exports):
    og = pytest.importorskip("onnxruntime_genai")
    folder = exports["multi"]
    rows = json.loads((folder / "parscale.json").read_text())["io"]["cache"]["prefix_rows"]
    m = Model.load(folder)
    for P in STREAMS:
        config = og.Config(str(folder))
        config.overlay((folder / f"genai_overlay.p{P}.json").read_text())
        model = og.Model(config)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(PROMPTS[0]) + 8 + rows)
        gen = og.Generator(model, params)
        gen.append_tokens(PROMPTS[0])
        # genai's buffer (max_length rows) also holds the prefix rows: stop by the tokens wanted.
        while not gen.is_done() and len(gen.get_sequence(0)) < len(PROMPTS[0]) + 8:
            gen.generate_next_token()
        theirs = [int(t) for t in gen.get_sequence(0)[len(PROMPTS[0]):]]
        ours = m.generate(prompt_ids=PROMPTS[0], max_new_tokens=8, P=P, ignore_eos=True).generated_ids
        assert theirs == ours, f"P={P}"


def test_unknown_p_is_refused_with_what_is_there(ckpt, exports, tmp_path):
    with pytest.raises(ParScaleError, match=r"has no head set for P=3: it holds P = 1, 2, 4, 8; .*train-heads"):
        export(ckpt, tmp_path / "out", P=[1, 3])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ParScaleError, match=r"serves P = 1, 2, 4, 8; got P=3"):
        Model.load(exports["multi"]).generate(prompt_ids=[1, 2], max_new_tokens=2, P=3)
    with pytest.raises(ParScaleError, match=r"serves P = 2; got P=4; it is a single-P export"):
        Model.load(exports[2]).generate(prompt_ids=[1, 2], max_new_tokens=2, P=4)
    r = run_cli("generate", str(exports["multi"]), "--prompt-ids", "1,2", "--P", "5")
    assert r.returncode == 1 and "serves P = 1, 2, 4, 8; got P=5" in r.stderr and "Traceback" not in r.stderr


def p2_checkpoint(ckpt: Path, dest: Path, edit=None) -> Path:  # type: ignore[no-untyped-def]
    """A checkpoint folder of its own at P=2: ckpt's backbone (changed by `edit`, if given) with its P=2 heads."""
    shutil.copytree(ckpt, dest)
    for f in dest.glob("heads-p*.safetensors"):
        f.unlink()
    weights = {n: t for n, t in load_file(ckpt / "model.safetensors").items() if not is_head_tensor(n)}
    if edit is not None:
        edit(weights)
    save_file(weights | load_file(ckpt / "heads-p2.safetensors"), dest / "model.safetensors")
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(config | {"parscale_n": 2}))
    return dest


def test_checkpoints_with_different_backbones_are_refused(ckpt, tmp_path):
    other = p2_checkpoint(ckpt, tmp_path / "other",
                          lambda w: w["model.layers.1.mlp.up_proj.weight"][0].add_(1.0))
    config = json.loads((other / "config.json").read_text())
    differs = r"not the same backbone: tensor model\.layers\.1\.mlp\.up_proj\.weight differs"
    with pytest.raises(ParScaleError, match=differs):
        export([ckpt, other], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (other / "config.json").write_text(json.dumps(config | {"intermediate_size": 64}))
    other_shape = r"not the same backbone: intermediate_size is 160 in .*ckpt/config.json and 64 in"
    with pytest.raises(ParScaleError, match=other_shape):
        export([ckpt, other], tmp_path / "out")
    with pytest.raises(ParScaleError, match=r"each gives its own P .*leave --P out"):
        export([ckpt, other], tmp_path / "out", P=[2, 4])


def test_two_checkpoint_folders_with_one_backbone_make_one_export(ckpt, exports, tmp_path):
    other = p2_checkpoint(ckpt, tmp_path / "p2")
    out = export([ckpt, other], tmp_path / "out", quantize=_int8()).out
    assert list(Model.load(out).streams) == [2, 4]
    prompt = PROMPTS[0]
    for P in (2, 4):
        got = Model.load(out).generate(prompt_ids=prompt, max_new_tokens=6, P=P, ignore_eos=True)
        want = Model.load(exports[P]).generate(prompt_ids=prompt, max_new_tokens=6, ignore_eos=True)
        assert got.generated_ids == want.generated_ids


@pytest.mark.slow
def test_eval_scores_each_p(ckpt, exports, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    r = run_cli("eval", str(ckpt), "--text", str(text), "--P", "2", "--window", "32", "--stride", "32", "--json")
    assert r.returncode == 0, r.stderr
    r2 = run_cli("eval", str(exports["multi"]), "--text", str(text), "--P", "2", "--window", "32", "--stride",
                 "32", "--json", "--no-verify")
    assert r2.returncode == 0, r2.stderr
    a, b = json.loads(r.stdout), json.loads(r2.stdout)
    assert a["P"] == b["P"] == 2 and np.isclose(a["nll_per_token"], b["nll_per_token"], rtol=2e-2)


# A backbone whose int8 weights (about 80 MB) outweigh what Python, numpy and ONNX Runtime hold before
# loading, so that a second copy of them would show in the process's memory.
MEMORY_SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=3072, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
MEMORY_CHILD = """
import sys
from parscale.runtime import Model
from parscale.runtime.bench import peak_rss_mb
m = Model.load(sys.argv[1], threads=1, verify=False)
for P in [int(p) for p in sys.argv[2].split(",")]:
    m.generate(prompt_ids=list(range(1, 65)), max_new_tokens=16, ignore_eos=True, P=P if len(m.streams) > 1 else None)
print(peak_rss_mb())
"""


@pytest.mark.slow
def test_serving_every_p_costs_at_most_a_tenth_more_memory_than_the_largest_alone(tmp_path):
    ckpt = init_checkpoint(tmp_path / "ckpt", P=8, prefix=16, dtype="float32", overrides=MEMORY_SHAPE)
    init_heads(ckpt, [2, 4])
    multi = export(ckpt, tmp_path / "multi", P=STREAMS, quantize=_int8(), validate=False).out
    single = export(ckpt, tmp_path / "p8", P=8, quantize=_int8(), validate=False).out

    def peak(folder: Path, streams: str) -> float:
        r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(folder), streams], capture_output=True,
                           text=True, timeout=300, check=True)
        return float(r.stdout.strip().splitlines()[-1])

    weights = sum(p.stat().st_size for p in single.iterdir()) / 1e6
    os.sync()  # the exports were just written: a load as an app sees it reads clean page-cache pages
    # The lower of two loads of each, interleaved: one load's peak varies by a few MB.
    runs = [(peak(single, "8"), peak(multi, "1,2,4,8")) for _ in range(2)]
    alone, every = min(a for a, _ in runs), min(e for _, e in runs)
    assert weights > 0.4 * alone  # the weights are a large part of the process: a copy per P would show
    assert every <= 1.10 * alone, (every, alone, weights)


# ---------------------------------------------------------------------- head sets bound to their backbone

def _rewrite(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(path)
    edit(tensors, meta)
    save_file(tensors, path, metadata=meta)


def _other_backbone(folder: Path) -> None:
    w = load_file(folder / "model.safetensors")
    w["model.norm.weight"] = w["model.norm.weight"] + 1
    save_file(w, folder / "model.safetensors", metadata={"format": "pt"})


HEAD_FILE_CASES = {  # what is wrong with heads-p2.safetensors -> words the refusal must hold
    "a backbone tensor inside": (lambda f: _rewrite(f / "heads-p2.safetensors", lambda t, m: t.__setitem__(
        "model.norm.weight", torch.ones(8))), r"holds backbone tensor model\.norm\.weight"),
    "another P's tensors": (lambda f: shutil.copy(f / "heads-p8.safetensors", f / "heads-p2.safetensors"),
                            "head set for P=8 .* not P=2"),
    "metadata of another P": (lambda f: _rewrite(f / "heads-p2.safetensors", lambda t, m: m.update(parscale_n="4")),
                              "head set for P=4 .* not P=2"),
    "no fingerprint (an older file)": (lambda f: _rewrite(f / "heads-p2.safetensors",
                                                          lambda t, m: m.pop("parscale_backbone")),
                                       "records no backbone fingerprint.*--force"),
    "the backbone changed since": (_other_backbone, "trained on another backbone.*--force"),
}


@pytest.mark.parametrize("case", sorted(HEAD_FILE_CASES))
@pytest.mark.parametrize("Ps", [[2], [2, 4], [1, 2, 8]], ids=str)
def test_a_head_set_holds_only_its_heads_for_its_backbone(ckpt, tmp_path, case, Ps):  # noqa: N803
    """A heads-p{P}.safetensors is refused, naming the problem, unless it holds only prefix and aggregation
    tensors of exactly that P, trained on this folder's backbone (its recorded fingerprint); alone or with
    other P, at load and so at export."""
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    HEAD_FILE_CASES[case][0](folder)
    with pytest.raises(ParScaleError, match=HEAD_FILE_CASES[case][1]):
        load_streams([Stream(folder, P) for P in Ps])


def test_a_head_set_copied_from_another_checkpoint_is_refused_at_export(ckpt, tiny, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    other = tmp_path / "other"
    shutil.copytree(tiny.checkpoint(P=4, seed=7), other)
    init_heads(other, [2], seed=3)
    shutil.copy(other / "heads-p2.safetensors", folder / "heads-p2.safetensors")
    with pytest.raises(ParScaleError, match="trained on another backbone"):
        export(folder, tmp_path / "out", P=[2, 4], validate=False)
    assert not (tmp_path / "out").exists()


def test_the_embedded_model_head_sets_are_bound_to_its_backbone():
    from parscale.cli import DEFAULT_MODEL
    from parscale.modeling.heads import check_head_file

    for P in (2, 8):
        assert all(is_head_tensor(n) for n in check_head_file(DEFAULT_MODEL, P))
