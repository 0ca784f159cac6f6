"""Loading verifies an export by default; inputs are type-checked; arguments share one validation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from runtime_helpers import edit_manifest, rehash

from parscale.args import available_cpus, check_seed, check_threads, check_window
from parscale.cli.options import parse_ids as _parse_ids
from parscale.errors import ParScaleError
from parscale.manifest import MANIFEST, MODEL_FILE, Manifest
from parscale.runtime import Model
from parscale.runtime.finite_weights import find_nonfinite


@pytest.fixture
def export(tmp_path, tiny_exports) -> Path:
    """A private copy of the tiny P=4 export, free to damage."""
    dst = tmp_path / "export"
    shutil.copytree(tiny_exports[4][1], dst)
    return dst


def poison(folder: Path, name: str, value: float, external: bool = False) -> None:
    model = onnx.load(folder / MODEL_FILE)
    for t in model.graph.initializer:
        if t.name == name:
            a = numpy_helper.to_array(t).copy()
            a.flat[min(100, a.size - 1)] = value  # in the embedding: row 1, a token of the prompts below
            t.CopyFrom(numpy_helper.from_array(a, name))
    if external:  # the layout of exports above 64 MB: weights in model.onnx.data
        onnx.save_model(model, folder / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=MODEL_FILE + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, folder / MODEL_FILE)
    rehash(folder)


def flip_weight_byte(folder: Path) -> None:
    """Flip the lowest bit of a (random) prefix key in model.onnx: the file still parses."""
    data = bytearray((folder / MODEL_FILE).read_bytes())
    name = "model.layers.0.self_attn.prefix_k"
    weight = next(t for t in onnx.load(folder / MODEL_FILE).graph.initializer if t.name == name)
    at = data.find(weight.raw_data)
    assert at > 0 and data.count(weight.raw_data) == 1
    data[at] ^= 0x01  # the lowest mantissa byte of a float: a finite, slightly different weight
    (folder / MODEL_FILE).write_bytes(bytes(data))


def test_a_flipped_byte_of_the_same_size_is_refused(export):
    flip_weight_byte(export)
    with pytest.raises(ParScaleError, match=r"model.onnx does not match its sha256"):
        Model.load(export)
    Model.load(export, verify=False)  # the opt-out skips hashing (sizes still match)


@pytest.mark.parametrize(("name", "external"), [
    ("model.layers.1.self_attn.qkv_proj.bias", False),
    ("model.embed_tokens.weight", True),  # stored in model.onnx.data
], ids=["embedded", "external-data"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(export, value, name, external):
    poison(export, name, value, external)
    with pytest.raises(ParScaleError, match=rf"weight '{name}' holds NaN or Inf"):
        Model.load(export)
    # Without verification the engine still refuses to emit tokens from NaN logits.
    m = Model.load(export, verify=False)
    with pytest.raises(ParScaleError, match="NaN/Inf logits"):
        m.generate(prompt_ids=[1, 2, 3], max_new_tokens=3)


def test_finite_export_scans_clean(tiny_exports):
    assert find_nonfinite(tiny_exports[4][1] / MODEL_FILE) is None


@pytest.mark.slow
def test_nan_checkpoint_is_refused_by_export_even_without_validation(tmp_path, tiny_exports):
    """The issue's case: NaN in a checkpoint, `export --no-validate`: refused while the checkpoint is read,
    naming the tensor (an export whose own weights were damaged afterwards is refused at load, above)."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_exports[1][0], ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, ckpt / "model.safetensors")
    run = [sys.executable, "-m", "parscale"]
    r = subprocess.run([*run, "export", str(ckpt), "-o", str(tmp_path / "out"), "--no-validate"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "model.norm.weight" in r.stderr and "NaN or infinite" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("key", "value", "words"), [
    ("P", 3, ["P=3", "config.json says 4"]),
    ("max_position_embeddings", 5000, ["max_position_embeddings=5000", "says 512"]),
    ("vocab_size", 4096, ["vocab_size=4096", "says 512"]),
    ("cache_heads", 2, ["cache_heads=2", "says 8"]),
    ("num_hidden_layers", 3, ["num_hidden_layers=3", "says 2"]),
    ("head_dim", 32, ["head_dim=32", "says 16"]),
    ("vocab_size", None, ["vocab_size=None", "positive integers"]),
    ("P", "4", ["P='4'", "positive integers"]),
    ("P", True, ["P=True", "positive integers"]),
])
def test_edited_manifest_fields_are_cross_checked(export, key, value, words):
    edit_manifest(export, lambda m: m["model"].__setitem__(key, value))
    with pytest.raises(ParScaleError) as e:
        Model.load(export)
    for w in words:
        assert w in str(e.value)


def test_manifest_checked_against_the_graph_when_config_agrees(export):
    """Edit config.json the same way (and rehash): the graph itself still disagrees."""
    edit_manifest(export, lambda m: m["model"].__setitem__("vocab_size", 600))
    cfg = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**cfg, "vocab_size": 600}))
    rehash(export)
    with pytest.raises(ParScaleError, match=r"vocab_size=600 but model.onnx's metadata says 512"):
        Model.load(export)


