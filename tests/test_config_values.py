"""config.json values are checked in one place (ParScaleConfig.check), at export and at load alike, and the
exporter refuses source files a runtime could not use (a tokenizer larger than the vocabulary, several
checkpoint folders that disagree on their tokenizer or generation config)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parscale.cli import DEFAULT_MODEL
from parscale.config import MAX_CONTEXT, ParScaleConfig
from parscale.errors import ParScaleError
from parscale.exporter.pipeline import export
from parscale.runtime import Model

BASE = json.loads((DEFAULT_MODEL / "config.json").read_text())

# Values that are the wrong type for every field (a bool is no number, "512" no integer).
WRONG_TYPE = st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "parscale_n", "parscale_n_tokens")
FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "parscale_attn_smooth")

# field -> values a runtime cannot use; each must be refused naming the field (the examples first).
BAD = {
    "max_position_embeddings": [0, -1, "512", 1e12, 10**12, 512.0, True, MAX_CONTEXT + 1],
    "tie_word_embeddings": ["false", "true", 0, 1, []],
    "rms_norm_eps": [0, -1e-6, "1e-6", math.nan, math.inf, True, 1.5],
    "rope_theta": [0, -1.0, "10000", math.nan, True],
    "parscale_n": [True, 0, -1, "4", 4.0, 10**9],
    "parscale_n_tokens": [0, -1, True, "16", 1.5, 10**9],
    "parscale_attn_smooth": ["0.01", math.nan, -0.5, 1.5, True],
    "vocab_size": [0, "4096", 4096.0, True, 2**40],
    "hidden_size": ["256", 256.5, True],
    "num_attention_heads": [0, 3.0],
    "num_key_value_heads": [0, True],
    "num_hidden_layers": [0, 10**7],
    "torch_dtype": [5, "int8", []],
    "bos_token_id": [-1, "0", True, 1.5, 4096, 10**9],
    "eos_token_id": [-1, "0", [0, "1"], True, [], 4096, [0, 10**9]],
    "use_sliding_window": ["false", 0],
    "head_dim": [-2, "64", True],
}


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, vs in BAD.items() for v in vs],
                         ids=lambda x: repr(x)[:20])
def test_every_bad_value_is_refused_naming_its_field(field, value):
    with pytest.raises(ParScaleError, match=rf"config\.json: {field} must be"):
        ParScaleConfig.from_dict({**BASE, field: value})


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(INT_FIELDS + FLOAT_FIELDS + ("tie_word_embeddings",)), value=WRONG_TYPE)
def test_wrong_types_are_refused_naming_the_field(field, value):
    if field == "tie_word_embeddings" and isinstance(value, bool):
        return  # its one valid type
    with pytest.raises(ParScaleError, match=field):
        ParScaleConfig.from_dict({**BASE, field: value})


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(INT_FIELDS), value=st.integers(min_value=-(2**70), max_value=2**70))
def test_an_integer_field_is_accepted_or_refused_by_name_never_otherwise(field, value):
    """Whatever integer a field holds, loading either succeeds with that value or names the field."""
    try:
        cfg = ParScaleConfig.from_dict({**BASE, field: value})
    except ParScaleError as e:
        assert field in str(e) or "multiple of num_key_value_heads" in str(e) or "head_dim" in str(e)
    else:
        assert getattr(cfg, field) == value


@settings(max_examples=100, deadline=None)
@given(field=st.sampled_from(FLOAT_FIELDS), value=st.floats(allow_nan=True, allow_infinity=True))
def test_a_float_field_is_accepted_or_refused_by_name(field, value):
    try:
        cfg = ParScaleConfig.from_dict({**BASE, field: value})
    except ParScaleError as e:
        assert field in str(e)
    else:
        assert math.isfinite(getattr(cfg, field)) and getattr(cfg, field) >= 0


def _rewrite(export_dir: Path, name: str, text: str) -> None:
    """Replace a file of an export and its manifest entry (size and sha256), as a careful editor would."""
    (export_dir / name).write_text(text)
    manifest = json.loads((export_dir / "parscale.json").read_text())
    data = (export_dir / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (export_dir / "parscale.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("field", "value"), [("rms_norm_eps", "1e-6"), ("tie_word_embeddings", "false"),
                                              ("max_position_embeddings", 10**12)])
def test_the_runtime_refuses_what_the_exporter_refuses(tiny_exports, tmp_path, field, value):
    """The same check runs at load: an export whose config.json was edited is refused naming the field."""
    edited = tmp_path / "edited"
    shutil.copytree(tiny_exports[1][1], edited)
    config = json.loads((edited / "config.json").read_text())
    _rewrite(edited, "config.json", json.dumps({**config, field: value}))
    with pytest.raises(ParScaleError, match=rf"config\.json: {field} must be"):
        Model.load(edited)


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.checkpoint(P=1, seed=1, tokenizer=True), ckpt)  # 512 ids
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.json", ckpt / "tokenizer.json")  # 4096 tokens
    with pytest.raises(ParScaleError, match=r"tokenizer\.json has 4096 tokens but the model's vocabulary has 512"):
        export(ckpt, tmp_path / "out", validate=False)
    assert not (tmp_path / "out").exists()


def _p2_folder(dest: Path, edit=None) -> Path:  # type: ignore[no-untyped-def]
    """The embedded model's backbone with its P=2 head set, as a checkpoint folder of its own."""
    from safetensors.torch import load_file, save_file

    from parscale.modeling.heads import is_head_tensor

    shutil.copytree(DEFAULT_MODEL, dest)
    for f in dest.glob("heads-p*.safetensors"):
        f.unlink()
    weights = {n: t for n, t in load_file(DEFAULT_MODEL / "model.safetensors").items() if not is_head_tensor(n)}
    save_file(weights | load_file(DEFAULT_MODEL / "heads-p2.safetensors"), dest / "model.safetensors")
    (dest / "config.json").write_text(json.dumps({**BASE, "parscale_n": 2}))
    if edit is not None:
        edit(dest)
    return dest


