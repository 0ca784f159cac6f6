"""The fused decoder graph, built directly (no export): one layer's nodes, the attention seam, and
the export path reading each folder's config.json once."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from parscale import contract
from parscale.config import ParScaleConfig
from parscale.exporter.graph.attention import Attention
from parscale.exporter.graph.builder import MS_DOMAIN, GraphBuilder
from parscale.exporter.graph.decoder import Decoder, build_decoder
from parscale.exporter.graph.step_values import StepValues
from parscale.exporter.graph.streams import ROWS
from parscale.exporter.graphfile import graph_metadata
from parscale.exporter.torch_reference import check_graph, reference_run
from parscale.manifest import MODEL_FILE
from parscale.modeling.heads import is_head_tensor
from parscale.modeling.model import ParScaleForCausalLM
from parscale.modeling.random_init import init_heads, make_config, random_model

GQA = "GroupQueryAttention"
# The top-level nodes of decoder layer i > 0 (layer 0 opens with SimplifiedLayerNormalization: no
# residual to add yet), in graph order. P=1 without a prefix: the packed QKV projection feeds
# GroupQueryAttention as it is. P=4 with a prefix: split, the streams as heads, and an `If` whose
# first-step branch puts the prefix rows in front of keys and values.
LAYER = {
    1: ["SkipSimplifiedLayerNormalization", "MatMul", "Add", GQA, "MatMul",
        "SkipSimplifiedLayerNormalization", "MatMul", "Split", "Sigmoid", "Mul", "Mul", "MatMul"],
    4: ["SkipSimplifiedLayerNormalization", "MatMul", "Add", "Split", "Reshape", "Reshape", "Reshape", "If",
        "Reshape", "MatMul", "SkipSimplifiedLayerNormalization", "MatMul", "Split", "Sigmoid", "Mul", "Mul",
        "MatMul"],
}
FIRST_STEP = ["Concat", "Expand", "RotaryEmbedding", "Concat", "Expand", "Concat", GQA, "Slice"]  # P=4's `then`
DECODE_STEP = [GQA]  # P=4's `else`


def _module(P: int, prefix: int) -> ParScaleForCausalLM:  # noqa: N803
    cfg = make_config("tiny", P=P, prefix=prefix, dtype="float32", hidden_size=64, num_attention_heads=4)
    return random_model(ParScaleConfig.from_dict(cfg), seed=1)


def _layer_nodes(model: ParScaleForCausalLM, folder: Path) -> tuple[Decoder, str, list[list[onnx.NodeProto]]]:
    """The decoder (its graph saved), its embedding's output, and each layer's top-level nodes, as
    `Decoder.layer` adds them."""
    decoder = Decoder({model.cfg.P: model}, GraphBuilder(folder), torch.float32)
    ids, mask, _ = decoder.inputs()
    sv = decoder.attention.step_values(ids, mask, decoder.streams.read_count())
    x = decoder.embed(ids)
    delta, residual = None, x
    layers = []
    for i in range(model.cfg.num_hidden_layers):
        start = len(decoder.b.nodes)
        delta, residual = decoder.layer(i, delta, residual, sv)
        layers.append(decoder.b.nodes[start:])
    decoder.b.save(18, external_threshold=1 << 30)  # closes the data file
    return decoder, x, layers


@pytest.mark.parametrize(("P", "prefix"), [(1, 0), (4, 4)])
def test_a_layer_is_the_nodes_of_the_table(P: int, prefix: int, tmp_path: Path) -> None:  # noqa: N803
    model = _module(P, prefix)
    cfg = model.cfg
    _, _, layers = _layer_nodes(model, tmp_path)
    assert len(layers) == cfg.num_hidden_layers == 2
    for i, nodes in enumerate(layers):
        expected = LAYER[P] if i else ["SimplifiedLayerNormalization", *LAYER[P][1:]]
        assert [n.op_type for n in nodes] == expected, i
        names = {n.name for n in nodes}
        assert {f"model.layers.{i}.self_attn.qkv_proj", f"model.layers.{i}.self_attn.o_proj",
                f"model.layers.{i}.mlp.gate_up_proj", f"model.layers.{i}.mlp.down_proj"} <= names
        attention = [n for n in nodes if n.op_type in (GQA, "If")]
        assert len(attention) == 1
        if P == 1:
            gqas = attention
        else:
            branches = {a.name: a.g for a in attention[0].attribute}
            assert [n.op_type for n in branches["then_branch"].node] == FIRST_STEP
            assert [n.op_type for n in branches["else_branch"].node] == DECODE_STEP
            gqas = [n for g in branches.values() for n in g.node if n.op_type == GQA]
        for gqa in gqas:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
            assert gqa.domain == MS_DOMAIN
            assert (attrs["num_heads"], attrs["kv_num_heads"]) == (P * cfg.num_attention_heads,
                                                                   P * cfg.num_key_value_heads)
            assert list(gqa.input[3:5]) == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            assert gqa.name.startswith(f"model.layers.{i}.self_attn.gqa")


@pytest.mark.parametrize(("P", "prefix"), [(1, 0), (4, 4)])
def test_rows_are_named_where_inference_cannot(P: int, prefix: int, tmp_path: Path) -> None:  # noqa: N803
    """The hidden states' s*P rows carry one name from the fan-out through every attention output, so that
    ONNX Runtime can reuse activation buffers; at P=1 inference names them itself and nothing is declared."""
    model = _module(P, prefix)
    decoder, x, layers = _layer_nodes(model, tmp_path)
    o_proj_inputs = [n.input[0] for i, nodes in enumerate(layers) for n in nodes
                     if n.name == f"model.layers.{i}.self_attn.o_proj"]
    declared = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in decoder.b.value_info}
    if P == 1:
        assert declared == {}
        return
    width = model.cfg.num_attention_heads * model.cfg.head_dim
    assert len(o_proj_inputs) == model.cfg.num_hidden_layers
    assert declared == {x: [contract.BATCH, ROWS, model.cfg.hidden_size],
                        **{name: [contract.BATCH, ROWS, width] for name in o_proj_inputs}}


class ScaledAttention(Attention):
    """The same operator with its softmax scale stated (1/sqrt(head_dim), the default): a swap that
    must change only the attention nodes and compute the same logits."""

    def operator(self, q: str, k: str, v: str, i: int, P: int, sv: StepValues, bias: str,  # noqa: N803
                 presents: list[str]) -> list[str]:
        outputs = super().operator(q, k, v, i, P, sv, bias, presents)
        self.b.nodes[-1].attribute.append(onnx.helper.make_attribute("scale", float(self.D) ** -0.5))
        return outputs


def _all_nodes(graph: onnx.GraphProto) -> list[tuple[str, str]]:
    """(op_type, the node without its subgraphs) of every node, nested branches included."""
    found = []
    for node in graph.node:
        plain = onnx.NodeProto()
        plain.CopyFrom(node)
        del plain.attribute[:]
        plain.attribute.extend(a for a in node.attribute if a.type != onnx.AttributeProto.GRAPH)
        found.append((node.op_type, plain.SerializeToString(deterministic=True).hex()))
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                found += _all_nodes(a.g)
    return found


def test_swapping_the_attention_class_changes_only_the_attention_nodes(tmp_path: Path) -> None:
    four = _module(4, 4)
    one = ParScaleForCausalLM(four.cfg.at(1)).eval()  # P=1 over the same backbone
    one.load_state_dict({n: t for n, t in four.state_dict().items() if not is_head_tensor(n)})
    models = {1: one, 4: four}  # a multi-P graph: the per-P `If` and both layouts
    cache = contract.cache_info(4, [1, 4], models[4].cfg.num_key_value_heads)  # how a runtime reads P
    graphs = {}
    for name, attention in (("gqa", Attention), ("scaled", ScaledAttention)):
        (tmp_path / name).mkdir()
        build_decoder(models, tmp_path / name, dtype=torch.float32, opset=18, external_threshold=1 << 30,
                      metadata=graph_metadata({"io": {contract.CACHE_INFO: cache}}), attention=attention)
        graphs[name] = onnx.load(str(tmp_path / name / MODEL_FILE))
    before, after = Counter(_all_nodes(graphs["gqa"].graph)), Counter(_all_nodes(graphs["scaled"].graph))
    changed = (before - after) + (after - before)
    assert {op for op, _ in changed} == {GQA}
    # every attention node changed: 2 layers x 2 P x (first step, decode step), each once out and once in
    assert sum(n for (op, _), n in before.items() if op == GQA) == 8
    assert sum(changed.values()) == 2 * 8
    assert [t.name for t in graphs["gqa"].graph.initializer] == [t.name for t in graphs["scaled"].graph.initializer]
    session = ort.InferenceSession(str(tmp_path / "scaled" / MODEL_FILE), providers=["CPUExecutionProvider"])
    for P, model in models.items():
        report = check_graph(session, reference_run(model, steps=2), tolerance=1e-4)
        assert report.ok, (P, report)


def test_export_reads_each_config_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny) -> None:
    """`parscale export CKPT --P 1,2,4,8` parses the folder's config.json once, however many P."""
    from parscale import config as config_module
    from parscale.cli import app

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.checkpoint(P=4, tokenizer=True), ckpt)
    init_heads(ckpt, [2, 8], seed=1)
    reads: Counter[str] = Counter()
    read_json = config_module.read_json

    def counted(path: Path, *, missing: str) -> object:
        reads[str(Path(path).resolve())] += 1
        return read_json(path, missing=missing)

    monkeypatch.setattr(config_module, "read_json", counted)
    res = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "out"), "--P", "1,2,4,8",
                                   "--no-validate"])
    assert res.exit_code == 0, res.output
    assert reads[str((ckpt / "config.json").resolve())] == 1, reads


def test_generate_reads_config_once(monkeypatch: pytest.MonkeyPatch, default_int8_export: Path) -> None:
    """`parscale generate EXPORT` parses the export's config.json once (EOS ids and rotary base included),
    on a multi-P export at a P other than its default."""
    from parscale import config as config_module
    from parscale import text as text_module
    from parscale.cli import app

    reads: Counter[str] = Counter()
    read_json, json_object = config_module.read_json, text_module._json_object

    def counted(path: Path, *, missing: str) -> object:
        reads[Path(path).name] += 1
        return read_json(path, missing=missing)

    def counted_object(path: Path) -> object:
        reads[Path(path).name] += 1
        return json_object(path)

    monkeypatch.setattr(config_module, "read_json", counted)
    monkeypatch.setattr(text_module, "_json_object", counted_object)
    res = CliRunner().invoke(app, ["generate", str(default_int8_export), "--prompt", "def f(x):",
                                   "--max-new-tokens", "4", "--P", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert reads["config.json"] == 1, reads