@pytest.mark.parametrize("files", [None, {"../escape": {"bytes": 1}}, {"model.onnx": {"bytes": "5"}}, []])
def test_malformed_file_lists_are_clear_errors(export, files):
    edit_manifest(export, lambda m: m.__setitem__("files", files))
    with pytest.raises(ParScaleError, match=MANIFEST):
        Model.load(export)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prompt": b"def f"}, "got bytes; decode bytes first"),
    ({"prompt": "def \udcff"}, "not valid UTF-8 text"),  # undecodable argv bytes arrive as lone surrogates
    ({"prompt": [1.0, 2.0]}, r"expected int token ids, got 1.0 \(float\)"),
    ({"prompt_ids": np.array([1.5, 2.0])}, "expected int token ids, got 1.5"),
    ({"prompt": [[1, 2], [3, 2.5]]}, r"expected int token ids \(prompt 1\), got 2.5"),
    ({"prompt_ids": "1,2,3"}, "prompt_ids takes a list of int token ids"),
    ({"prompt": [b"ab"]}, "expected int token ids, got b'ab' \\(bytes\\)"),
    ({"prompt": [True, 2]}, "expected int token ids, got True"),
    ({"prompt": [1, 9999]}, "outside the vocabulary"),
    ({"prompt": [1], "seed": -1}, "seed must be >= 0"),
    ({"prompt": [1], "max_new_tokens": 2.0}, "max_new_tokens must be an integer"),
    ({"prompt": [1], "stop": [1]}, "stop takes non-empty strings"),
])
def test_generate_type_checks_its_inputs(tiny_exports, kwargs, message):
    m = Model.load(tiny_exports[4][1])
    with pytest.raises(ParScaleError, match=message):
        m.generate(**kwargs)


@pytest.mark.parametrize(("text", "ids"), [("1,2,3", [1, 2, 3]), (" 1 , 2,3 ", [1, 2, 3]), ("7", [7])])
def test_prompt_ids_parse(text, ids):
    assert _parse_ids(text) == ids


@pytest.mark.parametrize("text", ["1 2 3", "1,,2", "1,", "", " ", "1.5", "1e3", "-1", "0x10", "١,٢", "1;2"])
def test_prompt_ids_refuse_anything_else(text):
    with pytest.raises(ParScaleError, match="comma-separated"):
        _parse_ids(text)


def test_shared_argument_rules():
    assert check_threads(10**9) == available_cpus()  # clamped: ORT would try to start them all
    assert check_threads(None) is None
    with pytest.raises(ParScaleError, match="threads must be >= 1"):
        check_threads(0)
    with pytest.raises(ParScaleError, match="seed must be >= 0"):
        check_seed(-1)
    with pytest.raises(ParScaleError, match="seed must be <= "):
        check_seed(2**63)
    with pytest.raises(ParScaleError, match=r"window must be <= 512 \(the model's context length\), got 5000"):
        check_window(5000, 512)


