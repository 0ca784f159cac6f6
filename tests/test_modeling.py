"""Independent oracles for the PyTorch ParScale module.

- The plain numpy reference (`reference_numpy.py`, written from the spec alone) reproduces the
  golden outputs in shared/golden/p2_gqa.
- `load_model` + the PyTorch module agree with that reference over P, GQA/MHA, tied/untied heads,
  bf16 storage and sharded weights, on a left-padded batch; and with its KV cache, greedy decoding
  yields exactly the tokens of the reference's no-cache greedy decoding.
- At P=1 the module (and the reference) match Hugging Face transformers' Qwen2ForCausalLM.

Most checkpoints here are random ones whose weights are rescaled ("sharpened") so that attention is
peaked, RMSNorm weights are not all one, q/k/v biases are non-zero, prefixes matter and the
aggregation weights are far from uniform: with the plain std-0.02 initialisation nearly every
softmax is close to uniform and a 1e-4 comparison could not tell most mistakes apart.
`test_fixtures_are_discriminative` checks that this holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_numpy import load_checkpoint, reference_greedy, reference_logits

from parscale.config import ParScaleConfig
from parscale.modeling.checkpoint import load_model, save_checkpoint
from parscale.modeling.random_init import PRESETS, init_checkpoint, make_config, random_model

ATOL_GOLDEN = 1e-3  # golden logits were computed in float32 by another implementation
ATOL = 1e-4  # float32 PyTorch against the float64 reference
TINY = PRESETS["tiny"]  # vocab 512, hidden 64, 2 layers, 4 query heads, 2 KV heads
PAD = 3  # left padding of row 0 in the test batches
N_NEW = 10  # greedy tokens: 1 from the prefill and 9 from cached decode steps


# ----------------------------------------------------------------------------- helpers


def left_padded_batch(seed: int, length: int = 10, pad: int = PAD) -> tuple[np.ndarray, np.ndarray]:
    """A batch of 2: row 0 left-padded by `pad` (pad id 0), row 1 full. int64 ids and mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY["vocab_size"], size=(2, length), dtype=np.int64)
    mask = np.ones((2, length), dtype=np.int64)
    ids[0, :pad] = 0
    mask[0, :pad] = 0
    return ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token = number of real tokens before it (the spec's definition)."""
    return mask.cumsum(-1) - mask


def sharpen_(model: torch.nn.Module, seed: int) -> None:
    """Rescale a random model in place so that every part of the forward pass shows in the logits."""
    gen = torch.Generator().manual_seed(10_000 + seed)

    def normal(p: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + normal(p, 0.2))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(9.0)  # attention scores of order 1: peaked softmax, RoPE matters
            elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                p.copy_(normal(p, 0.3))
            elif name.endswith("prefix_k"):
                p.copy_(normal(p, 1.5))
            elif name.endswith("prefix_v"):
                p.copy_(normal(p, 0.5))
            elif name.startswith("model.aggregate_layer.0."):
                p.mul_(5.0)
            elif name.startswith("model.aggregate_layer.2."):
                p.mul_(30.0)  # aggregation weights far from uniform
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                p.mul_(5.0)  # logits of order 1: clear greedy margins


def build_checkpoint(
    out: Path, *, P: int, kv_heads: int | None = None, tied: bool = False,  # noqa: N803
    dtype: str = "float32", shards: int = 1, prefix: int = 4, seed: int = 0, sharpen: bool = True,
) -> Path:
    """A tiny random checkpoint folder in the published layout.

    Unsharpened checkpoints with the preset's GQA heads come straight from `init_checkpoint`; the
    others are built from `make_config` + `random_model` (rescaled) + `save_checkpoint`.
    """
    if not sharpen and kv_heads is None:
        return init_checkpoint(out, P=P, preset="tiny", prefix=prefix, seed=seed, dtype=dtype,
                               tied=tied, shards=shards)
    overrides = {} if kv_heads is None else {"num_key_value_heads": kv_heads}
    config = make_config("tiny", P=P, prefix=prefix, tied=tied, dtype=dtype, **overrides)
    model = random_model(ParScaleConfig.from_dict(config), seed)
    if sharpen:
        sharpen_(model, seed)
    save_checkpoint(model, config, out, shards=shards)
    return out


def module_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Full-sequence logits of the PyTorch module, no past."""
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        logits, _ = model(ids_t, mask_t, positions_of(mask_t))
    return logits.double().numpy()


def max_diff_real(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Largest |a - b| over the non-padded positions (mask == 1) of (b, s, vocab) logits."""
    assert a.shape == b.shape, (a.shape, b.shape)
    real = mask.astype(bool)
    assert real.any()
    return float(np.abs(a - b)[real].max())


# ----------------------------------------------------------------------------- golden data


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict[str, np.ndarray]:
    with np.load(golden_dir / "cases.npz") as cases:
        return {k: cases[k] for k in cases.files}


def test_reference_matches_golden_logits(golden_dir: Path, golden: dict[str, np.ndarray]) -> None:
    config, weights = load_checkpoint(golden_dir / "ckpt")
    assert config["parscale_n"] == 2 and config["num_key_value_heads"] < config["num_attention_heads"]
    mask = golden["attention_mask"]
    assert (mask == 0).any(), "the golden batch should be left-padded"
    logits = reference_logits(weights, config, golden["input_ids"], mask)
    assert logits.shape == golden["logits"].shape
    diff = max_diff_real(logits, golden["logits"], mask)
    print(f"reference vs golden logits: max |diff| = {diff:.3g}")
    assert diff < ATOL_GOLDEN


def test_reference_matches_golden_greedy(golden_dir: Path, golden: dict[str, np.ndarray]) -> None:
    config, weights = load_checkpoint(golden_dir / "ckpt")
    ids, mask = golden["input_ids"], golden["attention_mask"]
    n_new = golden["greedy_batch"].shape[1] - ids.shape[1]
    assert n_new == 8

    batch = reference_greedy(weights, config, ids, mask, n_new)
    np.testing.assert_array_equal(batch, golden["greedy_batch"])

    single = reference_greedy(weights, config, ids[1:], mask[1:], n_new)
    np.testing.assert_array_equal(single, golden["greedy_single"])


def test_module_matches_golden_logits(golden_dir: Path, golden: dict[str, np.ndarray]) -> None:
    _, model = load_model(golden_dir / "ckpt", torch.float32)
    logits = module_logits(model, golden["input_ids"], golden["attention_mask"])
    diff = max_diff_real(logits, golden["logits"], golden["attention_mask"])
    print(f"module vs golden logits: max |diff| = {diff:.3g}")
    assert diff < ATOL_GOLDEN


# ----------------------------------------------------------------------------- the oracle itself


def test_reference_loader_reads_bf16_and_shards(tmp_path: Path) -> None:
    """The reference's own safetensors reader agrees with safetensors/torch, single file and shards."""
    from safetensors.torch import load_file

    one = build_checkpoint(tmp_path / "one", P=2, dtype="bfloat16")
    sharded = build_checkpoint(tmp_path / "sharded", P=2, dtype="bfloat16", shards=3)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    _, w_one = load_checkpoint(one)
    _, w_sharded = load_checkpoint(sharded)
    expected = {n: t.double().numpy() for n, t in load_file(one / "model.safetensors").items()}
    assert set(w_one) == set(expected) == set(w_sharded)
    for name, arr in expected.items():
        np.testing.assert_array_equal(w_one[name], arr, err_msg=name)
        np.testing.assert_array_equal(w_sharded[name], arr, err_msg=name)


def test_fixtures_are_discriminative(tmp_path: Path) -> None:
    """Mistakes the spec warns about change the sharpened checkpoints' logits far beyond ATOL."""
    config, w = load_checkpoint(build_checkpoint(tmp_path / "ckpt", P=4))
    ids, mask = left_padded_batch(seed=1)
    base = reference_logits(w, config, ids, mask)
    P, h = 4, TINY["hidden_size"]

    def changed(weights: dict[str, np.ndarray], cfg: dict, i: np.ndarray = ids,
                m: np.ndarray = mask) -> float:
        return max_diff_real(reference_logits(weights, cfg, i, m), base, mask)

    # Stream-major instead of hidden-major concatenation before the aggregation layer.
    stream_major = np.array([(j % h) * P + j // h for j in range(h * P)])
    w_agg = dict(w, **{"model.aggregate_layer.0.weight": w["model.aggregate_layer.0.weight"][:, stream_major]})
    # Prefix of the wrong stream.
    w_pre = dict(w)
    for layer in range(TINY["num_hidden_layers"]):
        for kind in ("prefix_k", "prefix_v"):
            name = f"model.layers.{layer}.self_attn.{kind}"
            w_pre[name] = w[name][::-1].copy()
    # Positions counting the padding: the same row shifted right by the pad length.
    shifted_ids = np.concatenate([ids[:, :PAD], ids], axis=1)
    shifted_mask = np.concatenate([np.zeros_like(mask[:, :PAD]), mask], axis=1)
    padded_more = reference_logits(w, config, shifted_ids, shifted_mask)[:, PAD:]

    deltas = {
        "stream-major concat": changed(w_agg, config),
        "prefix of another stream": changed(w_pre, config),
        "no smoothing": changed(w, dict(config, parscale_attn_smooth=0.0)),
        "rope_theta 2x": changed(w, dict(config, rope_theta=2 * config["rope_theta"])),
    }
    print({k: f"{v:.3g}" for k, v in deltas.items()})
    for what, delta in deltas.items():
        assert delta > 10 * ATOL, f"{what} changes the logits by only {delta:.3g}"
    # Sanity of the reference itself: extra left padding leaves the real tokens' logits unchanged.
    assert max_diff_real(padded_more, base, mask) < 1e-10


# ----------------------------------------------------------------------------- module vs reference


@dataclass(frozen=True)
class Case:
    id: str
    P: int
    kv_heads: int | None = None  # None: the preset's GQA (4 query heads, 2 KV heads)
    tied: bool = False
    dtype: str = "float32"
    shards: int = 1
    prefix: int = 4
    sharpen: bool = True


MODULE_CASES = [
    Case("P1-gqa-untied-init", P=1, sharpen=False),
    Case("P1-mha-tied", P=1, kv_heads=4, tied=True),
    Case("P1-gqa-untied-bf16-shards3", P=1, dtype="bfloat16", shards=3),
    Case("P2-gqa-untied-init", P=2, sharpen=False),
    Case("P2-mha-tied-bf16", P=2, kv_heads=4, tied=True, dtype="bfloat16"),
    Case("P3-gqa-tied", P=3, tied=True),
    Case("P3-mha-untied-shards3", P=3, kv_heads=4, shards=3),
    Case("P4-gqa-untied-bf16-shards3", P=4, dtype="bfloat16", shards=3),
    Case("P4-mha-tied", P=4, kv_heads=4, tied=True),
    Case("P8-gqa-tied-bf16", P=8, tied=True, dtype="bfloat16"),
    Case("P8-mha-untied-shards3", P=8, kv_heads=4, shards=3),
]


def build_case(tmp_path: Path, case: Case, seed: int = 0) -> Path:
    return build_checkpoint(
        tmp_path / case.id, P=case.P, kv_heads=case.kv_heads, tied=case.tied, dtype=case.dtype,
        shards=case.shards, prefix=case.prefix, seed=seed, sharpen=case.sharpen,
    )


@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: c.id)
def test_module_matches_reference(tmp_path: Path, case: Case) -> None:
    ckpt = build_case(tmp_path, case, seed=case.P)
    if case.shards > 1:
        assert (ckpt / "model.safetensors.index.json").is_file()
    config, weights = load_checkpoint(ckpt)
    assert ("lm_head.weight" in weights) == (not case.tied)

    cfg, model = load_model(ckpt, torch.float32)
    assert cfg.P == case.P
    assert cfg.num_key_value_heads == (case.kv_heads or TINY["num_key_value_heads"])
    if case.tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    ids, mask = left_padded_batch(seed=case.P)
    expected = reference_logits(weights, config, ids, mask)
    got = module_logits(model, ids, mask)
    diff = max_diff_real(got, expected, mask)
    print(f"{case.id}: module vs reference max |diff| = {diff:.3g} (logit scale {np.abs(expected).max():.3g})")
    assert diff < ATOL


@pytest.mark.parametrize("P", [1, 4], ids=lambda p: f"P{p}")
def test_module_left_padding_leaves_real_tokens_unchanged(tmp_path: Path, P: int) -> None:  # noqa: N803
    """Row 0 of the padded batch gives the same logits as the same tokens with no padding."""
    _, model = load_model(build_checkpoint(tmp_path / "ckpt", P=P), torch.float32)
    ids, mask = left_padded_batch(seed=7)
    padded = module_logits(model, ids, mask)[0, PAD:]
    alone = module_logits(model, ids[:1, PAD:], mask[:1, PAD:])[0]
    diff = float(np.abs(padded - alone).max())
    print(f"P{P}: padded vs unpadded row max |diff| = {diff:.3g}")
    assert diff < ATOL


# ----------------------------------------------------------------------------- KV-cache decoding


DECODE_CASES = [
    Case("P1-gqa-tied", P=1, tied=True),
    Case("P4-gqa-untied-bf16", P=4, dtype="bfloat16"),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.id)
def test_cached_greedy_matches_reference(tmp_path: Path, case: Case) -> None:
    ckpt = build_case(tmp_path, case, seed=11)
    config, weights = load_checkpoint(ckpt)
    _, model = load_model(ckpt, torch.float32)
    ids, mask = left_padded_batch(seed=11)
    s = ids.shape[1]

    mask_t = torch.from_numpy(mask)
    step_logits, tokens = [], []
    with torch.no_grad():
        logits, cache = model(torch.from_numpy(ids), mask_t, positions_of(mask_t))  # prefill
        for step in range(N_NEW):
            last = logits[:, -1]
            step_logits.append(last.double().numpy())
            nxt = last.argmax(-1)
            tokens.append(nxt.numpy())
            if step == N_NEW - 1:
                break
            position = mask_t.sum(-1, keepdim=True)  # real tokens before the new one
            mask_t = torch.cat([mask_t, torch.ones_like(mask_t[:, :1])], dim=1)
            logits, cache = model(nxt[:, None], mask_t, position, cache)
            assert logits.shape == (2, 1, TINY["vocab_size"])
    cached = np.concatenate([ids, np.stack(tokens, axis=1)], axis=1)

    expected = reference_greedy(weights, config, ids, mask, N_NEW)
    np.testing.assert_array_equal(cached, expected)

    # The logits behind each choice too: position t of the final sequence predicts token t + 1.
    full_mask = np.concatenate([mask, np.ones((2, N_NEW), dtype=np.int64)], axis=1)
    ref = reference_logits(weights, config, expected, full_mask)[:, s - 1:s - 1 + N_NEW]
    diff = float(np.abs(np.stack(step_logits, axis=1) - ref).max())
    print(f"{case.id}: cached decode vs reference logits max |diff| = {diff:.3g}")
    assert diff < ATOL


# ----------------------------------------------------------------------------- P=1 vs transformers


def published_qwen2_config(*, tied: bool, rope_theta: float) -> dict:
    """A config.json as published Qwen2/Qwen2.5 checkpoints have it (model_type qwen2, top-level rope_theta)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": TINY["vocab_size"],
        "hidden_size": TINY["hidden_size"],
        "intermediate_size": TINY["intermediate_size"],
        "num_hidden_layers": TINY["num_hidden_layers"],
        "num_attention_heads": TINY["num_attention_heads"],
        "num_key_value_heads": TINY["num_key_value_heads"],
        "max_position_embeddings": TINY["max_position_embeddings"],
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 21,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "transformers_version": "4.43.1",
    }


def hf_qwen2(config: dict, seed: int) -> torch.nn.Module:
    """transformers' Qwen2ForCausalLM (eager attention) holding our sharpened random weights."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.Qwen2Config(
        **{k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "torch_dtype")},
        attn_implementation="eager",
    )
    hf = transformers.Qwen2ForCausalLM(hf_config).eval()
    ours = random_model(ParScaleConfig.from_dict(config), seed)
    sharpen_(ours, seed)
    hf.load_state_dict(ours.state_dict(), strict=True)  # the tensor names are the same
    assert hf.config._attn_implementation == "eager"
    if config["tie_word_embeddings"]:
        assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    return hf


