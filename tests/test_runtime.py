"""The runtime (parscale.runtime): exactness against PyTorch, sampling, streaming, stopping, threads,
providers, input checks."""

from __future__ import annotations

import inspect
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from runtime_helpers import TEXTS, all_nodes, byte_level_tokenizer, decode_step_ops, torch_greedy

from parscale.driver import CPU, CUDA
from parscale.errors import ParScaleError
from parscale.modeling.checkpoint import load_model
from parscale.runtime import Model
from parscale.runtime.engine import Engine
from parscale.runtime.sampling import Sampler, SamplingConfig, nucleus, softmax, top_k_filter
from parscale.text import IncrementalDecoder, Tokenizer

PROMPTS = [[5, 17, 300, 42, 7, 99, 3], [11, 12, 400]]  # different lengths: the second is left-padded


@pytest.fixture(scope="module")
def models(tiny_exports: dict[int, tuple[Path, Path]]) -> dict[int, Model]:
    return {P: Model.load(export, provider="cpu") for P, (_, export) in tiny_exports.items()}


@pytest.fixture(scope="module")
def references(tiny_exports: dict[int, tuple[Path, Path]]) -> dict[int, torch.nn.Module]:
    return {P: load_model(ckpt, torch.float32)[1] for P, (ckpt, _) in tiny_exports.items()}


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("P", [1, 4])
def test_greedy_matches_pytorch_batch_1(models, references, P):  # noqa: N803
    n = 12
    expected = torch_greedy(references[P], PROMPTS[:1], n)[0]
    r = models[P].generate(prompt_ids=PROMPTS[0], max_new_tokens=n, ignore_eos=True)
    assert r.generated_ids == expected
    assert r.finish_reason == "length"


@pytest.mark.parametrize("P", [1, 4])
def test_greedy_matches_pytorch_left_padded_batch(models, references, P):  # noqa: N803
    n = 12
    expected = torch_greedy(references[P], PROMPTS, n)
    results = models[P].generate(PROMPTS, max_new_tokens=n, ignore_eos=True)
    assert [r.generated_ids for r in results] == expected
    # Padding must not change a row: the short prompt alone gives the same tokens.
    alone = models[P].generate(prompt_ids=PROMPTS[1], max_new_tokens=n, ignore_eos=True)
    assert alone.generated_ids == expected[1]


def test_eos_stops_a_row(models):
    m = models[4]
    first = m.generate(prompt_ids=PROMPTS[0], max_new_tokens=6, ignore_eos=True).generated_ids
    saved = m.eos_ids
    try:
        m.eos_ids = [first[2]]
        r = m.generate(prompt_ids=PROMPTS[0], max_new_tokens=6)
    finally:
        m.eos_ids = saved
    assert r.finish_reason == "eos"
    assert r.generated_ids == first[: first.index(first[2]) + 1]  # the EOS token is the last one


# ----------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible(models):
    m = models[4]
    kwargs = dict(max_new_tokens=16, temperature=1.2, top_k=50, top_p=0.95, repetition_penalty=1.3,
                  ignore_eos=True)
    a = m.generate(prompt_ids=PROMPTS[0], seed=7, **kwargs)
    b = m.generate(prompt_ids=PROMPTS[0], seed=7, **kwargs)
    c = m.generate(prompt_ids=PROMPTS[0], seed=8, **kwargs)
    assert a.generated_ids == b.generated_ids
    assert a.generated_ids != c.generated_ids


def test_top_k_and_top_p_filters():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 1000)).astype(np.float32)
    kept = top_k_filter(logits, 10)
    assert (np.isfinite(kept).sum(axis=1) == 10).all()
    assert (kept.argmax(axis=1) == logits.argmax(axis=1)).all()
    probs = softmax(logits * 4)
    for row in probs:
        ids, p = nucleus(row, 0.9)
        order = np.argsort(-row, kind="stable")
        cum = np.cumsum(row[order])
        n = int(np.searchsorted(cum, 0.9)) + 1
        assert list(ids) == list(order[:n])  # the exact nucleus: smallest prefix with mass >= 0.9
        assert np.allclose(p, row[ids])


def test_repetition_penalty_and_greedy():
    logits = np.array([[2.0, 1.9, -1.0, 0.5]], dtype=np.float32)
    s = Sampler(SamplingConfig(repetition_penalty=2.0), vocab_size=4, batch=1)
    assert s(logits.copy())[0] == 0
    s.observe(np.array([[0]]))
    assert s(logits.copy())[0] == 1  # 2.0 / 2 = 1.0 < 1.9


