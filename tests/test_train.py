"""The training recipe (corpus, tokenizer, two stages) and the PyTorch perplexity evaluator."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from parscale.config import ParScaleConfig
from parscale.errors import ParScaleError
from parscale.evaluate import eval_checkpoint, eval_export
from parscale.modeling.checkpoint import load_model
from parscale.modeling.heads import Stream, head_sets, is_head_tensor, load_streams
from parscale.train.corpus import (
    EOS,
    SourceFile,
    collect_sources,
    is_held_out,
    join_documents,
    split_sources,
    write_held_out,
)
from parscale.train.recipe import Recipe, train, train_heads
from parscale.train.tokenizer import eos_id, load_tokenizer, save_tokenizer, train_tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "parscale" / "assets" / "default"


def _small(sources: list[SourceFile], n: int) -> list[SourceFile]:
    """The first n documents, cut to 6 kB each: enough text for a tiny run, fast to tokenize."""
    return [SourceFile(f.rel, f.text[:6000]) for f in sources[:n]]


@pytest.fixture(scope="module")
def sources() -> list[SourceFile]:
    return collect_sources()


def test_corpus_excludes_tests_and_generated_files(sources: list[SourceFile]) -> None:
    rels = [f.rel for f in sources]
    assert len(rels) > 100 and rels == sorted(rels)
    for rel in rels:
        parts = rel.split("/")
        assert not {"test", "tests", "site-packages", "idlelib", "lib2to3"} & set(parts[:-1]), rel
        assert not parts[-1].startswith("_sysconfigdata"), rel
    assert "encodings/cp1252.py" not in rels  # a gencodec.py table
    assert "json/decoder.py" in rels


def test_split_is_deterministic_and_disjoint(sources: list[SourceFile]) -> None:
    train1, held1 = split_sources(sources)
    train2, held2 = split_sources(list(reversed(sources)))
    names1, held_names = {f.rel for f in train1}, {f.rel for f in held1}
    assert names1 == {f.rel for f in train2} and held_names == {f.rel for f in held2}
    assert not names1 & held_names
    assert len(names1) + len(held_names) == len(sources)
    assert 0.02 < len(held_names) / len(sources) < 0.10  # ~5% held out
    # The assignment depends on the path alone, through a stable hash (not Python's salted hash()).
    assert all(is_held_out(rel) for rel in held_names)
    assert is_held_out("json/decoder.py") == is_held_out("json/decoder.py")


def test_write_held_out_joins_documents(tmp_path: Path) -> None:
    files = [SourceFile("a.py", "x = 1\n"), SourceFile("b.py", "y = 2\n")]
    path = write_held_out(tmp_path / "held.txt", files)
    assert path.read_text() == f"x = 1\n{EOS}y = 2\n{EOS}" == join_documents(files)


def test_tokenizer_round_trips_and_saves(tmp_path: Path, sources: list[SourceFile]) -> None:
    tok = train_tokenizer([f.text for f in sources[:40]], vocab_size=600)
    assert tok.get_vocab_size() == 600 and eos_id(tok) == 0
    text = 'def f(x):\n    """Dokumentation ünïcode ✓."""\n    return x ** 2\n' + EOS + "\tpass\n"
    ids = tok.encode(text).ids
    assert ids.count(0) == 1  # the separator is one special token, not its characters
    assert tok.decode(ids, skip_special_tokens=False) == text
    save_tokenizer(tok, tmp_path, model_max_length=512)
    again = load_tokenizer(tmp_path)
    assert again.encode(text).ids == ids
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOS and config["model_max_length"] == 512
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


TINY_RECIPE = Recipe(
    vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, P=2,
    prefix_tokens=4, seq_len=32, steps1=4, batch1=2, warmup1=1, steps2=3, batch2=2, warmup2=1,
    eval_windows=4, bf16_autocast=False,
)


def test_tiny_recipe_freezes_the_backbone(tmp_path: Path, sources: list[SourceFile]) -> None:
    recipe = TINY_RECIPE
    out, backbone_dir = tmp_path / "model", tmp_path / "backbone"
    report = train(out, recipe, sources=_small(sources, 30), backbone_out=backbone_dir)

    cfg, model = load_model(out)
    assert (cfg.P, cfg.parscale_n_tokens, cfg.vocab_size, cfg.eos_token_id) == (2, 4, 400, 0)
    assert ParScaleConfig.load(backbone_dir).P == 1
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file()
    saved = json.loads((out / "training_report.json").read_text())
    assert saved["recipe"]["steps2"] == 3 and saved["environment"]["python"]
    assert math.isfinite(report.held_out_loss_p1) and math.isfinite(report.held_out_loss_pn)
    assert report.stage1["tokens"] == 4 * 2 * 32 and report.stage2["tokens"] == 3 * 2 * 32

    final, stage1 = load_file(out / "model.safetensors"), load_file(backbone_dir / "model.safetensors")
    added = {n for n in final if is_head_tensor(n)}
    assert added == set(final) - set(stage1)
    assert len(added) == 2 * 2 + 4  # prefix_k/v per layer, two Linear layers of the aggregation
    for name, tensor in stage1.items():
        assert torch.equal(final[name], tensor), f"stage 2 changed backbone tensor {name}"
    # ... while the tensors stage 2 trains did move away from their initial values.
    assert final["model.aggregate_layer.2.weight"].abs().sum() > 0  # initialised to zero
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 400) and torch.isfinite(logits).all()


def test_train_heads_adds_head_sets_on_the_frozen_backbone(tmp_path: Path, sources: list[SourceFile]) -> None:
    recipe = dataclasses.replace(TINY_RECIPE, steps1=2, steps2=2)
    out = tmp_path / "model"
    train(out, recipe, sources=_small(sources, 30))
    before = load_file(out / "model.safetensors")
    results = train_heads(out, [4, 8], steps=3, sources=_small(sources, 30))

    assert load_file(out / "model.safetensors").keys() == before.keys()
    assert all(torch.equal(t, load_file(out / "model.safetensors")[n]) for n, t in before.items())
    assert head_sets(out) == [1, 2, 4, 8]
    saved = json.loads((out / "training_report.json").read_text())
    for P in (4, 8):
        heads = load_file(out / f"heads-p{P}.safetensors")
        assert heads and all(is_head_tensor(n) for n in heads)
        assert heads["model.layers.0.self_attn.prefix_k"].shape[0] == P
        assert saved["heads"][str(P)]["held_out_loss"] == results[P]["held_out_loss"]
        assert results[P]["stage2"]["steps"] == 3 and math.isfinite(results[P]["held_out_loss"])
    models = load_streams([Stream(out, P) for P in (1, 2, 4, 8)])
    embed = {P: m.model.embed_tokens.weight for P, (_, m) in models.items()}
    assert len({t.data_ptr() for t in embed.values()}) == 1  # one backbone in memory, shared
    assert torch.equal(embed[1], before["model.embed_tokens.weight"])
    with pytest.raises(ParScaleError, match="P=1 is the backbone itself"):
        train_heads(out, [1], steps=1, sources=_small(sources, 30))
    with pytest.raises(ParScaleError, match="was trained at P=2"):
        train_heads(out, [2], steps=1, sources=_small(sources, 30))


def test_training_is_reproducible(tmp_path: Path, sources: list[SourceFile]) -> None:
    recipe = Recipe(
        vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, P=2, prefix_tokens=2, seq_len=16,
        steps1=2, batch1=2, warmup1=1, steps2=2, batch2=2, warmup2=1, eval_windows=2,
        bf16_autocast=False,
    )
    a = train(tmp_path / "a", recipe, sources=_small(sources, 20))
    b = train(tmp_path / "b", recipe, sources=_small(sources, 20))
    assert a.held_out_loss_pn == b.held_out_loss_pn
    ta, tb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(ta[n], tb[n]) for n in ta)


@pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").is_file(), reason="no default model")
def test_the_default_model_holds_four_p_over_one_backbone() -> None:
    assert head_sets(DEFAULT_MODEL) == [1, 2, 4, 8]
    report = json.loads((DEFAULT_MODEL / "training_report.json").read_text())
    for P in ("2", "8"):
        heads = report["heads"][P]
        assert heads["bytes"] == (DEFAULT_MODEL / heads["file"]).stat().st_size
        assert heads["held_out_loss"] < heads["held_out_loss_init"]
    assert sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir()) < 21.5e6  # the "about 20 MB"


@pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").is_file(), reason="no default model")
def test_default_model_has_finite_perplexity(tmp_path: Path) -> None:
    cfg = ParScaleConfig.load(DEFAULT_MODEL)
    assert cfg.P > 1 and cfg.torch_dtype == "float32"
    text = tmp_path / "sample.txt"
    text.write_text('import os\n\n\ndef main(argv=None):\n    """Run the program."""\n'
                    "    for name in os.listdir('.'):\n        print(name)\n    return 0\n")
    result = eval_checkpoint(DEFAULT_MODEL, text, window=32, stride=16)
    assert result.tokens > 20 and result.bytes == len(text.read_bytes())
    assert np.isfinite(result.nll_per_token)
    # A trained model, not a random one: far below the uniform NLL log(vocab) on Python code.
    assert result.nll_per_token < 0.6 * math.log(cfg.vocab_size)
    assert math.isclose(result.ppl_per_token, math.exp(result.nll_per_token))


@pytest.mark.parametrize("P", [1, 4])
def test_eval_export_matches_eval_checkpoint(
    P: int, tiny_exports: dict[int, tuple[Path, Path]], tmp_path: Path, sources: list[SourceFile]  # noqa: N803
) -> None:
    ckpt, export_dir = tiny_exports[P]  # the session's tiny exports (tests/conftest.py)
    text = write_held_out(tmp_path / "sample.txt", _small(sources, 3))
    a = eval_checkpoint(ckpt, text, window=48, stride=32, max_tokens=300)
    b = eval_export(export_dir, text, window=48, stride=32, max_tokens=300)
    assert a.tokens == b.tokens == 300 and a.bytes == b.bytes > 300
    assert math.isclose(a.nll_per_token, b.nll_per_token, rel_tol=1e-5)
    assert math.isclose(a.bits_per_byte, b.bits_per_byte, rel_tol=1e-5)


def test_train_heads_needs_force_takes_the_lock_and_keeps_every_report_entry(
        tmp_path: Path, sources: list[SourceFile]) -> None:
    """train-heads refuses to replace a head set without force; it holds the folder's lock, so a second run
    fails at once (instead of losing an entry of training_report.json); files are renamed into place."""
    from parscale.locking import FolderLock

    out = tmp_path / "ck"
    small = _small(sources, 30)
    train(out, dataclasses.replace(TINY_RECIPE, steps1=1, steps2=1), sources=small)  # P=2: heads for 4 and 8
    train_heads(out, [4], steps=1, sources=small)
    first = (out / "heads-p4.safetensors").read_bytes()
    with pytest.raises(ParScaleError, match=r"already holds heads-p4\.safetensors; pass --force"):
        train_heads(out, [4, 8], steps=1, sources=small)
    assert (out / "heads-p4.safetensors").read_bytes() == first and not (out / "heads-p8.safetensors").exists()
    with FolderLock(out), pytest.raises(ParScaleError, match="another parscale process is writing"):
        train_heads(out, [8], steps=1, sources=small)
    train_heads(out, [8], steps=1, sources=small)
    train_heads(out, [4], steps=2, sources=small, force=True)
    report = json.loads((out / "training_report.json").read_text())["heads"]
    assert sorted(report) == ["4", "8"] and report["4"]["stage2"]["steps"] == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the lock is gone
    load_streams([Stream(out, P) for P in (2, 4, 8)])  # both are bound to the backbone