@pytest.mark.parametrize("command", ["compare", "eval"])
def test_compare_and_eval_refuse_a_window_beyond_the_context_alike(tiny_exports, tmp_path, command):
    export = str(tiny_exports[4][1])
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x\n" * 50)
    args = [export, export] if command == "compare" else [export]
    r = subprocess.run([sys.executable, "-m", "parscale", command, *args, "--window", "5000", "--text", str(text)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "window must be <= 512 (the model's context length), got 5000" in r.stderr, r.stderr


def test_no_verify_flag_skips_hashing(export):
    flip_weight_byte(export)
    base = [sys.executable, "-m", "parscale", "generate", str(export), "--prompt-ids", "1,2", "--max-new-tokens", "2"]
    r = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "sha256" in r.stderr
    r = subprocess.run([*base, "--no-verify"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("version", "message"), [
    (1, r"written by an older parscale \(format 1, whose graph drives differently\); re-export it .*\(format 4\)"),
    (3, r"written by an older parscale \(format 3, whose graph drives differently\); re-export it .*\(format 4\)"),
    (5, r"written by a newer parscale \(format 5\); upgrade parscale"),
])
def test_exports_of_another_format_are_refused(export, version, message):
    edit_manifest(export, lambda m: m.update(format_version=version))
    with pytest.raises(ParScaleError, match=message):
        Model.load(export)


# ---------------------------------------------------------------------- the closed list (what is read is listed)

def _swap_two_tokens(path: Path) -> None:
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))


CLOSED_LIST_EDITS = {  # name -> how a user (or attacker) changes the file after deleting its manifest entry
    "tokenizer.json": _swap_two_tokens,
    "generation_config.json": lambda p: p.write_text(json.dumps({"eos_token_id": 5})),
    "config.json": lambda p: p.write_text(p.read_text().replace('"eos_token_id"', '"eos_token_id": 7, "x"', 1)),
    "tokenizer_config.json": lambda p: p.write_text(json.dumps({"chat_template": "{{ 'EVIL' }}"})),
}


def _chat_template(folder: Path):  # type: ignore[no-untyped-def]
    from parscale.serve.chat import ChatTemplate

    return ChatTemplate.load(folder)


def _eos(folder: Path):  # type: ignore[no-untyped-def]
    from parscale.text import load_eos_ids

    return load_eos_ids(folder, 512)


def _scoring_tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    from parscale.text import folder_tokenizer

    return folder_tokenizer(folder)


READERS = {"Model.load": Model.load, "Model.load(verify=False)": lambda f: Model.load(f, verify=False),
           "chat template (serve)": _chat_template, "EOS ids": _eos, "scoring tokenizer (eval)": _scoring_tokenizer}
READS = {"chat template (serve)": {"tokenizer_config.json"}, "EOS ids": {"generation_config.json", "config.json"},
         "scoring tokenizer (eval)": {"tokenizer.json"}}  # the loads read every file


@pytest.mark.parametrize(("reader", "name"), [(r, n) for r in sorted(READERS) for n in sorted(CLOSED_LIST_EDITS)
                                              if n in READS.get(r, {n})])
@pytest.mark.parametrize("unlist", [True, False], ids=["unlisted", "altered"])
def test_a_file_the_runtime_reads_is_listed_and_unaltered(export, name, reader, unlist):
    """Deleting a file's entry from parscale.json does not switch its check off: every reader refuses a
    folder where a file it would read is unlisted (or, listed, altered), naming it. The small text files
    are hashed by their readers even with verify=False (which skips hashing the graph's weights)."""
    if not (export / name).exists():
        (export / name).write_text("{}")
        rehash(export)
    if unlist:
        edit_manifest(export, lambda m: m["files"].pop(name))
    CLOSED_LIST_EDITS[name](export / name)
    with pytest.raises(ParScaleError, match=name.replace(".", r"\.")):
        READERS[reader](export)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                  "special_tokens_map.json", "chat_template.jinja", "model.onnx.data", "vocab.json"])