def test_sampling_config_rejects_bad_values():
    for kwargs in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(repetition_penalty=0),
                   dict(greedy=True, temperature=0.5)):
        with pytest.raises(ParScaleError):
            SamplingConfig(**kwargs)


# ----------------------------------------------------------------------------- text and streaming


def test_incremental_decoder_never_splits_characters(tmp_path):
    tok = Tokenizer(byte_level_tokenizer(tmp_path / "tokenizer.json"))
    text = TEXTS[3]
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 2  # the non-ASCII characters are split over tokens
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_prompt_and_streaming_equal_generate(models):
    m = models[4]
    assert m.tokenizer is not None
    r = m.generate("def f(x):", max_new_tokens=24, ignore_eos=True)
    pieces = list(m.stream("def f(x):", max_new_tokens=24, ignore_eos=True))
    assert "".join(pieces) == r.text
    assert r.text == m.decode(r.generated_ids)
    assert r.prompt_tokens == len(m.encode("def f(x):"))
    events = list(m.stream_tokens("def f(x):", max_new_tokens=24, ignore_eos=True))
    assert [e.token_id for e in events] == r.generated_ids
    assert "".join(e.text for e in events) == r.text
    assert [e.result is not None for e in events] == [False] * 23 + [True]  # only the last one
    last = events[-1].result
    assert (last.generated_ids, last.text, last.finish_reason, last.prompt_tokens) == (
        r.generated_ids, r.text, "length", r.prompt_tokens)
    assert last.timings.decode_steps == 23 and last.timings.time_to_first_token_s > 0


def test_generate_and_the_streams_take_the_same_explicit_options():
    params = {name: list(inspect.signature(getattr(Model, name)).parameters.values())
              for name in ("generate", "stream", "stream_tokens")}
    assert params["generate"] == params["stream"] == params["stream_tokens"]
    assert not [p for p in params["generate"] if p.kind is inspect.Parameter.VAR_KEYWORD]
    assert [p.name for p in params["generate"]][1:] == [
        "prompt", "prompt_ids", "options", "max_new_tokens", "greedy", "temperature", "top_k", "top_p",
        "repetition_penalty", "seed", "stop", "ignore_eos", "P"]


def test_one_model_serves_four_threads_at_once(models):
    """Calls share nothing mutable: each of 4 concurrent threads gets what its prompt gives alone.

    The streaming threads step in lockstep (a barrier after every token), so all four caches are
    alive at once and every decode step of one call falls between two steps of the others.
    """
    m = models[4]
    prompts: list = ["def f(x):", "hello world", [5, 17, 300, 42, 7, 99, 3], [11, 12, 400]]
    n = 16

    def alone(prompt):
        return m.generate(prompt, max_new_tokens=n, greedy=True, ignore_eos=True)

    expected = [alone(p) for p in prompts]
    assert len({tuple(r.generated_ids) for r in expected}) == len(prompts)  # else a mix-up could go unseen
    barrier = threading.Barrier(len(prompts))

    def lockstep(prompt):
        events = []
        for event in m.stream_tokens(prompt, max_new_tokens=n, greedy=True, ignore_eos=True):
            events.append(event)
            barrier.wait(timeout=60)
        return events

    with ThreadPoolExecutor(len(prompts)) as pool:
        streamed = list(pool.map(lockstep, prompts))
        repeated = list(pool.map(lambda p: [alone(p) for _ in range(3)], prompts))
    for want, events, again in zip(expected, streamed, repeated, strict=True):
        assert [e.token_id for e in events] == want.generated_ids
        assert "".join(e.text for e in events) == want.text
        assert events[-1].result is not None and events[-1].result.generated_ids == want.generated_ids
        assert [r.generated_ids for r in again] == [want.generated_ids] * 3


def test_stop_string_cuts_text_and_stream(models):
    m = models[1]
    full = m.generate("hello", max_new_tokens=30, ignore_eos=True).text
    assert full and len(full) > 6
    stop = full[3:6]
    r = m.generate("hello", max_new_tokens=30, ignore_eos=True, stop=["zzzz-never", stop])
    assert r.finish_reason == "stop"
    assert r.text == full[: full.find(stop)]
    assert "".join(m.stream("hello", max_new_tokens=30, ignore_eos=True, stop=stop)) == r.text


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompt_ids=[1, 2, 512]), "outside the vocabulary"),
        (dict(prompt_ids=[-1]), "outside the vocabulary"),
        (dict(prompt_ids=[]), "empty"),
        (dict(prompt=""), "empty"),
        (dict(prompt=[[1, 2], []]), "empty"),
        (dict(prompt_ids=[1, 2], max_new_tokens=511), "context length of 512"),
        (dict(prompt_ids=[1, 2], max_new_tokens=0), "max_new_tokens"),
        (dict(), "exactly one"),
        (dict(prompt_ids=[1], temperature=-1.0), "temperature"),
    ],
)
def test_bad_generation_input(models, kwargs, message):
    with pytest.raises(ParScaleError, match=message):
        models[4].generate(**kwargs)