def hf_logits(hf: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        out = hf(input_ids=ids_t, attention_mask=mask_t, position_ids=positions_of(mask_t), use_cache=False)
    return out.logits.double().numpy()


@pytest.mark.parametrize(
    ("tied", "rope_theta"), [(False, 10000.0), (True, 1000000.0)], ids=["untied", "tied"]
)
def test_p1_matches_transformers_qwen2(tmp_path: Path, tied: bool, rope_theta: float) -> None:
    config = published_qwen2_config(tied=tied, rope_theta=rope_theta)
    hf = hf_qwen2(config, seed=5)
    # A checkpoint written by transformers (tied: no lm_head.weight), with the published config.json.
    ckpt = tmp_path / "qwen2"
    hf.save_pretrained(ckpt)
    (ckpt / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    cfg, model = load_model(ckpt, torch.float32)
    assert (cfg.model_type, cfg.P, cfg.n_prefix) == ("qwen2", 1, 0)
    assert cfg.rope_theta == rope_theta and cfg.tie_word_embeddings == tied
    assert not hasattr(model.model, "aggregate_layer")

    ids, mask = left_padded_batch(seed=5)
    expected = hf_logits(hf, ids, mask)
    ref_config, weights = load_checkpoint(ckpt)
    assert ("lm_head.weight" in weights) == (not tied)
    diffs = {
        "module": max_diff_real(module_logits(model, ids, mask), expected, mask),
        "numpy reference": max_diff_real(reference_logits(weights, ref_config, ids, mask), expected, mask),
    }
    print(f"P1 {'tied' if tied else 'untied'} vs transformers: {diffs}")
    for what, diff in diffs.items():
        assert diff < ATOL, f"{what} vs transformers: max |diff| {diff:.3g}"


def test_p1_checkpoint_saved_by_transformers5(tmp_path: Path) -> None:
    """A Qwen2 checkpoint saved as-is by the installed transformers (its own config.json)."""
    hf = hf_qwen2(published_qwen2_config(tied=True, rope_theta=1000000.0), seed=6)
    ckpt = tmp_path / "qwen2"
    hf.save_pretrained(ckpt)
    saved = json.loads((ckpt / "config.json").read_text())
    if "rope_theta" in saved:
        pytest.skip("this transformers version writes a top-level rope_theta")
    assert saved["rope_parameters"]["rope_theta"] == 1000000.0
    _, model = load_model(ckpt, torch.float32)
    ids, mask = left_padded_batch(seed=6)
    diff = max_diff_real(module_logits(model, ids, mask), hf_logits(hf, ids, mask), mask)
    assert diff < ATOL, f"module vs transformers: max |diff| {diff:.3g}"