def test_a_file_dropped_into_an_export_is_refused(tmp_path, tiny_exports, name):
    export = tmp_path / "export"
    shutil.copytree(tiny_exports[4][1], export)
    (export / name).unlink(missing_ok=True)
    edit_manifest(export, lambda m: m["files"].pop(name, None))
    Model.load(export)  # without it: fine
    (export / name).write_text("{}")
    with pytest.raises(ParScaleError, match=f"{name.replace('.', '[.]')} is not listed in parscale.json"):
        Model.load(export)
    (export / "notes.txt").write_text("a user's file that nothing reads")
    (export / name).unlink()
    Model.load(export)  # a file nothing reads may sit beside the export


def test_the_browser_serves_only_listed_files(export):
    from parscale.browser import MODEL_PREFIX, Roots

    (export / "secret.txt").write_text("not for the page")
    edit_manifest(export, lambda m: m["files"].pop("tokenizer.json"))
    roots = Roots(web=export, vendor={}, model=export.resolve(),
                  listed=frozenset([MANIFEST, *Manifest.read(export).files]))
    served = [n for n in ("secret.txt", "tokenizer.json", MODEL_FILE, MANIFEST) if roots.resolve(MODEL_PREFIX + n)]
    assert served == [MODEL_FILE, MANIFEST]


@pytest.fixture(scope="module")
def multi_export(default_int8_export, tmp_path_factory) -> Path:
    return default_int8_export


STREAM_EDITS = [[1, 2, 4], [], [2, 2, 4], [2.0, 4.0], [8, 4, 2, 1], [True, 2, 4, 8], "1248", [1, 2, 4, 8, 16],
                [8], None, [1, 2, "4", 8], [0, 2, 4, 8], [-1, 2, 4, 8], [1, 2, 4, 8.0], {"8": 1}]


@pytest.mark.parametrize("streams", STREAM_EDITS, ids=[json.dumps(s) for s in STREAM_EDITS])
def test_edited_cache_streams_are_refused(tmp_path, multi_export, streams):
    """io.cache.streams sizes the cache and says which P the graph serves: an edit is refused by name."""
    export = tmp_path / "export"
    shutil.copytree(multi_export, export)
    edit_manifest(export, lambda m: m["io"]["cache"].__setitem__("streams", streams))
    with pytest.raises(ParScaleError, match=r"io\.cache"):
        Model.load(export)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["streams", "kv_heads_per_stream", "prefix_rows", "DROP streams", "DROP cache"]),
       value=st.one_of(st.integers(-3, 20), st.floats(allow_nan=False), st.booleans(), st.none(), st.text(max_size=3),
                       st.lists(st.integers(-1, 17), max_size=5)))
def test_any_edit_of_io_cache_is_refused_or_harmless(tmp_path_factory, multi_export, key, value):
    """Hypothesis over io.cache of a multi-P export: a load either refuses, naming the field, or serves
    exactly the P the graph was built for."""
    export = tmp_path_factory.mktemp("cache") / "export"
    shutil.copytree(multi_export, export)

    def edit(m: dict) -> None:
        if key == "DROP cache":
            m["io"].pop("cache")
        elif key == "DROP streams":
            m["io"]["cache"].pop("streams")
        else:
            m["io"]["cache"][key] = value

    edit_manifest(export, edit)
    try:
        model = Model.load(export, verify=False)
    except ParScaleError as e:
        assert "io.cache" in str(e) or "io" in str(e)
    else:
        assert list(model.streams) == [1, 2, 4, 8]
        assert Manifest.read(export).io == Manifest.read(multi_export).io
