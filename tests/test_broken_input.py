"""Broken checkpoints and bad options: one clear line, exit code 1, no traceback, no output folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow  # exports and CLI runs: the full tier (CI), not `-m "not slow"`


@pytest.fixture(scope="module")
def good_checkpoint(tiny) -> Path:
    return tiny.checkpoint(P=2, prefix=4)


def edit_config(**changes) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        d = json.loads((ckpt / "config.json").read_text())
        d.update(changes)
        (ckpt / "config.json").write_text(json.dumps(d))
    return edit


def edit_tensors(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        tensors = load_file(ckpt / "model.safetensors")
        fn(tensors)
        save_file(tensors, ckpt / "model.safetensors")
    return edit


def truncate(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])


def shorten_prefix(t: dict) -> None:
    for name in [n for n in t if n.endswith(("prefix_k", "prefix_v"))]:
        t[name] = t[name][:, :, :3].contiguous()


# (id, how to break the checkpoint, extra CLI args, words the message must contain)
CASES = [
    ("missing-tensor", edit_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight")), [],
     ["missing tensor", "model.layers.1.mlp.up_proj.weight"]),
    ("wrong-shape", edit_tensors(lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:10]})), [],
     ["model.norm.weight", "shape [10]", "expected [64]"]),
    ("truncated-safetensors", truncate, [], ["model.safetensors", "truncated"]),
    ("malformed-config", lambda c: (c / "config.json").write_text('{"model_type": "qwen2_parscale",'), [],
     ["config.json", "not valid JSON"]),
    ("unsupported-model-type", edit_config(model_type="llama"), [], ["unsupported model_type", "llama"]),
    ("parscale-n-zero", edit_config(parscale_n=0), [], ["parscale_n must be an integer in [1, 64]", "0"]),
    ("prefix-length-mismatch", edit_tensors(shorten_prefix), [], ["3 prefix entries", "parscale_n_tokens=4"]),
    ("no-weight-files", lambda c: (c / "model.safetensors").unlink(), [], ["no weight files"]),
    ("pickle-weights-only", lambda c: (c / "model.safetensors").rename(c / "pytorch_model.bin"), [],
     ["pickle", "safetensors"]),
    ("P-disagrees", lambda c: None, ["--P", "3"], ["no head set for P=3", "holds P = 1, 2"]),
    ("sliding-window", edit_config(use_sliding_window=True), [], ["use_sliding_window"]),
    ("rope-scaling", edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), [], ["rope_scaling", "yarn"]),
    ("missing-model-folder", lambda c: shutil.rmtree(c), [], ["does not exist"]),
    ("nan-weight", edit_tensors(lambda t: t["model.layers.0.mlp.down_proj.weight"].__setitem__((0, 0), float("nan"))),
     ["--no-validate"], ["model.layers.0.mlp.down_proj.weight", "NaN or infinite"]),
    ("malformed-eos", lambda c: (c / "generation_config.json").write_text('{"eos_token_id": 2.5}'), [],
     ["generation_config.json", "eos_token_id must be a token id", "2.5"]),
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parscale", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("break_it", "extra", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_export_refuses_broken_input(tmp_path, good_checkpoint, break_it, extra, words):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, ckpt)
    break_it(ckpt)
    out = tmp_path / "out"
    result = run_cli("export", str(ckpt), "-o", str(out), *extra)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "ckpt"] == []  # no partial folder either


def test_existing_output_is_not_touched(tmp_path, good_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("export", str(good_checkpoint), "-o", str(out), "--no-validate")
    assert result.returncode == 1 and "--force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_force_replaces_an_earlier_export_and_validates(tmp_path, good_checkpoint):
    out = tmp_path / "out"
    assert run_cli("export", str(good_checkpoint), "-o", str(out), "--no-validate").returncode == 0
    (out / "model.onnx").write_bytes(b"stale")  # an earlier export, however damaged, is ours to replace
    result = run_cli("export", str(good_checkpoint), "-o", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert "validation: max |logit diff|" in result.stdout
    assert (out / "model.onnx").stat().st_size > 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial, old or lock left


def test_force_refuses_a_folder_of_user_files(tmp_path, good_checkpoint):
    """--force replaces only an earlier export: user files are named and left alone."""
    out = tmp_path / "d"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("years of work")
    result = run_cli("export", str(good_checkpoint), "-o", str(out), "--force", "--no-validate")
    assert result.returncode == 1
    assert "refusing to replace" in result.stderr and "thesis.txt" in result.stderr and "sub/" in result.stderr
    assert (out / "thesis.txt").read_text() == "years of work" and (out / "sub").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_failed_validation_leaves_nothing(tmp_path, good_checkpoint, monkeypatch):
    """A failure after the graph was written (here: validation) removes the partial folder."""
    import parscale.exporter.pipeline as export_mod
    from parscale.errors import ParScaleError

    monkeypatch.setitem(export_mod.TOLERANCE, export_mod.Dtype.fp32, -1.0)  # nothing can pass
    with pytest.raises(ParScaleError, match="validation failed"):
        export_mod.export(good_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_output_over_checkpoint_is_refused(good_checkpoint):
    result = run_cli("export", str(good_checkpoint), "-o", str(good_checkpoint), "--force")
    assert result.returncode == 1 and "would overwrite the input folder" in result.stderr
    assert (good_checkpoint / "model.safetensors").is_file()