def test_not_an_export(tmp_path, tiny_exports):
    with pytest.raises(ParScaleError, match="does not exist"):
        Model.load(tmp_path / "missing")
    with pytest.raises(ParScaleError, match="not a parscale export"):
        Model.load(tmp_path)
    with pytest.raises(ParScaleError, match="not a parscale export"):
        Model.load(tiny_exports[4][0])  # a checkpoint, not an export


def test_manifest_mismatch(tmp_path, tiny_exports):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_exports[4][1], broken)
    with open(broken / "model.onnx", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ParScaleError, match=r"model\.onnx has 1000 bytes"):
        Model.load(broken)
    (broken / "model.onnx").unlink()
    with pytest.raises(ParScaleError, match="missing"):
        Model.load(broken)


def test_corrupt_model_with_matching_size(tmp_path, tiny_exports):
    broken = tmp_path / "corrupt"
    shutil.copytree(tiny_exports[4][1], broken)
    size = (broken / "model.onnx").stat().st_size
    (broken / "model.onnx").write_bytes(b"\0" * size)
    with pytest.raises(ParScaleError, match=r"onnxruntime cannot load|sha256"):
        Model.load(broken)
    with pytest.raises(ParScaleError, match="sha256"):
        Model.load(broken, verify_checksums=True)


def test_provider_names(tiny_exports):
    with pytest.raises(ParScaleError, match="auto, cpu or cuda"):
        Model.load(tiny_exports[4][1], provider="tpu")
    m = Model.load(tiny_exports[4][1], provider="cpu")
    assert (m.provider, m.device, m.session.get_providers()) == (CPU, "cpu", [CPU])


HAS_CUDA = CUDA in ort.get_available_providers()


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA: test_cuda_runs_the_graph_like_cpu runs instead")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_cuda_is_refused_or_falls_back_without_a_usable_gpu(tiny_exports, monkeypatch):
    export = tiny_exports[4][1]
    with pytest.raises(ParScaleError, match="install onnxruntime-gpu"):
        Model.load(export, provider="cuda")
    assert Model.load(export, provider="auto").provider == CPU
    # onnxruntime-gpu whose CUDA cannot start (no GPU, missing libraries): it lists the provider, but
    # the session comes up without it. 'auto' must fall back to CPU and 'cuda' must say why not.
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    m = Model.load(export, provider="auto")
    assert (m.provider, m.device) == (CPU, "cpu")
    assert len(m.generate(prompt_ids=PROMPTS[0], max_new_tokens=3, ignore_eos=True).generated_ids) == 3
    with pytest.raises(ParScaleError, match="could not initialise CUDA"):
        Model.load(export, provider="cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu")
def test_cuda_runs_the_graph_like_cpu(tiny_exports):
    """On CUDA the cache stays on the GPU, and prefill and a cached decode step give CPU's logits."""
    export = tiny_exports[4][1]
    try:
        gpu = Model.load(export, provider="cuda")
    except ParScaleError as e:
        if "could not initialise CUDA" in str(e):
            pytest.skip(f"onnxruntime-gpu is installed but CUDA is not usable here: {e}")
        raise
    assert (gpu.provider, gpu.device) == (CUDA, "cuda") and CUDA in gpu.session.get_providers()
    cpu = Model.load(export, provider="cpu")
    ids = np.array([PROMPTS[0]], np.int64)
    mask = np.ones((1, ids.shape[1] + 1), np.int64)
    logits = {}
    for m in (cpu, gpu):
        engine = Engine(m.session, m.info, m.provider)
        engine.reset(1)
        first = engine.step(ids, mask[:, :-1], np.arange(ids.shape[1])[None]).copy()
        token = first.argmax(-1)[:, None]
        second = engine.step(token, mask, np.array([[ids.shape[1]]])).copy()
        assert {v.device_name().lower() for v in engine.cache} == {m.device}
        logits[m.device] = (first, second, int(token[0, 0]))
        engine.release()
    for want, got in zip(logits["cpu"][:2], logits["cuda"][:2], strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * float(np.abs(want).max()))
    assert logits["cpu"][2] == logits["cuda"][2]
    r = gpu.generate(prompt_ids=PROMPTS[0], max_new_tokens=8, ignore_eos=True)
    assert len(r.generated_ids) == 8 and r.finish_reason == "length"