def _other_eos(d: Path) -> None:
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 7}))


def _other_tokenizer(d: Path) -> None:
    tok = json.loads((d / "tokenizer.json").read_text())
    first = next(iter(tok["model"]["vocab"]))
    tok["model"]["vocab"][first + "x"] = tok["model"]["vocab"].pop(first)
    (d / "tokenizer.json").write_text(json.dumps(tok))


@pytest.mark.parametrize(("edit", "message"), [
    (_other_eos, r"generation_config\.json differs"),
    (_other_tokenizer, r"tokenizer\.json differs"),
    (lambda d: (d / "tokenizer.json").unlink(), r"tokenizer\.json is only in"),
    (lambda d: (d / "tokenizer_config.json").write_text("{}"), r"tokenizer_config\.json differs"),
], ids=["generation_config", "tokenizer", "missing-tokenizer", "tokenizer_config"])
def test_folders_exported_together_must_agree_on_their_shared_files(tmp_path, edit, message):
    """Several folders share one tokenizer and generation config in the export: the first no longer wins."""
    other = _p2_folder(tmp_path / "p2", edit)
    with pytest.raises(ParScaleError, match=message):
        export([DEFAULT_MODEL, other], tmp_path / "out", validate=False)
    assert not (tmp_path / "out").exists()


@settings(max_examples=3, deadline=None)
@given(indent=st.sampled_from([None, 1, 4]))
def test_agreeing_folders_pass_the_check_whatever_their_json_formatting(tmp_path_factory, indent):
    from parscale.exporter.files.sources import check_sources

    other = _p2_folder(tmp_path_factory.mktemp("agree") / "p2")
    config = json.loads((other / "generation_config.json").read_text())
    (other / "generation_config.json").write_text(json.dumps(config, indent=indent))
    check_sources([DEFAULT_MODEL, other], ParScaleConfig.load(DEFAULT_MODEL))
