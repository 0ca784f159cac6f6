"""Messages say what is wrong with what: the file named, a file that is not a folder called so, the output
folder's relation to the input told right, the current format named, nothing from ONNX Runtime's own log."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from runtime_helpers import run_cli

from parscale.atomic import check_destination, foreign_in_export
from parscale.cli import DEFAULT_MODEL
from parscale.driver import GraphInfo, open_session, step
from parscale.errors import ParScaleError
from parscale.manifest import FORMAT_VERSION, Manifest


@pytest.fixture(scope="module")
def a_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("file") / "notes.txt"
    path.write_text("not a model")
    return path


@pytest.mark.parametrize("argv", [
    ["generate", "{f}", "--prompt-ids", "1"], ["inspect", "{f}"], ["bench", "{f}"], ["eval", "{f}"],
    ["export", "{f}", "-o", "{out}"], ["compare", "{f}", "{f}"], ["train-heads", "{f}", "--P", "2"],
    ["serve", "{f}", "--port", "0"],
], ids=lambda a: a[0])
def test_a_file_given_as_a_folder_is_called_a_file(a_file, tmp_path, argv):
    r = run_cli(*[a.format(f=a_file, out=tmp_path / "out") for a in argv])
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"{a_file} is a file, not a folder" in r.stderr


def test_train_heads_without_a_tokenizer_names_the_file_and_takes_verbose(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(DEFAULT_MODEL, ckpt)
    (ckpt / "tokenizer.json").unlink()
    r = run_cli("train-heads", str(ckpt), "--P", "3", "--steps", "1", "--verbose")
    assert r.returncode == 1 and f"{ckpt / 'tokenizer.json'} not found" in r.stderr, r.stderr
    assert "os error" not in r.stderr and not (ckpt / "heads-p3.safetensors").exists()


def test_eval_with_a_tokenizer_larger_than_the_model_is_refused_naming_it(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.checkpoint(P=1, seed=1, tokenizer=True), ckpt)
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.json", ckpt / "tokenizer.json")
    r = run_cli("eval", str(ckpt), "--max-tokens", "32", "--window", "16", "--stride", "16")
    assert r.returncode == 1 and "tokenizer.json has 4096 tokens but the model's vocabulary has 512" in r.stderr
    assert "IndexError" not in r.stderr


def test_onnxruntime_logs_nothing_of_its_own_when_a_run_fails(tiny_exports, capfd):
    """A failing kernel raises; ORT's own ERROR line on stderr (before our one-line error) is switched off."""
    session = open_session(tiny_exports[1][1] / "model.onnx", threads=1)
    with pytest.raises(ParScaleError, match="onnxruntime failed running the graph"):
        step(session, GraphInfo.of(session), np.array([[10**6]]), np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64))
    assert capfd.readouterr().err == ""


def test_an_output_folder_holding_the_input_is_not_called_the_input(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    monkeypatch.chdir(tmp_path)
    from pathlib import Path

    for out, words in ((Path("."), "contains the input folder"), (tmp_path, "contains the input folder"),
                       (ckpt, "would overwrite the input folder")):
        with pytest.raises(ParScaleError, match=words):
            check_destination(out, force=True, is_replaceable=foreign_in_export, protect=(Path("ckpt"),))


@pytest.mark.parametrize("version", range(1, FORMAT_VERSION))
def test_an_older_format_names_the_current_one(tiny_exports, tmp_path, version):
    old = tmp_path / "old"
    shutil.copytree(tiny_exports[1][1], old)
    manifest = json.loads((old / "parscale.json").read_text())
    (old / "parscale.json").write_text(json.dumps({**manifest, "format_version": version}))
    with pytest.raises(ParScaleError, match=rf"format {version}, .*re-export it with this version "
                                            rf"\(format {FORMAT_VERSION}\)"):
        Manifest.read(old)


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_generate_with_stdout_closed_is_one_clear_line(tiny_exports, json_flag):
    code = "import sys\nfrom parscale.cli import main\nsys.argv = ['parscale', *sys.argv[1:]]\nmain()\n"
    r = subprocess.run([sys.executable, "-c", code, "generate", str(tiny_exports[4][1]), "--prompt-ids", "1,2",
                        "--max-new-tokens", "2", *json_flag], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, timeout=120, pass_fds=(), preexec_fn=_close_stdout)
    assert r.returncode == 1 and r.stderr == "error: standard output is closed: redirect it instead (> FILE, or > " \
                                             "/dev/null)\n", r.stderr


def _close_stdout() -> None:
    import os

    os.close(1)