def test_text_needs_tokenizer(tmp_path, tiny_exports):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_exports[4][1], bare)
    manifest = json.loads((bare / "parscale.json").read_text())
    del manifest["files"]["tokenizer.json"]
    (bare / "tokenizer.json").unlink()
    (bare / "parscale.json").write_text(json.dumps(manifest))
    m = Model.load(bare)
    with pytest.raises(ParScaleError, match="token ids"):
        m.generate("hello")
    r = m.generate(prompt_ids=[1, 2, 3], max_new_tokens=3, ignore_eos=True)
    assert r.text is None and len(r.generated_ids) == 3
    with pytest.raises(ParScaleError, match="streaming text needs one"):
        m.stream(prompt_ids=[1, 2, 3])
    events = list(m.stream_tokens(prompt_ids=[1, 2, 3], max_new_tokens=3, ignore_eos=True))
    assert [e.token_id for e in events] == r.generated_ids and {e.text for e in events} == {""}
    assert events[-1].result is not None and events[-1].result.text is None


def test_streams_take_one_prompt_and_check_input_at_the_call(models):
    m = models[4]
    for entry in (m.stream, m.stream_tokens):  # refused when called, before any iteration
        with pytest.raises(ParScaleError, match="one prompt"):
            entry(PROMPTS, max_new_tokens=2)
        with pytest.raises(ParScaleError, match="max_new_tokens"):
            entry(prompt_ids=[1], max_new_tokens=0)


def test_exports_are_the_fused_graph(tiny_exports):
    """Per layer: one packed QKV and one packed gate/up projection, GroupQueryAttention with the P
    streams as heads (in an `If` on the first step when there is a prefix), fused norms; the cache's
    prefix rows are recorded for the runtime."""
    import onnx

    from parscale.driver import GraphInfo, open_session

    for P in (1, 4):
        path = tiny_exports[P][1] / "model.onnx"
        proto = onnx.load(str(path), load_external_data=False)
        ops = [n.op_type for n in proto.graph.node]
        everywhere = [n.op_type for n in all_nodes(proto.graph)]
        layers = 2
        assert everywhere.count("GroupQueryAttention") == layers * (2 if P > 1 else 1)  # first step, decode
        assert ops.count("If") == (layers + 1 if P > 1 else 0)  # each layer's attention; the first step's values
        assert ops.count("MatMul") == 4 * layers + 1 + 3 * (P > 1)  # qkv, o, gate_up, down; LM head; mixing
        assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers  # the first norm has no residual yet
        assert everywhere.count("Softmax") == (P > 1)  # the aggregation weights only: attention is fused
        gqa = next(n for n in all_nodes(proto.graph) if n.op_type == "GroupQueryAttention")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
        assert (attrs["num_heads"], attrs["kv_num_heads"], attrs["do_rotary"]) == (P * 4, P * 2, 1)
        assert len(everywhere) <= 40 * layers + 60  # the traced graph had about 50 per layer
        info = GraphInfo.of(open_session(path))
        assert info.prefix_rows == (8 if P > 1 else 0)  # TinyFactory: prefix 8


@pytest.mark.parametrize("P", [1, 4])
def test_a_decode_step_does_no_prefix_work(tiny_exports, P):  # noqa: N803
    """After the first step no node touches the prefix: no prefix rows expanded, rotated or concatenated
    in front of the keys, values and queries, no zero rows sliced off the attention output. What a
    layer runs at decode: norm, QKV projection, (at P > 1: split into q/k/v, three views, the `If`)
    GroupQueryAttention, (a view,) output projection, norm, gate/up projection, split, SiLU, down."""
    ops = decode_step_ops(tiny_exports[P][1] / "model.onnx")
    layers = 2
    assert ops.count("GroupQueryAttention") == layers
    assert "RotaryEmbedding" not in ops
    # What remains is computed once per step for every layer (the embedded model's 4 layers run the
    # same counts): the padding bias, the GQA lengths, the streams' fan-out, the kept positions and
    # the last position's logits.
    assert ops.count("Concat") <= 4 and ops.count("Expand") <= 4 and ops.count("Slice") <= 3, ops
