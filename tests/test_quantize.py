"""Quantized exports (--int8 / --int4): graph rewriting, manifest, generation and fidelity.

Exporting dominates the cost, so each checkpoint is exported once (module-scoped fixtures) and the
other schemes are applied to a copy of that float graph with `quantize_graph` directly.

The mechanical check: with accuracy_level 0 a quantized graph must equal, to float32 rounding,
the PyTorch module whose weights are the graph's own quantized weights, decoded in numpy. That
pins every rewired node (tied sharing, padding, untied tables) independently of model quality,
which on random weights says little; a second check pins the codes themselves for round-to-nearest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from runtime_helpers import all_nodes, greedy_graph
from typer.testing import CliRunner

from parscale.cli import app
from parscale.driver import open_session
from parscale.errors import ParScaleError
from parscale.exporter import pipeline as export_module
from parscale.exporter.pipeline import export
from parscale.exporter.quant import math as qm
from parscale.exporter.quant.calibrate import LayerwiseHessians, sample_tokens
from parscale.exporter.quant.policy import QuantScheme, default_scheme
from parscale.exporter.quant.rewrite import quantize_graph
from parscale.exporter.torch_reference import compare
from parscale.fidelity import compare_exports
from parscale.manifest import MANIFEST, MODEL_FILE, Manifest
from parscale.modeling.checkpoint import load_model


@pytest.fixture(scope="module")
def checkpoints(tiny) -> dict[str, Path]:
    return {
        "tied": tiny.checkpoint(P=4, tied=True),
        "untied": tiny.checkpoint(P=4, tied=False, seed=1),
        "p1": tiny.checkpoint(P=1, tied=False, seed=2),
    }


@pytest.fixture(scope="module")
def float_exports(checkpoints: dict[str, Path], tiny) -> dict[str, Path]:
    return {k: tiny.export(v, validate=False) for k, v in checkpoints.items()}


@pytest.fixture(scope="module")
def hessians(checkpoints: dict[str, Path]) -> dict[str, dict[str, np.ndarray]]:
    """GPTQ statistics per checkpoint: a short sample from each model (8 x 16 tokens)."""
    models = {k: load_model(v)[1] for k, v in checkpoints.items()}
    return {k: dict(LayerwiseHessians(m, sample_tokens(m, sequences=8, length=16)[:, :-1])) for k, m in models.items()}


@pytest.fixture(scope="module")
def int4_tied(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """The full `export` path with the int4 defaults (GPTQ on model samples): float validation
    against PyTorch, calibration, quantization, fidelity."""
    return export(checkpoints["tied"], tmp_path_factory.mktemp("q") / "int4", quantize=default_scheme(4))


def graph_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every quantized weight of a graph decoded back to float (N, K), by checkpoint tensor name."""
    inits = {t.name: t for t in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "MatMulIntegerToFloat":  # (K, N) int8 codes, scales / 127 per column
            codes, scales = (numpy_helper.to_array(inits[node.input[i]]) for i in (1, 3))
            out[node.input[1].rsplit(".", 1)[0]] = (codes.astype(np.float32) * scales * 127).T
            continue
        codes_name = node.input[1] if node.op_type == "MatMulNBits" else node.input[0]
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized") or codes_name not in inits:
            continue  # (a shared table's Gather reads it through a Reshape: decoded via the LM head)
        scales_name, zp_name = node.input[2], node.input[3] if len(node.input) > 3 and node.input[3] else None
        attrs = {a.name: a.i for a in node.attribute}
        bits, block = attrs["bits"], attrs["block_size"]
        scales = numpy_helper.to_array(inits[scales_name]).astype(np.float32)
        n, k_blocks = scales.shape
        codes = qm.unpack_bits(numpy_helper.to_array(inits[codes_name]).reshape(n, -1), bits, k_blocks * block)
        zp = None if zp_name is None else qm.unpack_bits(numpy_helper.to_array(inits[zp_name]), bits, k_blocks)
        k = attrs.get("K", k_blocks * block)
        bq = qm.BlockQuantized(q=codes.reshape(n, k_blocks, block), scales=scales, zero_points=zp, bits=bits,
                               block_size=block, K=k)
        out[codes_name.rsplit(".", 1)[0]] = qm.dequantize_blockwise(bq)
    return unpack_projections(out)


# The fused graph packs q/k/v and gate/up into one projection each (rows in that order); the tiny
# preset's sizes: q 4 heads x 16, k and v 2 x 16, gate and up 160.
PACKED = {"self_attn.qkv_proj": (("self_attn.q_proj", 64), ("self_attn.k_proj", 32), ("self_attn.v_proj", 32)),
          "mlp.gate_up_proj": (("mlp.gate_proj", 160), ("mlp.up_proj", 160))}


def unpack_projections(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed projections split back into the checkpoint's tensors, by checkpoint name."""
    out = {}
    for name, w in weights.items():
        packed = next((p for p in PACKED if name.endswith(p + ".weight")), None)
        if packed is None:
            out[name] = w
            continue
        prefix, start = name.removesuffix(packed + ".weight"), 0
        for part, rows in PACKED[packed]:
            out[f"{prefix}{part}.weight"] = w[start:start + rows]
            start += rows
        assert start == len(w), name
    return out


def graph_module(ckpt: Path, proto: onnx.ModelProto) -> torch.nn.Module:
    """The float module carrying the graph's quantized weights (the tied table stays shared if the graph shares it)."""
    weights = graph_weights(proto)
    _, model = load_model(ckpt, torch.float32)
    with torch.no_grad():
        for name, w in weights.items():
            if name == "lm_head.weight" and "model.embed_tokens.weight" in weights:
                model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())  # untie: two tables
            model.get_parameter(name).copy_(torch.from_numpy(w[:, :model.get_parameter(name).shape[1]]))
    return model


def quantize_copy(float_dir: Path, out: Path, scheme: QuantScheme, hessians: dict | None = None, num_layers: int = 2):
    """A quantized copy of a float export folder, as `export` would write it (manifest included)."""
    shutil.copytree(float_dir, out)
    proto = onnx.load(str(out / MODEL_FILE))
    report = quantize_graph(proto, scheme, num_layers, hessians)
    onnx.save(proto, str(out / MODEL_FILE))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["quantization"] = report.to_dict()
    manifest["files"][MODEL_FILE]["bytes"] = (out / MODEL_FILE).stat().st_size
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out, proto, report


SCHEMES = [
    pytest.param("tied", QuantScheme(bits=8), id="tied-int8"),
    pytest.param("tied", QuantScheme(bits=4, block_size=128, symmetric=True), id="tied-int4-sym-block128-padded"),
    pytest.param("tied", QuantScheme(bits=4, embedding_bits=8), id="tied-int4-emb8-separate-tables"),
    pytest.param("tied", QuantScheme(bits=4, method="gptq"), id="tied-int4-gptq"),
    pytest.param("untied", QuantScheme(bits=4, method="gptq", block_size=64), id="untied-int4-gptq-block64-padded"),
    pytest.param("untied", QuantScheme(bits=8, block_size=64, symmetric=True), id="untied-int8-sym-block64-padded"),
    pytest.param("p1", QuantScheme(bits=4), id="P1-int4"),
    pytest.param("p1", QuantScheme(bits=8, method="gptq"), id="P1-int8-gptq"),
]


@pytest.mark.parametrize(("which", "scheme"), SCHEMES)
def test_quantized_graph_equals_module_with_its_weights(
    which: str, scheme: QuantScheme, checkpoints: dict[str, Path], float_exports: dict[str, Path],
    hessians: dict[str, dict[str, np.ndarray]], tmp_path: Path,
) -> None:
    """Prefill + 8 cached decode steps, batch 2 with left padding: logits and greedy tokens."""
    out, proto, report = quantize_copy(float_exports[which], tmp_path / "q", scheme, hessians[which])
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 4 * 2 + 1  # packed qkv, o, packed gate/up, down; LM head
    assert ops.count("GatherBlockQuantized") == 1
    assert "Gather" not in [n.op_type for n in proto.graph.node if n.input and n.input[0].endswith("weight")]
    shared = which == "tied" and scheme.embed_bits == scheme.bits
    assert report.shared_embedding is shared
    assert len(report.tensors) == 4 * 2 + 1 + (0 if shared else 1)
    algorithms = {t["algorithm"] for name, t in report.tensors.items() if name != "model.embed_tokens.weight"}
    assert algorithms == {scheme.method}
    r = compare(open_session(out / MODEL_FILE), graph_module(checkpoints[which], proto), tolerance=1e-3)
    assert r.ok, r


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_codes_are_the_math_codes(bits: int, checkpoints: dict[str, Path],
                                                   float_exports: dict[str, Path], tmp_path: Path) -> None:
    """The graph holds exactly quant/math.py's codes (clip search at 4 bits) for the checkpoint's weights."""
    _, proto, _ = quantize_copy(float_exports["untied"], tmp_path / "q", QuantScheme(bits=bits))
    _, model = load_model(checkpoints["untied"], torch.float32)
    for name, w in graph_weights(proto).items():
        expected = qm.dequantize_blockwise(qm.quantize_blockwise(
            model.get_parameter(name).detach().numpy(), bits, 32, symmetric=False, clip_search=bits == 4))
        np.testing.assert_array_equal(w, expected, err_msg=name)


def test_gptq_lowers_the_output_error_of_every_projection(checkpoints: dict[str, Path],
                                                          float_exports: dict[str, Path], tmp_path: Path) -> None:
    """On its calibration inputs, each GPTQ projection's outputs move less than round-to-nearest's."""
    _, model = load_model(checkpoints["untied"], torch.float32)
    tokens = np.random.default_rng(0).integers(0, 512, size=(8, 32))
    h = dict(LayerwiseHessians(model, tokens))
    _, gptq, _ = quantize_copy(float_exports["untied"], tmp_path / "g", QuantScheme(bits=4, method="gptq"), h)
    _, rtn, _ = quantize_copy(float_exports["untied"], tmp_path / "r", QuantScheme(bits=4))
    wg, wr = graph_weights(gptq), graph_weights(rtn)
    for name in wg:
        if name == "model.embed_tokens.weight":
            continue
        w = model.get_parameter(name).detach().numpy()
        upper = h[name.removesuffix(".weight")].astype(np.float64)
        hess = np.triu(upper) + np.triu(upper, 1).T  # the statistic fills one triangle

        def out_err(q: np.ndarray, w: np.ndarray = w, hess: np.ndarray = hess) -> float:
            d = q - w
            return float(np.einsum("nk,kl,nl->", d, hess, d))  # sum over inputs of |x (q - w)^T|^2

        assert out_err(wg[name]) < out_err(wr[name]), name


@pytest.mark.parametrize(("which", "scheme"), SCHEMES[:4])
def test_no_dead_or_float_copies_of_quantized_weights(
    which: str, scheme: QuantScheme, float_exports: dict[str, Path], hessians: dict[str, dict[str, np.ndarray]],
    tmp_path: Path,
) -> None:
    _, proto, report = quantize_copy(float_exports[which], tmp_path / "q", scheme, hessians[which])
    graph = proto.graph
    used = {i for n in all_nodes(graph) for i in n.input} | {i.name for i in graph.input}  # If branches too
    assert [t.name for t in graph.initializer if t.name not in used] == []
    big_float = [list(t.dims) for t in graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and min(t.dims) >= 64]
    # The only big float matrix left is ParScale's own aggregation layer (P*h, h); none at P=1.
    assert big_float == ([] if which == "p1" else [[4 * 64, 64]])
    quantized = {n for t in report.tensors.values() for n in t["initializers"]}
    assert quantized <= {t.name for t in graph.initializer}


def test_parscale_parameters_stay_float(float_exports: dict[str, Path], tmp_path: Path) -> None:
    """Prefix keys/values and the aggregation MLP are byte-identical before and after quantization."""
    before = onnx.load(str(float_exports["tied"] / MODEL_FILE))
    _, after, _ = quantize_copy(float_exports["tied"], tmp_path / "q", QuantScheme(bits=4))
    keep = {t.name: t.raw_data for t in before.graph.initializer
            if "prefix" in t.name  # prefix keys/values
            or tuple(t.dims) in ((4 * 64, 64), (64, 4)) or "aggregate" in t.name}  # aggregation MLP
    assert len(keep) == 2 * 2 + 2 + 2
    kept = {t.name: t.raw_data for t in after.graph.initializer}
    assert all(kept.get(name) == raw for name, raw in keep.items())


def test_export_records_scheme_bits_and_fidelity(int4_tied) -> None:
    m = Manifest.read(int4_tied.out)
    q = m.quantization
    assert q["scheme"] == {"bits": 4, "block_size": 32, "symmetric": False, "accuracy_level": 4, "embedding_bits": 4,
                           "method": "gptq", "kernel": "MatMulNBits"}
    assert q["calibration"].startswith("sampled from the model (float32): 16 x 128 tokens")
    assert q["shared_embedding"] is True
    assert 5.0 < q["bits_per_weight"]["quantized"] < 5.2  # 4 + 32/32 + 4/32 with fp32 scales
    assert q["bits_per_weight"]["model"] > q["bits_per_weight"]["quantized"]  # the float remainder
    meta = json.loads({p.key: p.value for p in onnx.load(str(int4_tied.out / MODEL_FILE)).metadata_props}["parscale"])
    assert meta["quantization"] == q
    v = m.validation
    assert v["greedy_match"] and v["max_abs_logit_diff"] < 1e-3  # the float graph against PyTorch
    f = v["fidelity"]
    assert f["positions"] == 4 * 128 and 0 <= f["mean_kl"] < 0.05 and f["top1_agreement"] > 0.5
    assert not any(p.name.endswith("-float") for p in int4_tied.out.parent.iterdir())  # no leftovers


def test_quantized_export_generates_with_the_runtime(int4_tied) -> None:
    """parscale.runtime drives the int4 export (accuracy_level 4: int8 activations inside MatMulNBits)
    to the same greedy tokens as a plain loop over the graph contract."""
    from parscale.runtime import Model

    prompt = [5, 17, 300, 2, 9]
    r = Model.load(int4_tied.out, provider="cpu").generate(prompt_ids=prompt, max_new_tokens=8, greedy=True,
                                                           ignore_eos=True)
    session = open_session(int4_tied.out / MODEL_FILE)
    prompt_ids = np.array([prompt])
    expected = greedy_graph(session, prompt_ids, np.ones_like(prompt_ids), 8)[0, len(prompt):].tolist()
    assert list(r.generated_ids) == expected
    assert all(0 <= t < Manifest.read(int4_tied.out).model.vocab_size for t in expected)


def test_compare_an_export_with_itself(int4_tied) -> None:
    f = compare_exports(int4_tied.out, int4_tied.out, window=32, max_windows=2, decode_steps=4)
    assert f.top1_agreement == 1.0 and abs(f.mean_kl) < 1e-9 and f.positions == 64
    res = CliRunner().invoke(app, ["compare", str(int4_tied.out), str(int4_tied.out), "--window", "32",
                                   "--windows", "2", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["top1_agreement"] == 1.0 and abs(d["mean_kl"]) < 1e-9


def test_compare_float_and_quantized_on_text(int4_tied, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """With a text file, perplexity is reported for both (a byte-level tokenizer made on the spot)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "def add(a, b):\n    return a + b\n" * 60
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # The tokenizer goes into a checkpoint that is exported: an export reads only the files it lists.
    ckpt = shutil.copytree(checkpoints["tied"], tmp_path / "ckpt")
    tok.save(str(ckpt / "tokenizer.json"))
    a = export(ckpt, tmp_path / "a", validate=False).out
    (tmp_path / "t.txt").write_text(text)
    f = compare_exports(a, int4_tied.out, text=tmp_path / "t.txt", window=64, max_windows=None)
    assert f.perplexity_a is not None and f.perplexity_b is not None and f.perplexity_a > 1
    assert f.source == "text t.txt" and f.windows >= 2


@pytest.mark.parametrize("which", ["tied", "p1"])
def test_the_int8_default_graph_equals_module_with_its_weights_and_row_quantized_inputs(
    which: str, checkpoints: dict[str, Path], float_exports: dict[str, Path], tmp_path: Path,
) -> None:
    """The int8 default (MatMulIntegerToFloat for gate/up): the graph equals the module carrying its
    weights whose gate/up inputs are quantized per row as `quant.math.activation_codes` says (the other
    projections at accuracy_level 0, float activations, so that the gate/up rounding is all there is)."""
    assert default_scheme(8).kernel == "MatMulIntegerToFloat"
    scheme = default_scheme(8, accuracy_level=0)
    _, proto, report = quantize_copy(float_exports[which], tmp_path / "q", scheme)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 and ops.count("MatMulNBits") == 3 * 2 + 1  # per layer
    assert {t["kind"] for name, t in report.tensors.items() if "gate_up" in name} == {"MatMulIntegerToFloat"}
    assert report.to_dict()["ops"][0] == "com.microsoft.MatMulIntegerToFloat"
    module = graph_module(checkpoints[which], proto)

    def row_quantized(_mod: torch.nn.Module, inputs: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        codes, amax = qm.activation_codes(inputs[0].detach().numpy())
        return (torch.from_numpy((codes.astype(np.float32) - 128) * amax / 127),)

    for layer in module.model.layers:
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.register_forward_pre_hook(row_quantized)
    r = compare(open_session(tmp_path / "q" / MODEL_FILE), module, tolerance=1e-3)
    assert r.ok, r


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 4}, "use it with --int8"), ({"bits": 8, "method": "gptq"}, "use it with --int8"),
])
def test_the_integer_kernel_takes_int8_round_to_nearest_only(kwargs: dict, message: str) -> None:
    with pytest.raises(ParScaleError, match=message):
        QuantScheme(kernel="MatMulIntegerToFloat", **kwargs)
    with pytest.raises(ParScaleError, match="kernel must be one of MatMulNBits, MatMulIntegerToFloat"):
        QuantScheme(bits=8, kernel="DynamicQuantizeMatMul")


def test_the_integer_kernel_is_refused_for_fp16_and_fp16_defaults_to_matmulnbits(
    checkpoints: dict[str, Path], tmp_path: Path,
) -> None:
    assert default_scheme(8, dtype="fp16").kernel == "MatMulNBits"
    res = CliRunner().invoke(app, ["export", str(checkpoints["tied"]), "-o", str(tmp_path / "x"), "--int8",
                                   "--kernel", "MatMulIntegerToFloat", "--dtype", "fp16"])
    assert res.exit_code == 1 and "runs in float32 graphs" in str(res.exception)
    assert not (tmp_path / "x").exists()


def test_cli_int8_untied_fp16(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """--int8 combines with --dtype fp16: fp16 scales, and the CPU provider runs the fp16 kernels."""
    out = tmp_path / "q8h"
    res = CliRunner().invoke(app, ["export", str(checkpoints["untied"]), "-o", str(out), "--int8", "--dtype", "fp16",
                                   "--block-size", "64", "--symmetric"])
    assert res.exit_code == 0, res.output
    assert "quantization: int8" in res.output and "bits/weight" in res.output and "top-1 agreement" in res.output
    q = Manifest.read(out).quantization
    assert q["scheme"]["block_size"] == 64 and q["scheme"]["symmetric"] is True
    assert q["bits_per_weight"]["quantized"] == pytest.approx(8 + 16 / 64, abs=0.3)  # fp16 scales, K padding
    proto = onnx.load(str(out / MODEL_FILE))
    scales = [t for t in proto.graph.initializer if t.name.endswith(".scales")]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)


@pytest.mark.parametrize("args", [["--int8", "--int4"], ["--block-size", "64"], ["--int4", "--block-size", "48"],
                                  ["--int4", "--accuracy-level", "7"]])
def test_cli_rejects_bad_quantization_options(args: list[str], checkpoints: dict[str, Path], tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["export", str(checkpoints["tied"]), "-o", str(tmp_path / "x"), *args])
    assert res.exit_code != 0
    assert isinstance(res.exception, ParScaleError) or res.exit_code == 2
    assert not (tmp_path / "x").exists()


def test_failed_quantization_leaves_nothing(checkpoints: dict[str, Path], float_exports: dict[str, Path],
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args, **_kwargs):
        raise ParScaleError("quantization exploded")

    def built(_model, folder: Path, **_kwargs) -> None:  # skip rebuilding: the failure comes later
        shutil.copyfile(float_exports["p1"] / MODEL_FILE, folder / MODEL_FILE)

    monkeypatch.setattr(export_module, "build_decoder", built)
    monkeypatch.setattr(export_module, "quantize_graph", boom)
    with pytest.raises(ParScaleError, match="exploded"):
        export(checkpoints["p1"], tmp_path / "out", quantize=QuantScheme(bits=4))
    assert list(tmp_path.iterdir()) == []


def test_unidentifiable_graph_is_refused(float_exports: dict[str, Path]) -> None:
    proto = onnx.load(str(float_exports["p1"] / MODEL_FILE))
    for node in proto.graph.node:
        del node.metadata_props[:]
    with pytest.raises(ParScaleError, match="found 0 projections"):
        quantize_graph(proto, QuantScheme(bits=4), 2)


def test_default_scheme_overrides() -> None:
    s = default_scheme(8, block_size=64)
    assert s.bits == 8 and s.block_size == 64
    with pytest.raises(ParScaleError):
        default_scheme(3)
    assert np.isclose(QuantScheme(bits=4).to_dict()["embedding_bits"], 4)


def test_compare_runs_without_torch(int4_tied) -> None:
    """`parscale compare` (and parscale.fidelity) need only numpy, onnxruntime and tokenizers."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import importlib.abc, json, sys
        BLOCKED = ("torch", "onnx", "safetensors", "transformers")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
        sys.meta_path.insert(0, Block())
        from parscale.cli import main
        sys.argv = ["parscale", "compare", {str(int4_tied.out)!r}, {str(int4_tied.out)!r}, "--window", "16",
                    "--windows", "1", "--decode-steps", "2", "--json"]
        main()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["top1_agreement"] == 1.0


def test_layerwise_statistics_equal_those_of_a_full_forward(checkpoints: dict[str, Path]) -> None:
    """Layer by layer (hidden states carried, each layer then freed) gives the X^T X of one forward pass."""
    _, model = load_model(checkpoints["untied"], torch.float32)
    tokens = np.random.default_rng(1).integers(0, 512, size=(6, 24))
    inputs: dict[str, list[torch.Tensor]] = {}
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj",
             "lm_head"]
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, x, _o, n=n: inputs.setdefault(n, []).append(x[0].reshape(-1, x[0].shape[-1]))) for n in names]
    with torch.no_grad():
        model(torch.from_numpy(tokens))
    for h in hooks:
        h.remove()
    stats = LayerwiseHessians(model, tokens, batch=4, consume=True)
    for n in names:
        if n == "lm_head":  # layer 1 is current: its projections that read one input share one statistic
            assert stats["model.layers.1.mlp.up_proj"] is stats["model.layers.1.mlp.gate_proj"]
        x = torch.cat(inputs[n]).double()
        expected = (x.T @ x).numpy()
        got = stats[n]  # the upper triangle is filled, the lower one is left alone
        np.testing.assert_allclose(np.triu(got), np.triu(expected), rtol=1e-4, atol=1e-4 * np.abs(expected).max(),
                                   err_msg=n)
    with pytest.raises(ParScaleError, match="in order"):
        stats["model.layers.0.self_attn.q_proj"]  # consumed: cannot go back
    assert model.model.layers[0].mlp.down_proj.weight.untyped_storage().size() == 0  # freed as it went
